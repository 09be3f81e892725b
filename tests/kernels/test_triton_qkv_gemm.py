"""The fused GEMM + norm + rope kernel of dflash.qkv_norm_rope (compiler/triton/qkv_gemm.py) vs the reference op,
the per-call choice between it and the vendor GEMM + epilogue, and its ahead-of-time builds.

Without a GPU the kernel runs through TRITON_INTERPRET=1 with small tiles (32 tokens × 32 of H, groups of 2 token
tiles), so token counts and H that are not tile multiples and a partial last program group are all exercised.
Outputs are NaN-poisoned first; cache checks also require every other slot to stay NaN.
"""

import pytest
import torch
from aot_testing import COMPILE_SPECS, run_aot_script
from test_triton_projections import (DEVICE, EPS, assert_close, cache_positions, check_cache, make_inputs,
                                     param_id, poisoned)

from torch_dflash.compiler.ops import qkv_norm_rope_reference
from torch_dflash.compiler.triton import configs, qkv_gemm
from torch_dflash.compiler.triton import norm_rope as nr
from torch_dflash.compiler.triton import qkv_norm_rope as qnr
from torch_dflash.compiler.triton import skinny_gemm as sg
from torch_dflash.errors import InputError


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Interpreted programs are slow: small tiles keep the grid (and the test) small. GPU runs keep the table."""
    if nr.interpreting():
        for row in qkv_gemm.ROWS:
            monkeypatch.setitem(configs.TABLE[row], "cuda",
                                {**configs.TABLE[row]["cuda"], "block_m": 32, "block_k": 32, "group_m": 2})


def _args(inp, n_q, n_kv, hd):
    return (inp["x"], inp["w"], inp["b"], inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)


def _outputs(B, S, n_q, n_kv, hd, dtype):
    return (poisoned(B, S, n_q, hd, dtype=dtype), poisoned(B, S, n_kv, hd, dtype=dtype),
            poisoned(B, S, n_kv, hd, dtype=dtype))


# (dtype, hd, gqa, rot / hd, bias, norm): full, half and no rotary; GQA 1, 2, 4; with and without bias and norms
SWEEP = [(torch.float32, 64, 1, 1.0, True, True), (torch.float32, 128, 4, 0.5, False, True),
         (torch.float32, 64, 2, 0.0, False, False), (torch.bfloat16, 64, 2, 0.5, True, False),
         (torch.bfloat16, 128, 4, 1.0, False, True), (torch.bfloat16, 64, 1, 0.25, True, True)]


@pytest.mark.parametrize("dtype,hd,gqa,rot,bias,norm", SWEEP, ids=param_id)
def test_fused_gemm_matches_the_reference(dtype, hd, gqa, rot, bias, norm):
    """B 2 × S 37 = 74 tokens (3 token tiles: a partial tile and a partial group) and H 80 (not a multiple of 32)."""
    B, S, H, n_kv = 2, 37, 80, 2
    n_q = gqa * n_kv
    inp = make_inputs(B, S, H, n_q, n_kv, hd, int(hd * rot), bias, norm, dtype, seed=SWEEP.index(
        (dtype, hd, gqa, rot, bias, norm)))
    args = _args(inp, n_q, n_kv, hd)
    out = _outputs(B, S, n_q, n_kv, hd, dtype)
    got = qnr.qkv_norm_rope(*args, out=out, path="fused_gemm")
    assert all(g is o for g, o in zip(got, out))
    for g, r in zip(got, qkv_norm_rope_reference(*args)):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype,hd,rot,bias", [(torch.bfloat16, 128, 128, False), (torch.float32, 64, 16, True)],
                         ids=param_id)
def test_one_dot_matches_the_reference(monkeypatch, dtype, hd, rot, bias):
    """one_dot: one hd-wide dot split into the halves — full rotary and partial rotary (column gather)."""
    for row in qkv_gemm.ROWS:
        monkeypatch.setitem(configs.TABLE[row], "cuda", {**configs.TABLE[row]["cuda"], "one_dot": 1})
    B, S, H, n_q, n_kv = 1, 40, 80, 4, 2
    inp = make_inputs(B, S, H, n_q, n_kv, hd, rot, bias, True, dtype, seed=hd)
    args = _args(inp, n_q, n_kv, hd)
    got = qnr.qkv_norm_rope(*args, out=_outputs(B, S, n_q, n_kv, hd, dtype), path="fused_gemm")
    for g, r in zip(got, qkv_norm_rope_reference(*args)):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_split_k_matches_the_reference_into_caches_and_twice(monkeypatch, dtype, split):
    """split_k: K slices summed by the tile's last program (H 80 in block_k 32 steps: 3 steps, so split 4 has an
    empty slice); into caches at scattered positions; a second launch reuses the tickets the first reset."""
    for row in qkv_gemm.ROWS:
        monkeypatch.setitem(configs.TABLE[row], "cuda", {**configs.TABLE[row]["cuda"], "split_k": split})
    B, S, H, n_q, n_kv, hd, s_max = 2, 9, 80, 4, 2, 64, 24
    inp = make_inputs(B, S, H, n_q, n_kv, hd, hd // 2, True, True, dtype, seed=split)
    args = _args(inp, n_q, n_kv, hd)
    q_ref, k_ref, v_ref = qkv_norm_rope_reference(*args)
    for _ in range(2):
        k_cache, v_cache = poisoned(B, n_kv, s_max, hd, dtype=dtype), poisoned(B, n_kv, s_max, hd, dtype=dtype)
        pos = cache_positions(B, S, s_max, seed=2)
        q = qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos, q_out=poisoned(B, S, n_q, hd, dtype=dtype),
                                         path="fused_gemm")
        assert_close(q, q_ref, dtype)
        check_cache(k_cache, pos, k_ref, dtype)
        check_cache(v_cache, pos, v_ref, dtype)


def test_fused_gemm_with_the_table_tiles_and_4d_tokens(monkeypatch):
    """The table's own medium tiles (block_m 64: one partial tile), tokens [2, 3, 5, H], cos/sin [1, 5, rot]."""
    monkeypatch.undo()
    inp = make_inputs(1, 5, 64, 4, 2, 64, 64, False, True, torch.float32)
    x = torch.randn(2, 3, 5, 64, device=DEVICE)
    args = (x, *_args(inp, 4, 2, 64)[1:])
    for g, r in zip(qnr.qkv_norm_rope(*args, path="fused_gemm"), qkv_norm_rope_reference(*args)):
        assert_close(g, r, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_fused_gemm_into_cache_at_scattered_positions(dtype):
    B, S, H, n_q, n_kv, hd, s_max = 2, 21, 64, 4, 2, 64, 40
    inp = make_inputs(B, S, H, n_q, n_kv, hd, hd, True, True, dtype, seed=5)
    args = _args(inp, n_q, n_kv, hd)
    k_cache, v_cache = poisoned(B, n_kv, s_max, hd, dtype=dtype), poisoned(B, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, S, s_max, seed=1)
    q = qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos, q_out=poisoned(B, S, n_q, hd, dtype=dtype),
                                     path="fused_gemm")
    q_ref, k_ref, v_ref = qkv_norm_rope_reference(*args)
    assert_close(q, q_ref, dtype)
    check_cache(k_cache, pos, k_ref, dtype)
    check_cache(v_cache, pos, v_ref, dtype)


def test_fused_gemm_skips_cache_positions_outside_the_cache():
    B, S, n_kv, hd, s_max = 1, 4, 1, 64, 6
    inp = make_inputs(B, S, 32, 2, n_kv, hd, hd, False, True, torch.float32)
    args = _args(inp, 2, n_kv, hd)
    k_cache, v_cache = (poisoned(B, n_kv, s_max, hd, dtype=torch.float32) for _ in range(2))
    pos = torch.tensor([[-1, 2, s_max, 4]], dtype=torch.int32, device=DEVICE)
    qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos, path="fused_gemm")
    _, k_ref, v_ref = qkv_norm_rope_reference(*args)
    assert_close(k_cache[0, :, [2, 4]].transpose(0, 1), k_ref[0, [1, 3]], torch.float32)
    assert_close(v_cache[0, :, [2, 4]].transpose(0, 1), v_ref[0, [1, 3]], torch.float32)
    assert k_cache[0, :, [0, 1, 3, 5]].isnan().all() and v_cache[0, :, [0, 1, 3, 5]].isnan().all()


# ---- which path runs ----

@pytest.fixture
def paths(monkeypatch):
    """Records the path of each qkv_norm_rope call: 'fused_gemm' or 'gemm_epilogue'."""
    taken = []

    def record(name, fn):
        def wrapper(*args, **kwargs):
            taken.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(qnr, "launch_qkv_gemm", record("fused_gemm", qnr.launch_qkv_gemm))
    monkeypatch.setattr(qnr, "launch_norm_rope_heads", record("gemm_epilogue", qnr.launch_norm_rope_heads))
    return taken


@pytest.mark.parametrize("dtype,tokens,path", [(torch.bfloat16, 3, "gemm_epilogue"), (torch.bfloat16, 9, "fused_gemm"),
                                               (torch.float32, 9, "gemm_epilogue")], ids=param_id)
def test_the_table_picks_the_path_by_token_count(monkeypatch, paths, dtype, tokens, path):
    """Rows: T ≤ 4 → the GEMM + epilogue, larger T → the fused kernel; fp32 always takes the GEMM + epilogue."""
    for family in ("cuda", "rocm"):
        for row, change in (("qkv_gemm.decode", {"max_t": 4, "fused": 0}),
                            ("qkv_gemm.small", {"max_t": 4, "fused": 0}), ("qkv_gemm.medium", {"fused": 1})):
            monkeypatch.setitem(configs.TABLE[row], family, {**configs.TABLE[row][family], **change})
    inp = make_inputs(1, tokens, 32, 2, 1, 64, 64, False, True, dtype)
    args = _args(inp, 2, 1, 64)
    for g, r in zip(qnr.qkv_norm_rope(*args), qkv_norm_rope_reference(*args)):
        assert_close(g, r, dtype)
    assert paths == [path]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
def test_the_epilogue_paths_take_dflash_linears_gemm(monkeypatch, dtype):
    """The GEMM of qkv_norm_rope's gemm_epilogue path and of kv_materialize is linear.linear's: the skinny kernel
    for a few bf16 rows, F.linear for fp32 (which the skinny kernel refuses); numerics as the reference."""
    from torch_dflash.compiler.ops import kv_materialize_reference
    from torch_dflash.compiler.triton import kv_materialize as kvm
    from torch_dflash.compiler.triton import linear as lin

    skinny = []
    monkeypatch.setattr(lin, "skinny_gemm", lambda *a, **k: skinny.append(a[1].shape) or sg.skinny_gemm(*a, **k))
    inp = make_inputs(1, 3, 32, 2, 1, 64, 64, False, True, dtype)
    args = _args(inp, 2, 1, 64)
    for g, r in zip(qnr.qkv_norm_rope(*args, path="gemm_epilogue"), qkv_norm_rope_reference(*args)):
        assert_close(g, r, dtype)
    kv_args = (inp["x"], inp["w"][64 * 2:], None, inp["k_norm"], EPS, inp["cos"], inp["sin"], 1, 64)
    for g, r in zip(kvm.kv_materialize(*kv_args), kv_materialize_reference(*kv_args)):
        assert_close(g, r, dtype)
    assert skinny == ([(256, 32), (128, 32)] if dtype == torch.bfloat16 else [])


def test_rows_are_picked_by_max_t():
    rows = {row: configs.TABLE[row]["cuda"] for row in qkv_gemm.ROWS}
    assert rows["qkv_gemm.large"]["max_t"] == 0
    assert qkv_gemm.gemm_config(1, "cuda") is rows["qkv_gemm.ar"]
    assert qkv_gemm.gemm_config(2, "cuda") is rows["qkv_gemm.decode"]
    assert qkv_gemm.gemm_config(rows["qkv_gemm.decode"]["max_t"], "cuda") is rows["qkv_gemm.decode"]
    assert qkv_gemm.gemm_config(rows["qkv_gemm.decode"]["max_t"] + 1, "cuda") is rows["qkv_gemm.small"]
    assert qkv_gemm.gemm_config(rows["qkv_gemm.small"]["max_t"], "cuda") is rows["qkv_gemm.small"]
    assert qkv_gemm.gemm_config(rows["qkv_gemm.small"]["max_t"] + 1, "cuda") is rows["qkv_gemm.medium"]
    assert qkv_gemm.gemm_config(rows["qkv_gemm.medium"]["max_t"] + 1, "cuda") is rows["qkv_gemm.large"]


def test_an_unknown_path_is_an_input_error():
    inp = make_inputs(1, 2, 32, 2, 1, 64, 64, False, False, torch.float32)
    with pytest.raises(InputError, match="unknown path 'cutlass'"):
        qnr.qkv_norm_rope(*_args(inp, 2, 1, 64), path="cutlass")


# ---- ahead-of-time builds (child processes without the interpreter) ----

AOT_SCRIPT = """
import dataclasses, json, sys, torch
from torch_dflash.compiler.triton import aot, qkv_gemm
fam = sys.argv[1]
specs = [qkv_gemm.gemm_spec(torch.bfloat16, 128, 128, False, True, False, row, fam)
         for row in qkv_gemm.ROWS]  # every row's tiles: a forced fused launch (path="fused_gemm") uses them
specs.append(qkv_gemm.gemm_spec(torch.bfloat16, 64, 32, True, False, True, "qkv_gemm.large", fam))
if fam == "cuda":   # one hd-wide dot: the NVIDIA option
    spec = specs[-1]
    specs.append(dataclasses.replace(spec, name=spec.name + ",one_dot",
                                     constexprs={**spec.constexprs, "ONE_DOT": True}))
"""


SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}


def test_fused_kernel_compiles_for_every_arch_within_shared_memory():
    """Every table row's fused tiles (bf16, hd 128, q/k norm) and a partial-rotary hd 64 kernel with bias into caches
    (also with one_dot for NVIDIA) compile for sm_80, sm_90 (cuda rows), gfx942, gfx950 (rocm rows) within each
    target's shared memory."""
    results = run_aot_script(AOT_SCRIPT + COMPILE_SPECS)
    failed = {name: r for name, r in results.items() if not isinstance(r, list) or r[0] == 0}
    assert not failed, failed
    for arch, limit in SHARED_LIMIT.items():
        built = {name: r for name, r in results.items() if name.endswith("@" + arch)}
        assert any("rot32,bias,cache" in name for name in built) and len(built) >= 2, (arch, list(built))
        assert any("one_dot" in name for name in built) == arch.startswith("sm_"), (arch, list(built))
        assert all(shared <= limit for _, shared in built.values()), (arch, built)


# ---- GPU: the Qwen3-8B draft shape (H 4096, 32/8 heads, hd 128, bf16) ----

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [32, 2048, 8192])
def test_gpu_fused_gemm_qwen3_shapes(tokens):
    B, S, H, n_q, n_kv, hd, dtype = 2, tokens // 2, 4096, 32, 8, 128, torch.bfloat16
    inp = make_inputs(B, S, H, n_q, n_kv, hd, hd, False, True, dtype)
    args = _args(inp, n_q, n_kv, hd)
    refs = qkv_norm_rope_reference(*args)
    for path in ("fused_gemm", None):
        out = tuple(poisoned(*r.shape, dtype=dtype) for r in refs)
        for g, r in zip(qnr.qkv_norm_rope(*args, out=out, path=path), refs):
            assert_close(g, r, dtype)
    k_cache, v_cache = poisoned(B, n_kv, tokens, hd, dtype=dtype), poisoned(B, n_kv, tokens, hd, dtype=dtype)
    pos = cache_positions(B, S, tokens)
    assert_close(qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos, path="fused_gemm"), refs[0], dtype)
    check_cache(k_cache, pos, refs[1], dtype)
    check_cache(v_cache, pos, refs[2], dtype)
