"""The `gluon` provider of dflash.mhc_post_pre (compiler/triton/mhc_single_pass.py) — one persistent sm_90 launch.

Gluon kernels do not run under TRITON_INTERPRET, so on CPU this file checks what can be checked without a GPU: the
kernel compiles for sm_90 within the H100's shared memory, and the provider declines exactly where it should
(sm_90, bf16, n = 4, D a multiple of 128, a static T ≥ min_t), judged on fake CUDA tensors as the lowering does.
The numerics (poisoned outputs, ragged T, D 4096 / 7168, repeats, CUDA graphs, two streams) run with `-m gpu`.
"""

import pytest
from aot_testing import run_aot_script
from mhc_testing import EPS, NORM_EPS, SHARED_LIMIT, assert_outputs_close, make_inputs, poisoned_allocations
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from torch_dflash.compiler import lowering, providers
from torch_dflash.compiler.ops.mhc import mhc_post_pre_reference
from torch_dflash.compiler.triton import mhc_single_pass as sp
from torch_dflash.errors import InputError

MIN_T = sp.launch_config("mhc.single_pass", "cuda")["min_t"]

AOT_SCRIPT = """
import json
from torch_dflash.compiler.triton import aot
from torch_dflash.compiler.triton.mhc_single_pass import aot_specs
result = {}
for spec in aot_specs():
    try:
        compiled = aot.compile_spec(spec, "sm_90")
        result[spec.name] = [len(aot.binary(compiled, "sm_90")), compiled.metadata.shared]
    except Exception as error:
        result[spec.name] = f"{type(error).__name__}: {error}"[:400]
print(json.dumps(result))
"""


def resident_bytes(cfg: dict[str, int]) -> int:
    """Shared memory the design keeps per CTA: fn's bf16 parts, the load ring (x, res, post, comb), the row ring."""
    n, b, w = sp.STREAMS, sp.B, sp.W
    fn = cfg["fn_parts"] * n * w * 32 * 2
    load_ring = cfg["stages"] * (b * w * 2 + n * b * w * 2 + n * b * 4 + n * n * b * 4)
    return fn + load_ring + cfg["row_ring"] * n * b * w * 2


def test_aot_compiles_for_sm_90():
    """D 4096 and 7168 (S = 32 and 56 slices, a constexpr) build cubins whose shared memory holds fn's slice, the load
    ring and the row ring (the apply reads new_res from there, not back from L2) within the H100's 227 KiB."""
    results = run_aot_script(AOT_SCRIPT, families=("cuda",))
    assert sorted(results) == ["mhc_post_pre_single_pass_bf16_n4_D4096", "mhc_post_pre_single_pass_bf16_n4_D7168"]
    for name, result in results.items():
        assert isinstance(result, list) and result[0] > 0, (name, result)
        assert resident_bytes(sp.launch_config("mhc.single_pass", "cuda")) <= result[1] <= SHARED_LIMIT["sm_90"], \
            (name, result)


def test_built_for_sm_90_only_and_launched_without_programmatic_launch():
    """kernel_export builds a spec only for its archs; no PDL constexpr: the cooperative launch starts after the
    previous kernel completes (tests/kernels/test_programmatic_launch.py covers the kernels that take it)."""
    specs = sp.aot_specs("cuda")
    assert specs and all(s.builds_for("sm_90") and not s.builds_for("sm_80") for s in specs)
    assert sp.aot_specs("rocm") == []
    assert "PDL" not in sp.single_pass_kernel.arg_names


def fake_args(tokens=4096, d=4096, n=4, dtype=torch.bfloat16, side_dtype=torch.float32, dynamic=False):
    """The op's arguments as fake CUDA tensors (what the lowering sees); `dynamic`: an unbacked token count."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        t = mode.shape_env.create_unbacked_symint() if dynamic else tokens
        cuda = dict(device="cuda")
        return (torch.empty(t, d, dtype=dtype, **cuda), torch.empty(t, n, d, dtype=dtype, **cuda),
                torch.empty(t, n, dtype=side_dtype, **cuda), torch.empty(t, n, n, dtype=side_dtype, **cuda),
                torch.empty((2 + n) * n, n * d, **cuda), torch.empty((2 + n) * n, dtype=side_dtype, **cuda),
                torch.empty(3, dtype=side_dtype, **cuda), torch.empty(d, dtype=dtype, **cuda),
                1e-6, 1e-6, 20, 1e-6)


@pytest.fixture
def h100(monkeypatch):
    """The facts the provider reads from the device: sm_90 with 132 SMs, CUDA present."""
    monkeypatch.setattr(sp, "device_facts", lambda index: ((9, 0), 132))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)


def test_registered_before_the_triton_provider_on_cuda_only():
    assert [p.name for p in providers.candidates("mhc_post_pre", "cuda")][:2] == ["gluon", "triton"]
    assert "gluon" not in [p.name for p in providers.candidates("mhc_post_pre", "rocm")]


def test_supports_where_it_was_measured_to_win(h100):
    assert sp.supports(*fake_args()) is None
    assert sp.supports(*fake_args(tokens=MIN_T, d=7168)) is None
    assert sp.supports(*fake_args(tokens=3 * MIN_T + 5)) is None  # any T from min_t: ragged sub-blocks are masked


@pytest.mark.parametrize("change, words", [
    (dict(tokens=MIN_T - 1), f"< {MIN_T}"),
    (dict(dynamic=True), "dynamic"),
    (dict(dtype=torch.float16), "bf16"),
    (dict(n=8), "4 streams"),
    (dict(d=4096 + 64), "multiple of 128"),
    (dict(d=128 * 133), "≤ 132 SMs"),
    (dict(side_dtype=torch.bfloat16), "fp32"),
    (dict(tokens=2 ** 31 // (4 * 4096)), "int32 offsets"),   # T·n·D = 2^31
])
def test_declines_with_a_reason(h100, change, words):
    reason = sp.supports(*fake_args(**change))
    assert isinstance(reason, str) and words in reason and reason.endswith("."), reason


def test_declines_off_sm_90_and_off_cuda(h100, monkeypatch):
    monkeypatch.setattr(sp, "device_facts", lambda index: ((8, 0), 108))
    assert "sm_80" in sp.supports(*fake_args())
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "CUDA device" in sp.supports(*fake_args())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA device" in sp.supports(*fake_args())


def test_the_lowering_picks_it_only_for_large_static_token_counts(h100):
    big = lowering.choose("mhc_post_pre", "cuda", fake_args(), {})
    assert big.provider == "gluon" and big.declined == []
    small = lowering.choose("mhc_post_pre", "cuda", fake_args(tokens=16), {})
    assert small.provider == "triton" and small.declined[0][0] == "gluon" and "< " in small.declined[0][1]


def test_cpu_tensors_are_refused_before_any_launch():
    args = (*make_inputs(16, 4, 128, torch.bfloat16, seed=0), 1e-6, 1e-6, 20, 1e-6)
    with pytest.raises(InputError, match="CUDA device"):
        sp.mhc_post_pre(*args)


# --------------------------------------------------------------------------------------------------------- GPU

def post_pre_args(tokens, d, seed, lead=None):
    x, res, post, comb, fn, base, scale, w = make_inputs(tokens, 4, d, torch.bfloat16, seed, lead)
    return (x, res, post, comb, fn, base, scale, w.to(torch.bfloat16), EPS["rms_eps"], EPS["hc_eps"], 20, NORM_EPS)


# the GPU tests: a device of compute capability 9.x (the `gpu` marker alone skips only machines without a GPU)
sm_90 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                           reason="the single-pass kernel is built for sm_90")


@pytest.mark.gpu
@sm_90
@pytest.mark.parametrize("tokens, d", [(1, 4096), (17, 4096), (1000, 4096), (4096, 4096), (300, 7168),
                                       (4096, 7168), (16384, 4096)])
def test_gpu_matches_reference(tokens, d):
    """Any T (one token, ragged last sub-block, more sub-blocks than CTAs per range), both hidden sizes; every
    output allocation NaN-poisoned first."""
    args = post_pre_args(tokens, d, seed=tokens + d)
    with poisoned_allocations():
        got = sp.mhc_post_pre(*args)
    assert_outputs_close(got, mhc_post_pre_reference(*args), torch.bfloat16)


@pytest.mark.gpu
@sm_90
def test_gpu_repeats_bitwise_with_leading_dims():
    args = post_pre_args(2048, 4096, seed=3, lead=(2, 1024))
    first = sp.mhc_post_pre(*args)
    assert_outputs_close(first, mhc_post_pre_reference(*args), torch.bfloat16)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, sp.mhc_post_pre(*args)))


@pytest.mark.gpu
@sm_90
def test_gpu_cuda_graph_replays_with_new_inputs():
    """The cooperative launch captured in a graph; flags and workspace come from the graph's pool, zeroed per replay.
    New activations each replay; the weights stay (fn's bf16 parts are cached per weight, see mhc.fn_bf16_parts)."""
    args = post_pre_args(4096, 4096, seed=11)
    sp.mhc_post_pre(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = sp.mhc_post_pre(*args)
    for seed in (12, 13):
        for dst, src in zip(args[:4], post_pre_args(4096, 4096, seed=seed)):
            dst.copy_(src)
        graph.replay()
        assert_outputs_close(got, mhc_post_pre_reference(*args), torch.bfloat16)


@pytest.mark.gpu
@sm_90
def test_gpu_two_streams_at_once():
    """Two launches in flight on two streams: each has its own flags, so neither waits on the other's."""
    calls = [post_pre_args(4096, 4096, seed=seed) for seed in (21, 22)]
    streams = [torch.cuda.Stream() for _ in calls]
    torch.cuda.synchronize()
    outs = []
    for stream, args in zip(streams, calls):
        with torch.cuda.stream(stream):
            outs.append(sp.mhc_post_pre(*args))
    torch.cuda.synchronize()
    for got, args in zip(outs, calls):
        assert_outputs_close(got, mhc_post_pre_reference(*args), torch.bfloat16)
