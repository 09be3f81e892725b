"""Triton provider of dflash.mhc_post_pre / mhc_pre / mhc_post vs the reference ops (compiler/ops/mhc.py).

Without a GPU the kernels run on CPU tensors through TRITON_INTERPRET=1 (tests/conftest.py sets it). Every
buffer the launcher allocates (outputs and the partials workspace) is poisoned with NaN first, so an element
a kernel fails to write fails the comparison. Each launch path is forced with an explicit config. mhc.py's Gram
design (the rocm rows): APPLY (D split over programs, phase 2 as a second launch), SPLIT_INLINE (D split, phase 2
by the finishing program), NO_SPLIT (one program per token block, no ticket), apply_launch 2 (the finish and phase
2 as launches of their own), both phase-1 loop forms (flat_loop 1: APPLY, PRESPLIT; 0: SPLIT_INLINE, NO_SPLIT),
each crossed over below. mhc_rows.py (the cuda rows): WIDE (a finish launch) and FINISH_HERE (the last slice
finishes, the rows launch runs the comb's Sinkhorn).

bf16 on the interpreter: Triton 3.9's interpreter truncates fp32 → bf16 where the GPU (and torch) round to
nearest even, so new_res and layer_in may differ from the reference by one bf16 ulp; the 2e-2 bound covers it,
and `test_bf16_pre_matches_reference_on_the_kernels_own_new_res` checks the rest of the chain at fp32 tightness.
"""

import pytest
from aot_testing import COMPILE_SPECS, run_aot_script
from mhc_testing import DEVICE, EPS, NORM_EPS, SHARED_LIMIT, assert_outputs_close, make_inputs, poisoned_allocations
import torch

from torch_dflash.compiler import providers
from torch_dflash.compiler.ops.mhc import mhc_post_pre_reference, mhc_post_reference, mhc_pre_reference
from torch_dflash.compiler.ops.norm_rope import rms_norm_reference
from torch_dflash.compiler.triton import mhc as tm
from torch_dflash.compiler.triton.aot import ARCHS, family
from torch_dflash.errors import InputError


def row(bucket: str, family: str = "cuda", **override) -> dict:
    return {**tm.launch_config(f"mhc.{bucket}", family), **override}


def gram_row(bucket: str, **override) -> dict:
    """A row of mhc.py's Gram design (the rocm rows)."""
    return row(bucket, "rocm", **override)


APPLY = gram_row("small", block_d=32)               # D split over programs, phase 2 in a second launch
SPLIT_INLINE = gram_row("medium", block_d=32, split=8, apply_launch=0)  # the finisher does phase 2
NO_SPLIT = dict(SPLIT_INLINE, split=1, apply_d=64)  # one program per token block, no ticket
PRESPLIT = gram_row("small", block_d=32, fn_presplit=1)  # fn's 3 bf16 parts made once by the launcher, cached
# mhc_rows (no Gram matrix): the finish launch, or the last slice finishing (finish_here) with the comb's Sinkhorn in
# the rows launch
WIDE = row("large", block_t=32, block_d=32, split=2, apply_rows=2, finish_here=0)
FINISH_HERE = row("decode", block_d=32, split=3)


def run_post_pre(tokens, n, d, dtype, iters, config, seed=0, lead=None):
    x, res, post, comb, fn, base, scale, w = make_inputs(tokens, n, d, dtype, seed, lead)
    args = (x, res, post, comb, fn, base, scale, w, EPS["rms_eps"], EPS["hc_eps"], iters, NORM_EPS)
    with poisoned_allocations():
        got = tm.mhc_post_pre(*args, config=config)
    return got, mhc_post_pre_reference(*args), args


POST_PRE_CASES = [  # (tokens, n, D, dtype, iters, config)
    (3, 4, 96, torch.float32, 20, APPLY),              # 3 slices; apply tiles of 64 over D = 96
    (1, 2, 64, torch.bfloat16, 3, APPLY),
    (17, 4, 96, torch.float32, 20, SPLIT_INLINE),      # 2 token blocks (one ragged) × 3 slices
    (17, 4, 100, torch.bfloat16, 20, row("medium")),   # D not a multiple of 16
    (5, 3, 96, torch.float32, 20, SPLIT_INLINE),       # n not a power of two
    (17, 8, 64, torch.float32, 3, NO_SPLIT),           # n = 8: (2+8)·8 = 80 mixes, 45 Gram pairs
    (17, 4, 256, torch.bfloat16, 20, NO_SPLIT),
    (3, 4, 256, torch.float16, 20, APPLY),
    (17, 4, 96, torch.bfloat16, 20, dict(SPLIT_INLINE, fn_parts=2)),              # 2 bf16 parts, split in-kernel
    (5, 4, 100, torch.bfloat16, 20, dict(APPLY, fn_parts=2, fn_presplit=1)),     # launcher's cached parts
    (17, 4, 96, torch.float32, 20, dict(SPLIT_INLINE, flat_loop=1)),             # flat loop, inline phase 2
    (17, 3, 100, torch.bfloat16, 20, dict(APPLY, flat_loop=0)),                  # nested loop, apply launch
    (17, 4, 96, torch.float32, 3, dict(APPLY, comb_launch=0)),                   # the comb in the finish
    (40, 4, 96, torch.float32, 20, dict(APPLY, apply_launch=2)),                 # the finish as its own launch
    (17, 4, 100, torch.bfloat16, 20, dict(APPLY, apply_launch=2, fn_presplit=1)),  # (3 token blocks, 1 ragged)
    (40, 4, 96, torch.bfloat16, 20, WIDE),                                       # 2 wide blocks (1 ragged), 2 slices
    (5, 3, 100, torch.float32, 20, dict(WIDE, apply_rows=1)),                    # n 3, D 100, IEEE fp32 dot
    (17, 4, 64, torch.bfloat16, 3, dict(WIDE, fn_parts=3, fn_presplit=0, split=1, apply_rows=4)),  # ragged rows
    (40, 4, 96, torch.bfloat16, 20, FINISH_HERE),                                # 3 blocks (1 ragged), 3 slices
    (17, 3, 100, torch.float32, 20, dict(FINISH_HERE, apply_rows=2)),            # n 3, D 100, IEEE fp32 dot
    (1, 4, 64, torch.bfloat16, 3, dict(FINISH_HERE, num_stages=1)),              # one token (AR)
]


@pytest.mark.parametrize("tokens, n, d, dtype, iters, config", POST_PRE_CASES,
                         ids=lambda v: "s{split}a{apply_launch}f{fn_parts}p{fn_presplit}l{flat}c{comb}h{here}".format(
                             **v, flat=v.get("flat_loop", "-"), comb=v.get("comb_launch", "-"),
                             here=v.get("finish_here", "-"))
                         if isinstance(v, dict) else str(v))
def test_post_pre_matches_reference(tokens, n, d, dtype, iters, config):
    got, want, _ = run_post_pre(tokens, n, d, dtype, iters, config)
    assert_outputs_close(got, want, dtype)


def test_the_comb_finished_by_the_rows_launch_matches_the_finish_launchs():
    """finish_here 1 (the last slice finishes, the rows launch turns the stored mixes·r into comb) and 0 (a finish
    launch, one token per thread, does it all) evaluate the same formulas in the same order; only the slice sums'
    reduction layout differs."""
    kw = dict(block_d=32, split=3, apply_rows=1)
    here, want, _ = run_post_pre(17, 4, 96, torch.float32, 20, row("decode", finish_here=1, **kw), seed=3)
    launch, _, _ = run_post_pre(17, 4, 96, torch.float32, 20, row("decode", finish_here=0, **kw), seed=3)
    assert_outputs_close(here, want, torch.float32)
    for a, b in zip(here, launch):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_comb_finished_in_the_apply_launch_has_the_finishs_bits():
    """comb_launch 1 (one more program of the apply launch runs softmax + Sinkhorn from the stored mixes·r) and 0
    (the finishing program runs them) evaluate the same formulas in the same order: every output bit-identical."""
    in_apply, _, _ = run_post_pre(17, 4, 96, torch.bfloat16, 5, dict(APPLY, comb_launch=1), seed=3)
    in_finish, _, _ = run_post_pre(17, 4, 96, torch.bfloat16, 5, dict(APPLY, comb_launch=0), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(in_apply, in_finish))


@pytest.mark.parametrize("tokens, config", [(5, APPLY), (17, SPLIT_INLINE)], ids=["apply", "inline"])
def test_bf16_pre_matches_reference_on_the_kernels_own_new_res(tokens, config):
    """Past new_res (rounded by the interpreter), the mixes and Sinkhorn agree at fp32 tightness; the normed
    layer_in differs by at most the roundings: the interpreter truncates layer_in and normed (< 2^-7 relative
    each), the reference rounds normed to nearest (<= 2^-8), and the norm's statistic comes from the unrounded
    streams (Σ layer_in² within 2·2^-7 relative of the truncated ones', so r_in within 2^-7)."""
    (new_res, normed, post, comb), _, args = run_post_pre(tokens, 4, 96, torch.bfloat16, 20, config, seed=3)
    layer_in, post_ref, comb_ref = mhc_pre_reference(new_res, *args[4:7], EPS["rms_eps"], EPS["hc_eps"], 20)
    torch.testing.assert_close(post, post_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comb, comb_ref, rtol=1e-5, atol=1e-5)
    want = rms_norm_reference(layer_in, args[7], NORM_EPS).float()
    assert ((normed.float() - want).abs() <= (3 * 2 ** -7 + 2 ** -8) * want.abs()).all()


@pytest.mark.parametrize("tokens, n, d, dtype, iters, config", [
    (3, 4, 96, torch.float32, 20, APPLY),
    (17, 4, 100, torch.bfloat16, 3, SPLIT_INLINE),
    (17, 2, 64, torch.float32, 20, NO_SPLIT),
    (17, 4, 96, torch.float32, 20, dict(NO_SPLIT, flat_loop=1)),
    (33, 4, 64, torch.float32, 3, dict(APPLY, apply_launch=2)),
    (33, 4, 96, torch.bfloat16, 20, WIDE),
    (33, 4, 96, torch.bfloat16, 20, FINISH_HERE),
], ids=["apply", "inline", "no_split", "no_split_flat", "finish_launch", "wide", "finish_here"])
def test_pre_matches_reference(tokens, n, d, dtype, iters, config):
    _, res, _, _, fn, base, scale, _ = make_inputs(tokens, n, d, dtype, seed=1)
    args = (res, fn, base, scale, EPS["rms_eps"], EPS["hc_eps"], iters)
    with poisoned_allocations():
        got = tm.mhc_pre(*args, config=config)
    assert_outputs_close(got, mhc_pre_reference(*args), dtype)


@pytest.mark.parametrize("tokens, n, d, dtype", [(17, 4, 96, torch.float32), (5, 8, 300, torch.bfloat16)])
@pytest.mark.parametrize("flat_loop", [0, 1])
def test_post_matches_reference(tokens, n, d, dtype, flat_loop):
    x, res, post, comb, *_ = make_inputs(tokens, n, d, dtype, seed=2)
    with poisoned_allocations():
        got = tm.mhc_post(x, res, post, comb, config=row("post", flat_loop=flat_loop))
    assert_outputs_close([got], [mhc_post_reference(x, res, post, comb)], dtype)


def test_presplit_fn_parts_cached_per_tensor_and_version():
    """The launcher splits fn once per fn tensor: the same parts serve a second call, an in-place change of fn makes
    new ones (and new outputs), and the cache entry dies with the tensor."""
    got, want, args = run_post_pre(5, 4, 96, torch.bfloat16, 20, PRESPLIT, seed=4)
    assert_outputs_close(got, want, torch.bfloat16)
    fn = args[4]
    parts = tm.fn_bf16_parts(fn, 3, 32)
    assert parts.shape == (3, 32, 4 * 96) and not parts[:, 24:].any()
    assert torch.equal(parts.float().sum(0)[:24], fn) and tm.fn_bf16_parts(fn, 3, 32) is parts
    fn.mul_(-1.5)
    assert not torch.equal(tm.fn_bf16_parts(fn, 3, 32), parts)
    assert_outputs_close(tm.mhc_post_pre(*args, config=PRESPLIT), mhc_post_pre_reference(*args), torch.bfloat16)
    keys = [k for k in tm._FN_PARTS if k[0] == id(fn)]
    del fn, args
    assert keys and not any(k in tm._FN_PARTS for k in keys)


@pytest.mark.parametrize("config, slices", [(SPLIT_INLINE, 4), (FINISH_HERE, 2)], ids=["gram", "finish_here"])
def test_leading_dims_and_repeated_split_launches(config, slices):
    """res [B, S, n, D] keeps its leading dims; the split paths leave their arrival tickets at zero, so a second
    launch (same buffer) gives the same answer."""
    assert tm._plan(tm._Problem("mhc_post_pre", 4, 128, torch.float32), config)[1] == slices
    got, want, args = run_post_pre(None, 4, 128, torch.float32, 20, config, lead=(2, 1))
    assert [tuple(t.shape) for t in got] == [(2, 1, 4, 128), (2, 1, 128), (2, 1, 4), (2, 1, 4, 4)]
    assert_outputs_close(got, want, torch.float32)
    assert tm._COUNTERS and all(int(buf.abs().sum()) == 0 for buf in tm._COUNTERS.values())
    again = tm.mhc_post_pre(*args, config=config)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_pick_config_by_token_count():
    buckets = {t: next(b for b in tm._buckets("mhc_post_pre") if tm.pick_config("mhc_post_pre", t, "cuda")
                       is tm.launch_config(b, "cuda")) for t in (1, 16, 17, 64, 65, 256, 257, 1024, 1025, 16384)}
    assert list(buckets.values()) == ["mhc.decode", "mhc.decode", "mhc.small", "mhc.small", "mhc.medium",
                                      "mhc.medium", "mhc.wide", "mhc.wide", "mhc.large", "mhc.large"]
    assert all(tm.pick_config("mhc_post_pre", t, "cuda")["apply_launch"] == 3 for t in buckets)
    assert tm.pick_config("mhc_pre", 16, "rocm") == tm.launch_config("mhc.decode", "rocm")
    assert tm.pick_config("mhc_pre", 32, "rocm")["apply_launch"] == 1
    assert tm.pick_config("mhc_post", 16, "cuda") == tm.launch_config("mhc.post", "cuda")


def test_plan_splits_d_without_empty_slices():
    meta, split = tm._plan(tm._Problem("mhc_post_pre", 4, 7168, torch.bfloat16), row("medium", split=8))
    assert (meta["BLOCK_D"], split, meta["SPLIT_P2"], meta["NM"], meta["NH"]) == (64, 8, 8, 32, 16)
    five_chunks = tm._Problem("mhc_post_pre", 4, 160, torch.bfloat16)
    assert tm._plan(five_chunks, row("medium", block_d=32))[1] == 5
    meta, _ = tm._plan(tm._Problem("mhc_pre", 8, 4096, torch.float32), NO_SPLIT)
    assert (meta["NM"], meta["BLOCK_D"], meta["FN_PARTS"], meta["FINISH_INLINE"]) == (128, 16, 0, True)
    # `programs`: blocks × slices within it (powers of two), the row's split without a token count (AOT specs)
    medium = row("medium", split=64, programs=256)
    slices = {t: tm._plan(tm._Problem("mhc_post_pre", 4, 4096, torch.bfloat16, tokens=t), medium)[1]
              for t in (0, 16, 65, 128, 200, 256)}
    assert slices == {0: 64, 16: 64, 65: 32, 128: 32, 200: 16, 256: 16}
    with pytest.raises(ValueError, match="fn_parts 1"):
        tm._plan(five_chunks, row("small", fn_parts=1))
    with pytest.raises(ValueError, match="block_t 8 < 16"):
        tm._plan(five_chunks, row("small", block_t=8))


def test_providers_registered_first_on_gpu_targets():
    """First on both GPU targets — after the sm_90 single-pass provider of mhc_post_pre (test_gluon_mhc.py)."""
    for op in ("mhc_post_pre", "mhc_pre", "mhc_post"):
        for target in ("cuda", "rocm"):
            assert [p.name for p in providers.candidates(op, target) if p.name != "gluon"][0] == "triton"
        assert all(p.name != "triton" for p in providers.candidates(op, "cpu"))


def test_supports_reasons(monkeypatch):
    x, res, post, comb, fn, base, scale, w = make_inputs(3, 4, 64, torch.float32, seed=0)
    ok = (x, res, post, comb, fn, base, scale, w, 1e-6, 1e-6, 20, 1e-6)
    assert tm.supports_mhc_post_pre(*ok) is None
    bad = {
        "int": (x, res.int(), post, comb, fn, base, scale, w, 1e-6, 1e-6, 20, 1e-6),
        "fn": (x, res, post, comb, fn[:, :-1], base, scale, w, 1e-6, 1e-6, 20, 1e-6),
        "x dtype": (x.double(), res, post, comb, fn, base, scale, w, 1e-6, 1e-6, 20, 1e-6),
        "comb": (x, res, post, comb[:, :2], fn, base, scale, w, 1e-6, 1e-6, 20, 1e-6),
        "norm_w": (x, res, post, comb, fn, base, scale, w[:-1], 1e-6, 1e-6, 20, 1e-6),
        "iters": (x, res, post, comb, fn, base, scale, w, 1e-6, 1e-6, 0, 1e-6),
    }
    for name, args in bad.items():
        reason = tm.supports_mhc_post_pre(*args)
        assert isinstance(reason, str) and reason.endswith("."), (name, reason)
        with pytest.raises(InputError):
            tm.mhc_post_pre(*args)
    wide = torch.zeros(3, 9, 64)
    assert "n = 9" in tm.supports_mhc_pre(wide, fn, base, scale, 1e-6, 1e-6, 20)
    assert tm.supports_mhc_post(x, res, post, comb) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET" in tm.supports_mhc_post(x, res, post, comb)


AOT_SCRIPT = """
import json, sys
from torch_dflash.compiler.triton import aot
from torch_dflash.compiler.triton.mhc import aot_specs
fam = sys.argv[1]
specs = aot_specs(fam)
""" + COMPILE_SPECS


@pytest.fixture(scope="module")
def aot_results():
    """{"spec@arch": [binary bytes, shared memory bytes] or the error}, compiled without the interpreter (one
    process per family, side by side)."""
    return run_aot_script(AOT_SCRIPT)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_aot_compiles_every_spec(aot_results, arch):
    """Every aot_specs() entry (each op × each token bucket with its row's launches; bf16, n = 4, D 4096 and 7168
    sharing binaries except the rows kernels) compiles for the arch within its shared memory budget."""
    specs = [s.name for s in tm.aot_specs(family(arch))]
    launches = {name.split("_bf16")[0] for name in specs}
    assert len(launches) == len(specs) - 2, specs  # only the rows kernels differ by D (their whole-row tile)
    expected = {  # cuda: mhc_rows with the last slice finishing (no finish launch); rocm: the Gram rows, then mhc_rows
        "cuda": {"mhc_post_pre_decode_wide", "mhc_post_pre_decode_rows", "mhc_post_pre_wide_wide",
                 "mhc_post_pre_large_wide", "mhc_pre_decode_rows", "mhc_post_post"},
        "rocm": {"mhc_post_pre_decode", "mhc_post_pre_decode_apply", "mhc_post_pre_medium_apply",
                 "mhc_post_pre_large_wide", "mhc_post_pre_large_finish", "mhc_post_pre_large_rows",
                 "mhc_pre_large_rows", "mhc_post_post"}}[family(arch)]
    assert expected <= launches, sorted(launches)
    assert family(arch) == "rocm" or not any(name.endswith("_finish") for name in launches)
    for name in specs:
        result = aot_results[f"{name}@{arch}"]
        assert isinstance(result, list) and result[0] > 0, (name, result)
        assert result[1] <= SHARED_LIMIT[arch], (name, result)


HINTS_SCRIPT = """
import dataclasses, json
from torch_dflash.compiler.triton import aot
from torch_dflash.compiler.triton.mhc import aot_specs
spec = next(s for s in aot_specs("cuda") if s.name.startswith("mhc_post_pre_large_wide"))
ptx = {}
for hints in (True, False):
    build = dataclasses.replace(spec, constexprs=spec.constexprs | {"L2_HINTS": hints})
    text = aot.compile_spec(build, "sm_90").asm["ptx"]
    ptx[str(hints)] = [text.count("createpolicy.fractional.L2::evict_first"), text.count("evict_last.L2::cache_hint")]
print(json.dumps({"table": spec.constexprs["L2_HINTS"], "ptx": ptx}))
"""


def test_l2_hints_reach_the_ptx():
    """The large row's l2_hints: x and res through cp.async under an evict_first L2 policy, new_res stored
    evict_last — and neither without the key (Triton must not drop the hints silently)."""
    result = run_aot_script(HINTS_SCRIPT, families=("cuda",))
    assert result["table"] is True
    (first_on, last_on), (first_off, last_off) = result["ptx"]["True"], result["ptx"]["False"]
    assert first_on >= 1 and last_on >= 4, result
    assert first_off == 0 and last_off == 0, result


def test_benchmark_cases_run_on_cpu():
    from torch_dflash.benchmarks.kernels_mhc import cases
    for case in cases("cpu", small=True):
        for name, variant in case.variants.items():
            assert all(t.isfinite().all() for t in variant()), (case.name, name)
        case.check()
        assert case.floor_bytes > 0


@pytest.mark.gpu
@pytest.mark.parametrize("d", [4096, 7168])
@pytest.mark.parametrize("tokens", [16, 256, 4096])
def test_gpu_post_pre_model_shapes(tokens, d):
    """DeepSeek-V4 shapes in bf16 through the launcher's own config choice (small / medium / large)."""
    got, want, _ = run_post_pre(tokens, 4, d, torch.bfloat16, 20, None, seed=tokens)
    assert_outputs_close(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 4096])
def test_gpu_fp32_pre_and_post(tokens):
    x, res, post, comb, fn, base, scale, _ = make_inputs(tokens, 4, 4096, torch.float32, seed=5)
    args = (res, fn, base, scale, EPS["rms_eps"], EPS["hc_eps"], 20)
    assert_outputs_close(tm.mhc_pre(*args), mhc_pre_reference(*args), torch.float32)
    assert_outputs_close([tm.mhc_post(x, res, post, comb)], [mhc_post_reference(x, res, post, comb)],
                         torch.float32)


@pytest.mark.gpu
def test_gpu_split_path_in_a_cuda_graph():
    """T = 16 (D split over programs, arrival tickets, the rows launch) replayed from a CUDA graph with new inputs
    each time."""
    x, res, post, comb, fn, base, scale, w = make_inputs(16, 4, 4096, torch.bfloat16, seed=7)
    args = (x, res, post, comb, fn, base, scale, w, EPS["rms_eps"], EPS["hc_eps"], 20, NORM_EPS)
    tm.mhc_post_pre(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = tm.mhc_post_pre(*args)
    for seed in (8, 9):
        for dst, src in zip(args[:8], make_inputs(16, 4, 4096, torch.bfloat16, seed=seed)):
            dst.copy_(src)
        graph.replay()
        assert_outputs_close(got, mhc_post_pre_reference(*args), torch.bfloat16)
