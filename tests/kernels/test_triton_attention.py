"""Triton provider of dflash.attention (split-KV decode + flash prefill) vs the reference op.

Without a GPU the kernels run on CPU tensors through TRITON_INTERPRET=1 (tests/conftest.py sets it). Every
output is poisoned with NaN first, so a row a kernel fails to write fails the comparison. Batch rows have
ragged prefixes, and every key a kernel must never read (stale cache slots past a row's last query position;
for sliding, keys older than the window of the row's earliest query) holds NaN in the kernel's inputs — one
read of such a key makes the output NaN. The reference sees the same inputs with those slots zeroed.
"""

import itertools

import pytest
from aot_testing import run_aot_script
import torch

from torch_dflash.compiler import providers
from torch_dflash.compiler.ops.attention import KINDS, attention_reference
from torch_dflash.compiler.triton import attention as ta
from torch_dflash.compiler.triton.aot import ARCHS, family
from torch_dflash.compiler.triton import attention_decode as ad
from torch_dflash.compiler.triton.attention_prefill import attention_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
PATHS = {"decode": ad.attention_decode, "prefill": attention_prefill}
WINDOW = 5
# Shared memory a block may use: A100 163 KiB, H100 227 KiB, MI300 (gfx942) 64 KiB LDS, MI350 (gfx950) 160 KiB.
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448, "gfx942": 65536, "gfx950": 163840}


def make_inputs(batch, n_q, n_kv, sq, sk, head_dim, dtype, kind, seed, scattered=False, transposed=False, stale=0):
    """(kernel args, reference args, q_pos): args are q, k, v, mask. Row b's last query sits at key ends[b] - 1;
    row 0 leaves `stale` slots after it, the other rows a random number."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, sq, head_dim, generator=g)
    k, v = (torch.randn(batch, n_kv, sk, head_dim, generator=g) for _ in range(2))
    mask = q_pos = None
    never_read = torch.zeros(batch, sk, dtype=torch.bool)
    if kind == "custom":
        mask = custom_mask(batch, n_q, sq, sk, seed, g)
    else:
        ends = [sk - stale] + [int(torch.randint(sq, sk + 1, (), generator=g)) for _ in range(batch - 1)]
        if batch > 1 and ends[1] == ends[0]:
            ends[1] = max(sq, ends[0] // 2)
        rows = []
        for b, end in enumerate(ends):
            if scattered:   # distinct sorted positions below end - 1, then end - 1 (non_causal reads the last one)
                rows.append(torch.cat((torch.randperm(end - 1, generator=g)[:sq - 1].sort().values,
                                       torch.tensor([end - 1]))))
            else:
                rows.append(torch.arange(end - sq, end))
            never_read[b, end:] = True
            if kind == "sliding":
                never_read[b, :max(int(rows[-1].min()) - WINDOW + 1, 0)] = True
        q_pos = torch.stack(rows).to(DEVICE)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k_ref, v_ref = (t.masked_fill(never_read[:, None, :, None], 0.0) for t in (k, v))
    k, v = (t.masked_fill(never_read[:, None, :, None], float("nan")) for t in (k, v))
    if transposed:      # a [B, S, H, D] cache seen as [B, H, S, D]: non-contiguous strides
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    to_dev = lambda *ts: [None if t is None else t.to(DEVICE) for t in ts]
    return to_dev(q, k, v, mask), to_dev(q, k_ref, v_ref, mask), q_pos


def custom_mask(batch, n_q, sq, sk, seed, g):
    """Bool or additive float mask, full or broadcast; bool masks hide every key from one query row."""
    shape = [(batch, n_q, sq, sk), (1, 1, sq, sk), (batch, 1, 1, sk)][seed % 3]
    visible = torch.rand(shape, generator=g) < 0.6
    if seed % 2:
        return torch.where(visible, torch.randn(shape, generator=g), float("-inf"))
    if shape[-2] == sq:
        visible[..., 0, :] = False
    return visible


def run_and_compare(path, q, k, v, kind, ref_args, q_pos, **kwargs):
    scale = q.shape[-1] ** -0.5
    mask = ref_args[3] if kind == "custom" else None
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    PATHS[path](q, k, v, kind, scale, WINDOW, mask, q_pos, out=out, **kwargs)
    want = attention_reference(*ref_args[:3], kind, scale, WINDOW if kind == "sliding" else 0, mask, q_pos)
    assert not want.isnan().any()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


def sweep():
    """kinds × Sq {1, 4, 16} × paths; the other axes are cycled (indices mixed so that every pair of values of
    kind, path, dtype, head_dim, GQA group and split count occurs at least once)."""
    cases = []
    for (k, kind), (s, sq), (p, path) in itertools.product(enumerate(KINDS), enumerate((1, 4, 16)), enumerate(PATHS)):
        cases.append(dict(
            path=path, kind=kind, sq=sq, batch=1 if (k + s + p) % 4 == 3 else 2, n_kv=2,
            n_q=2 * (1, 2, 4)[(s + p) % 3], sk=max((8, 37, 64, 100, 129, 300)[(3 * k + s + 3 * p) % 6], sq + 5),
            head_dim=(64, 128)[(k + s + p) % 2 if s < 2 else (k + 1) % 2],
            dtype=(torch.float32, torch.bfloat16)[(s + k + p * (s == 2)) % 2],
            splits=(1, 2, 5)[(k + s) % 3] if path == "decode" else None,
            scattered=s > 0 and (k + p) % 2 == 1, transposed=(k + s + p) % 5 == 1, seed=len(cases)))
    return cases


def case_id(c):
    splits = f"-splits{c['splits']}" if c["splits"] else ""
    dtype = str(c["dtype"]).removeprefix("torch.")
    return (f"{c['path']}-{c['kind']}-b{c['batch']}-h{c['n_q']}/{c['n_kv']}-q{c['sq']}-k{c['sk']}-d{c['head_dim']}"
            f"{splits}-{dtype}")


@pytest.mark.parametrize("case", sweep(), ids=case_id)
def test_sweep_matches_reference(case):
    c = dict(case)
    path, splits = c.pop("path"), c.pop("splits")
    args, ref_args, q_pos = make_inputs(**c)
    extra = {"num_splits": splits} if splits else {}
    run_and_compare(path, *args[:3], c["kind"], ref_args, q_pos, **extra)


@pytest.mark.parametrize("path", PATHS)
def test_head_dim_256(path):
    args, ref_args, q_pos = make_inputs(2, 4, 2, 4, 70, 256, torch.bfloat16, "causal", seed=7)
    run_and_compare(path, *args[:3], "causal", ref_args, q_pos, **({"num_splits": 2} if path == "decode" else {}))


@pytest.mark.parametrize("kind", ["causal", "sliding", "non_causal"])
def test_prefill_long_queries_several_q_blocks(kind):
    """Sq 200 > BLOCK_M: several query blocks, each skipping the KV blocks its rows cannot see."""
    args, ref_args, q_pos = make_inputs(2, 2, 1, 200, 260, 64, torch.float32, kind, seed=11)
    run_and_compare("prefill", *args[:3], kind, ref_args, q_pos)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["non_causal", "causal", "sliding"])
def test_q_pos_none_is_bottom_right_aligned(path, kind):
    args, ref_args, _ = make_inputs(1, 4, 2, 4, 45, 64, torch.float32, "custom", seed=3)
    run_and_compare(path, *args[:3], kind, ref_args, None, **({"num_splits": 3} if path == "decode" else {}))


def test_provider_dispatch_by_shape():
    """The registered provider runs decode while the GQA group × queries fit one tile, prefill beyond; both return
    the op's token-major layout, as the reference does."""
    assert providers.candidates("attention", "cuda")[0].name == "triton"
    assert providers.candidates("attention", "rocm")[0].name == "triton"
    for n_q, sq, decode in ((32, 16, True), (8, 16, True), (8, 17, False), (4, 200, False)):
        args, ref_args, q_pos = make_inputs(1, n_q, 8 if n_q == 32 else 2, sq, 40, 64, torch.bfloat16, "causal", 5)
        assert ta.uses_decode(args[0], args[1]) is decode
        out = ta.attention_triton(*args[:3], "causal", 0.125, q_pos=q_pos)
        want = attention_reference(*ref_args[:3], "causal", 0.125, q_pos=q_pos)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
        # the op's layout, both paths: token-major, so the o-projection's reshape is a view
        assert out.stride() == want.stride() and out.transpose(1, 2).is_contiguous()
    fp32 = torch.randn(1, 32, 16, 64, device=DEVICE)
    assert not ta.uses_decode(fp32, fp32[:, :8])      # fp32 tiles are half as tall


@pytest.mark.parametrize("kind", ["non_causal", "custom"])
def test_decode_heuristic_splits_deal_visible_blocks(kind, monkeypatch):
    """Splits from the heuristic (as on a 64-SM GPU: 4 splits for a 600-key cache, each dealt >= 128 visible keys):
    row 0 sees all 600 keys, row 1 a shorter prefix that leaves some splits empty; custom reads the whole cache."""
    monkeypatch.setattr(ad, "multiprocessor_count", lambda device: 64)
    args, ref_args, q_pos = make_inputs(2, 4, 2, 4, 600, 64, torch.float32, kind, seed=13)
    assert ad.num_kv_splits(4, 600, 64, 128, 64) == 4
    run_and_compare("decode", *args[:3], kind, ref_args, q_pos)


def test_split_heuristic():
    assert ad.num_kv_splits(8, 8192, 132, 128, 64) == 16      # draft on H100: 8 kv heads × 16 splits = 128 programs
    assert ad.num_kv_splits(8, 1024, 132, 128, 64) == 8       # no split shorter than 128 keys
    assert ad.num_kv_splits(8, 8192, 304, 128, 64) == 38      # MI300X: 304 CUs
    assert ad.num_kv_splits(256, 8192, 132, 128, 64) == 1     # the batch alone fills the GPU
    assert ad.num_kv_splits(1, 1 << 20, 132, 128, 64) == 64   # capped
    assert ad.num_kv_splits(8, 16, 132, 128, 64) == 1
    assert ad.num_kv_splits(8, 8192, 132, 128, 64, programs_per_sm=4) == 64   # 4 programs per SM: 66 → capped 64
    assert ad.num_kv_splits(8, 1024, 132, 32, 64, programs_per_sm=2) == 32    # 1024 keys allow 32 splits of 32


def test_decode_plan_at_the_h100_step_shapes():
    """What the steps of benchmarks/steps.py launch on an H100 (132 SMs, 32/8 heads, hd 128, bf16): 8 kv heads ×
    16 splits (132 // 8 SMs per head; the ~1041-slot cache allows 32 of min_keys_per_split 32, ≥ 1 block of 32
    keys each), then the reduce over the packed rows."""
    draft, verify, ar = (ad.decode_plan(1, 32, 8, sq, sk, 128, torch.bfloat16, "cuda", 132)
                         for sq, sk in ((16, 1057), (16, 1041), (1, 1041)))
    assert draft.grid == verify.grid == ar.grid == (8, 16) and verify.min_blocks_per_split == 1
    assert (verify.block_n, verify.reduce_num_warps) == (32, 1)
    assert (verify.block_m, verify.reduce_grid) == (64, (8, 64)) and (ar.block_m, ar.reduce_grid) == (16, (8, 4))
    one = ad.decode_plan(1, 32, 8, 16, 1041, 128, torch.bfloat16, "cuda", 132, num_splits=1)
    assert one.grid == (8, 1) and one.reduce_grid is None


def test_supports_reasons():
    q = torch.randn(1, 4, 2, 64, device=DEVICE)
    kv = torch.randn(1, 2, 8, 64, device=DEVICE)
    assert ta.supports(q, kv, kv, "causal", 0.1) is None
    odd = torch.randn(1, 4, 2, 96, device=DEVICE)
    reasons = [
        ta.supports(odd, odd[:, :2], odd[:, :2], "causal", 0.1),
        ta.supports(q, kv, torch.randn(1, 2, 8, 128, device=DEVICE), "causal", 0.1),
        ta.supports(q, kv.half(), kv, "causal", 0.1),
        ta.supports(q.double(), kv.double(), kv.double(), "causal", 0.1),
        ta.supports(q, kv, kv, "custom", 0.1, mask=torch.ones(2, 8, dtype=torch.int32, device=DEVICE)),
        ta.supports(q, kv, kv, "causal", 0.1, q_pos=torch.zeros(1, 3, dtype=torch.long, device=DEVICE)),
        ta.supports(q, kv, kv, "custom", 0.1, mask=torch.ones(3, 8, dtype=torch.bool, device=DEVICE)),
    ]
    assert ta.supports(q, kv, kv, "custom", 0.1, mask=torch.ones(2, 1, dtype=torch.bool, device=DEVICE)) is None
    assert all(isinstance(r, str) and r.endswith(".") for r in reasons), reasons


AOT_SCRIPT = """
import json, sys
import triton
from triton.compiler import ASTSource
from torch_dflash.compiler.triton.aot import ARCHS, binary, compile_spec, family, for_arch
from torch_dflash.compiler.triton.attention import aot_specs

def jit_variant(spec, arch):
    # What the JIT builds for contiguous, 16-byte aligned q/k/v/out: unit strides are constants, pointers and
    # the other q/k/v/out strides are known multiples of 16 (aot.KernelSpec has no attrs to say so), which
    # turns on cp.async / direct-to-LDS pipelining and so the shared memory the GPU really needs.
    spec = for_arch(spec, arch)
    sig, consts = dict(spec.signature), dict(spec.constexprs)
    for name in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):
        if sig.get(name) == "i32":
            sig[name], consts[name] = "constexpr", 1
    aligned = [n for n, t in sig.items() if t.startswith("*") or (t == "i32" and n[:8] in
               ("stride_q", "stride_k", "stride_v", "stride_o"))]
    attrs = {(spec.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(spec.fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=ARCHS[arch], options={"num_warps": spec.num_warps,
                                                               "num_stages": spec.num_stages})

results = {}
for spec in aot_specs((sys.argv[1],)):
    for arch in (a for a in ARCHS if family(a) == sys.argv[1]):
        try:
            compiled = compile_spec(spec, arch)
            results[f"{spec.name}@{arch}"] = [len(binary(compiled, arch)), compiled.metadata.shared]
            if arch in ("sm_80", "gfx942") and ("custombool" in spec.name or ".hd128." not in spec.name):
                results[f"{spec.name}@{arch}"].append(jit_variant(spec, arch).metadata.shared)
        except Exception as e:
            results[f"{spec.name}@{arch}"] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def aot_results():
    """{"spec@arch": [binary bytes, shared memory bytes] or the error}, compiled without the interpreter (one
    process per family, side by side)."""
    return run_aot_script(AOT_SCRIPT)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_aot_compiles_every_spec(aot_results, arch):
    """Every aot_specs() entry of the arch's family compiles within the arch's shared memory (LDS) budget; on
    the tightest budgets (sm_80, gfx942) so does the pipelined variant the JIT builds for aligned tensors, for
    the largest tiles of each kernel (custom masks, hd 64 and 256)."""
    fam = family(arch)
    specs = [s.name for s in ta.aot_specs((fam,))]
    kinds = {".".join(name.split(".")[:2]) for name in specs}
    assert {f"attention_{p}.{k}" for p in PATHS for k in ("non_causal", "causal", "sliding", "custombool")} <= kinds
    assert "attention_decode.customfloat" in kinds
    assert {f"hd{d}" for d in (64, 128, 256)} <= {name.split(".")[2] for name in specs}
    for name in specs:
        result = aot_results[f"{name}@{arch}"]
        assert isinstance(result, list) and result[0] > 0, (name, result)
        assert max(result[1:]) <= SHARED_LIMIT[arch], (name, result)
    if arch in ("sm_80", "gfx942"):
        assert sum(len(aot_results[f"{name}@{arch}"]) == 3 for name in specs) >= 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke through the Triton interpreter, which a session "
                    "on a GPU machine does not turn on (the GPU runs these cases in `torch-dflash bench`)")
def test_benchmark_cases_run_on_cpu():
    from torch_dflash.benchmarks.kernels_attention import cases
    for case in cases("cpu", small=True):
        for name, variant in case.variants.items():
            assert variant().isfinite().all(), (case.name, name)
        case.check()
        assert case.floor_bytes > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [1024, 8192])
def test_gpu_draft_shape(cache):
    """DFLASH draft: 32/8 heads, hd 128, 16 block queries seeing a whole `cache`-key prefix (non_causal)."""
    args, ref_args, q_pos = make_inputs(1, 32, 8, 16, cache + 64, 128, torch.bfloat16, "non_causal", 1, stale=64)
    out = ta.attention_triton(*args[:3], "non_causal", 128 ** -0.5, q_pos=q_pos)
    want = attention_reference(*ref_args[:3], "non_causal", 128 ** -0.5, q_pos=q_pos)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix", [1024, 8192])
def test_gpu_verify_shape_in_a_cuda_graph(prefix):
    """DFLASH verify: 16 queries causal over a prefix, replayed from a CUDA graph after q_pos moved."""
    args, ref_args, q_pos = make_inputs(1, 32, 8, 16, prefix + 256, 128, torch.bfloat16, "causal", seed=2)
    q_pos.copy_(torch.arange(prefix, prefix + 16, device=DEVICE)[None])
    k, v = ref_args[1], ref_args[2]     # finite everywhere
    q = args[0]
    scale = 128 ** -0.5
    ta.attention_triton(q, k, v, "causal", scale, q_pos=q_pos)     # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.attention_triton(q, k, v, "causal", scale, q_pos=q_pos)
    for start in (prefix, prefix + 100):
        q_pos.copy_(torch.arange(start, start + 16, device=DEVICE)[None])
        graph.replay()
        want = attention_reference(q, k, v, "causal", scale, q_pos=q_pos)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
