"""Triton providers of dflash.rope_cos_sin and dflash.joined_rope_cos_sin vs the reference ops: TRITON_INTERPRET=1 on
CPU tensors without a GPU, compiled with one. Both tables are poisoned with NaN first (the joined positions with
-1), so an element the kernel fails to write fails. Positions
reach 131072 (angles of 10^5 radians): fp32 within 1e-5, bf16 within 1e-2. The compiled kernel's cos/sin are the
precise ones (no `.approx` in its PTX). AOT builds for every arch: tests/kernels/test_triton_projections.py.
"""

import pytest
import torch
from aot_testing import run_aot_script
from test_triton_projections import DEVICE, param_id, poisoned

from torch_dflash.compiler import providers
from torch_dflash.compiler.ops import joined_rope_cos_sin_reference, rope_cos_sin_reference
from torch_dflash.compiler.triton import norm_rope as nr
from torch_dflash.compiler.triton import rope_tables as rt

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def inv_freq(rot: int, theta: float = 1e6) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=DEVICE) / rot)


def check(positions, inv, scale, dtype):
    """The provider into NaN-poisoned tables against the reference, elementwise within TOL[dtype]."""
    assert rt.rope_cos_sin_supports(positions, inv, scale, dtype) is None
    want = rope_cos_sin_reference(positions, inv, scale, dtype)
    out = tuple(poisoned(*want[0].shape, dtype=dtype) for _ in range(2))
    got = rt.rope_cos_sin(positions, inv, scale, dtype, out=out)
    for g, o, w in zip(got, out, want):
        assert g is o and not g.isnan().any(), "an element was never written"
        torch.testing.assert_close(g.float(), w.float(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("shape,rot,high", [((1, 1), 128, 16), ((2, 9), 128, 131072), ((3, 7), 24, 131072),
                                            ((21,), 64, 4096), ((2, 2, 5), 16, 131072)])
def test_tables_match_the_reference(dtype, shape, rot, high):
    """Token counts that are not tile multiples, rot_dim/2 not a power of two (12), positions up to 131072."""
    g = torch.Generator(DEVICE).manual_seed(rot + high)
    positions = torch.randint(0, high, shape, generator=g, device=DEVICE)
    positions.view(-1)[0] = high - 1
    check(positions, inv_freq(rot), 1.0, dtype)


def test_int32_positions_a_scale_and_a_strided_positions_tensor():
    g = torch.Generator(DEVICE).manual_seed(0)
    positions = torch.randint(0, 131072, (4, 6), generator=g, device=DEVICE, dtype=torch.int32)
    check(positions, inv_freq(64), 0.75, torch.float32)
    check(positions.t(), inv_freq(64), 1.0, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("batch,front,rest", [(1, 16, 16), (2, 3, 5), (3, 0, 4), (2, 7, 0), (1, 1, 1)])
def test_joined_tables_and_positions_match_the_reference(dtype, batch, front, rest):
    """Rows from the front and from the positions in one tile (the draft's 16 + 16), either part empty."""
    g = torch.Generator(DEVICE).manual_seed(batch * 100 + front * 10 + rest)
    parts = [torch.randint(0, 131072, (batch, n), generator=g, device=DEVICE) for n in (front, rest)]
    args = (*parts, inv_freq(128), 0.5, dtype)
    assert rt.joined_rope_cos_sin_supports(*args) is None
    want = joined_rope_cos_sin_reference(*args)
    out = (torch.full_like(want[0], -1), *(poisoned(*want[1].shape, dtype=dtype) for _ in range(2)))
    got = rt.joined_rope_cos_sin(*args, out=out)
    assert all(g is o for g, o in zip(got, out)) and torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert not g.isnan().any(), "an element was never written"
        torch.testing.assert_close(g.float(), w.float(), atol=TOL[dtype], rtol=0)


def test_registered_for_cuda_and_rocm_only():
    for op in ("rope_cos_sin", "joined_rope_cos_sin"):
        for target in ("cuda", "rocm"):
            assert providers.candidates(op, target)[0].name == "triton"
        assert all(p.name != "triton" for p in providers.candidates(op, "cpu"))


def test_supports_gives_reasons(monkeypatch):
    positions, inv = torch.zeros(2, 3, dtype=torch.long, device=DEVICE), inv_freq(16)
    assert "not int32/int64" in rt.rope_cos_sin_supports(positions.float(), inv, 1.0, torch.float32)
    assert "inv_freq is torch.float64" in rt.rope_cos_sin_supports(positions, inv.double(), 1.0, torch.float32)
    assert "not one of fp32/fp16/bf16" in rt.rope_cos_sin_supports(positions, inv, 1.0, torch.float64)
    assert "front is torch.int32" in rt.joined_rope_cos_sin_supports(positions.int(), positions, inv, 1.0,
                                                                     torch.float32)
    monkeypatch.setattr(nr, "interpreting", lambda: False)
    assert "CUDA/ROCm tensors" in rt.rope_cos_sin_supports(positions.cpu(), inv.cpu(), 1.0, torch.float32)


PTX_SCRIPT = """
import json
from torch_dflash.compiler.triton import aot, rope_tables
print(json.dumps({f"{spec.name} {arch}": aot.compile_spec(spec, arch).asm["ptx"]
                  for spec in rope_tables.aot_specs("cuda") for arch in ("sm_80", "sm_90")}))
"""


def test_compiled_cos_and_sin_are_the_precise_ones():
    """tl.cos / tl.sin lower to libdevice's __nv_cosf / __nv_sinf (Payne-Hanek reduction over __cudart_i2opi_f), not
    to cos.approx / sin.approx, which lose every digit at 10^5 radians."""
    for arch, ptx in run_aot_script(PTX_SCRIPT, families=("cuda",)).items():
        assert ".approx" not in "\n".join(line for line in ptx.splitlines() if "cos" in line or "sin" in line), arch
        assert "__cudart_i2opi_f" in ptx, arch


@pytest.mark.gpu
def test_gpu_draft_and_verify_sizes_through_the_lowering():
    """The providers behind their triton_ops (what the lowered step graphs call) at the Qwen3-8B draft's sizes: 16 to
    4096 positions up to 131072 (joined: 16 more in front), rot_dim 128, fp32 and bf16."""
    from torch_dflash.compiler import lowering

    op, joined = lowering.provider_op("rope_cos_sin", "triton"), lowering.provider_op("joined_rope_cos_sin", "triton")
    for tokens in (16, 4096):
        positions = torch.randint(0, 131072, (1, tokens), device=DEVICE)
        for dtype in (torch.float32, torch.bfloat16):
            args = (positions, inv_freq(128), 1.0, dtype)
            for g, w in zip(op(*args), rope_cos_sin_reference(*args)):
                torch.testing.assert_close(g.float(), w.float(), atol=TOL[dtype], rtol=0)
            args = (positions[:, :16], *args)   # the draft's context rows in front of its block
            got, want = joined(*args), joined_rope_cos_sin_reference(*args)
            assert torch.equal(got[0], want[0])
            for g, w in zip(got[1:], want[1:]):
                torch.testing.assert_close(g.float(), w.float(), atol=TOL[dtype], rtol=0)
