"""Triton providers of dflash.qkv_norm_rope(_cache) / kv_materialize / rms_norm / add_rms_norm / silu_mul / rope vs
the reference ops.

Without a GPU the kernels run on CPU tensors through TRITON_INTERPRET=1 (tests/conftest.py sets it); with one
the same sweeps run compiled on the device. Every output is poisoned with NaN first, so an element a kernel
fails to write fails the comparison; cache writes also check that every other slot is still NaN.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_dflash.compiler import providers
from torch_dflash.compiler.ops import (add_rms_norm_reference, context_qkv_norm_rope_cache_reference,
                                       kv_materialize_reference, qkv_norm_rope_reference, rms_norm_reference,
                                       rope_reference, silu_mul_reference)
from torch_dflash.compiler.triton import configs
from torch_dflash.compiler.triton import context_qkv as cq
from torch_dflash.compiler.triton import kv_materialize as kvm
from torch_dflash.compiler.triton import mlp
from torch_dflash.compiler.triton import norm_rope as nr
from torch_dflash.compiler.triton import qkv_norm_rope as qnr
from torch_dflash.errors import InputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-6
SHAPES = [(1, 1), (2, 9), (1, 7), (2, 3)]       # (B, S): single token, and counts that are not block multiples


def param_id(value) -> str | None:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


TABLE_MIN_PROGRAMS = configs.TABLE["norm_rope_heads"]["cuda"]["min_programs"]


@pytest.fixture(autouse=True)
def large_tiles(monkeypatch):
    """Interpreted programs are slow: keep the full token tile (which also exercises partial tiles); one test
    restores the table's small-T policy. Compiled GPU runs keep the table as it is."""
    if nr.interpreting():
        monkeypatch.setitem(configs.TABLE["norm_rope_heads"]["cuda"], "min_programs", 0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """max |out − ref| ≤ tol · max |ref| (tol 1e-5 fp32, 2e-2 bf16), and no NaN (unwritten poison) anywhere."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), f"{int(out.isnan().sum())} elements never written"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]} × {scale:.3g}"


def poisoned(*shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def rand(*shape, dtype, scale=1.0, gen) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def make_inputs(B, S, H, n_q, n_kv, hd, rot, bias, norm, dtype, seed=0):
    """Fresh random inputs; cos/sin [B, S, rot] with each half duplicated, as HF builds them."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    width = (n_q + 2 * n_kv) * hd
    angles = rand(B, S, rot // 2, dtype=torch.float32, scale=3.0, gen=g).repeat(1, 1, 2)
    return dict(x=rand(B, S, H, dtype=dtype, gen=g), w=rand(width, H, dtype=dtype, scale=H ** -0.5, gen=g),
                b=rand(width, dtype=dtype, scale=0.1, gen=g) if bias else None,
                q_norm=rand(hd, dtype=dtype, gen=g) + 1 if norm else None,
                k_norm=rand(hd, dtype=dtype, gen=g) + 1 if norm else None,
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))


def cache_positions(B, S, s_max, seed=0) -> torch.Tensor:
    """Sequence 0 writes a contiguous run at an offset, the others distinct scattered slots."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.arange(s_max - S, s_max)] + [torch.randperm(s_max, generator=g)[:S] for _ in range(B - 1)]
    return torch.stack(rows).to(DEVICE)


def check_cache(cache, positions, ref, dtype):
    """cache [B, n_kv, S_max, hd] holds ref [B, S, n_kv, hd] at positions[b, s]; every other slot is still NaN."""
    B, S = positions.shape
    written = torch.zeros(cache.shape[:1] + cache.shape[2:3], dtype=torch.bool, device=DEVICE)
    for b in range(B):
        written[b, positions[b]] = True
        assert_close(cache[b, :, positions[b]].transpose(0, 1), ref[b], dtype)
    assert cache.transpose(1, 2)[~written].isnan().all(), "a slot outside cache_positions was written"


# ---- qkv_norm_rope ----

QKV_SWEEP = [(dtype, hd, gqa, rot, bias, norm)
             for dtype in (torch.float32, torch.bfloat16) for hd in (64, 128) for gqa in (1, 2, 4)
             for rot in (0.5, 1.0) for bias in (False, True) for norm in (False, True)]


@pytest.mark.parametrize("dtype,hd,gqa,rot,bias,norm", QKV_SWEEP, ids=param_id)
def test_qkv_norm_rope(dtype, hd, gqa, rot, bias, norm):
    case = QKV_SWEEP.index((dtype, hd, gqa, rot, bias, norm))
    B, S = SHAPES[case % len(SHAPES)]
    n_kv = 2
    _check_qkv(B, S, 64, gqa * n_kv, n_kv, hd, int(hd * rot), bias, norm, dtype, seed=case)


def test_qkv_norm_rope_head_dim_256():
    _check_qkv(2, 5, 32, 2, 1, 256, 128, True, True, torch.bfloat16)


def test_qkv_norm_rope_table_tiles(monkeypatch):
    """The table's small-T policy (token tiles shrunk until the grid is wide, here down to one token)."""
    monkeypatch.setitem(configs.TABLE["norm_rope_heads"]["cuda"], "min_programs", TABLE_MIN_PROGRAMS)
    assert nr._heads_block(configs.launch_config("norm_rope_heads", "cuda"), 64, 3, 8, 1) == 1
    _check_qkv(1, 3, 32, 4, 2, 64, 64, False, True, torch.float32)


def _check_qkv(B, S, H, n_q, n_kv, hd, rot, bias, norm, dtype, seed=0):
    inp = make_inputs(B, S, H, n_q, n_kv, hd, rot, bias, norm, dtype, seed)
    args = (inp["x"], inp["w"], inp["b"], inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    assert qnr.qkv_norm_rope_supports(*args) is None
    out = (poisoned(B, S, n_q, hd, dtype=dtype), poisoned(B, S, n_kv, hd, dtype=dtype),
           poisoned(B, S, n_kv, hd, dtype=dtype))
    got = qnr.qkv_norm_rope(*args, out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, r in zip(got, qkv_norm_rope_reference(*args)):
        assert_close(g, r, dtype)


def test_qkv_norm_rope_allocates_and_broadcasts_cos():
    """Without `out`, with 4-D tokens [2, 3, 4, H] and cos/sin shared over the batch ([1, 4, rot])."""
    inp = make_inputs(1, 4, 32, 4, 2, 64, 32, False, True, torch.float32)
    x = torch.randn(2, 3, 4, 32, device=DEVICE)
    args = (x, inp["w"], None, inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], 4, 2, 64)
    assert qnr.qkv_norm_rope_supports(*args) is None
    for g, r in zip(qnr.qkv_norm_rope(*args), qkv_norm_rope_reference(*args)):
        assert_close(g, r, torch.float32)


@pytest.mark.parametrize("dtype,norm", [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=param_id)
def test_qkv_norm_rope_into_cache(dtype, norm):
    B, S, n_q, n_kv, hd, s_max = 2, 5, 4, 2, 64, 12
    inp = make_inputs(B, S, 32, n_q, n_kv, hd, hd // 2, True, norm, dtype)
    args = (inp["x"], inp["w"], inp["b"], inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    k_cache, v_cache = poisoned(B, n_kv, s_max, hd, dtype=dtype), poisoned(B, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, S, s_max)
    q = qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos, q_out=poisoned(B, S, n_q, hd, dtype=dtype))
    q_ref, k_ref, v_ref = qkv_norm_rope_reference(*args)
    assert_close(q, q_ref, dtype)
    check_cache(k_cache, pos, k_ref, dtype)
    check_cache(v_cache, pos, v_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_qkv_norm_rope_cache_provider_writes_the_batch_rows_of_a_larger_cache(dtype):
    """The dflash.qkv_norm_rope_cache provider: a batch of 2 in caches of 3 rows (the runtime's max batch) —
    rows 0 and 1 take k/v at their positions, row 2 stays untouched; equal to the reference op's writes."""
    B, S, n_q, n_kv, hd, s_max = 2, 5, 4, 2, 64, 12
    inp = make_inputs(B, S, 32, n_q, n_kv, hd, hd, False, True, dtype)
    args = (inp["x"], inp["w"], None, inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    k_cache, v_cache = poisoned(B + 1, n_kv, s_max, hd, dtype=dtype), poisoned(B + 1, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, S, s_max)
    assert qnr.qkv_norm_rope_cache_supports(*args, k_cache, v_cache, pos) is None
    q = qnr.qkv_norm_rope_cache(*args, k_cache, v_cache, pos)
    q_ref, k_ref, v_ref = qkv_norm_rope_reference(*args)
    assert_close(q, q_ref, dtype)
    check_cache(k_cache[:B], pos, k_ref, dtype)
    check_cache(v_cache[:B], pos, v_ref, dtype)
    assert k_cache[B].isnan().all() and v_cache[B].isnan().all()
    assert "cache_positions" in qnr.qkv_norm_rope_cache_supports(*args, k_cache, v_cache, pos[:, :2])


def weighted_rows(B, S, H, dtype, seed=0):
    """(s_w, x_sumsq, the normed rows): rows s, s · w in the activation dtype, Σ s² per 64 columns, rms_norm(s, w)
    — what dflash.linear_add_norm_stats leaves for the projection, and what it stands for."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    total, norm_w = rand(B, S, H, dtype=dtype, scale=4.0, gen=g), rand(H, dtype=dtype, scale=0.1, gen=g) + 1
    sumsq = total.float().pow(2).unflatten(-1, (-1, 64)).sum(-1)
    return (total.float() * norm_w.float()).to(dtype), sumsq, rms_norm_reference(total, norm_w, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("op", ["qkv_norm_rope", "qkv_norm_rope_cache"])
def test_projection_finishes_the_rows_norm_from_x_sumsq(dtype, op):
    """x_sumsq: the epilogue scales each projected row by its 1/rms (the GEMM read the weighted rows): equal to the
    reference op with x_sumsq and to the projection of the normed rows (bf16: within rounding), q / k / v or q and
    the cache's slots; the fused GEMM path is never taken with it."""
    B, S, H, n_q, n_kv, hd, s_max = 2, 5, 128, 4, 2, 64, 12
    weighted, sumsq, normed = weighted_rows(B, S, H, dtype)
    inp = make_inputs(B, S, H, n_q, n_kv, hd, hd, False, True, dtype)
    args = (inp["w"], None, inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    if op == "qkv_norm_rope":
        assert qnr.qkv_norm_rope_supports(weighted, *args, sumsq, EPS) is None
        got = qnr.qkv_norm_rope(weighted, *args, sumsq, EPS, path=None)
        wants = (qkv_norm_rope_reference(weighted, *args, sumsq, EPS), qkv_norm_rope_reference(normed, *args))
        for want in wants:
            for out, ref in zip(got, want):
                assert_close(out, ref, dtype)
        with pytest.raises(AssertionError):   # without the statistic v is off (q and k are normed per head anyway)
            assert_close(qnr.qkv_norm_rope(weighted, *args)[2], wants[1][2], dtype)
        with pytest.raises(InputError, match="the fused_gemm path does not finish a norm from x_sumsq"):
            qnr.qkv_norm_rope(weighted, *args, sumsq, EPS, path="fused_gemm")
        return
    caches = [poisoned(B, n_kv, s_max, hd, dtype=dtype) for _ in range(2)]
    pos = cache_positions(B, S, s_max)
    assert qnr.qkv_norm_rope_cache_supports(weighted, *args, *caches, pos, sumsq, EPS) is None
    q = qnr.qkv_norm_rope_cache(weighted, *args, *caches, pos, sumsq, EPS)
    q_ref, k_ref, v_ref = qkv_norm_rope_reference(normed, *args)
    assert_close(q, q_ref, dtype)
    check_cache(caches[0], pos, k_ref, dtype)
    check_cache(caches[1], pos, v_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_context_qkv_finishes_only_the_block_rows_norm(dtype):
    """The joined epilogue scales the block rows by their 1/rms and leaves the context rows (already normed) alone:
    equal to the reference op with x_sumsq, slot for slot."""
    B, C, S = 2, 3, 5
    args, (k_cache, v_cache, k_ref, v_ref), pos = _context_case(B, C, S, dtype, shared_slot=True, H=128, bias=False)
    weighted, sumsq, _ = weighted_rows(B, S, 128, dtype, seed=1)
    args = (args[0], weighted, *args[2:])
    assert cq.context_qkv_norm_rope_cache_supports(*args, k_cache, v_cache, pos, sumsq, EPS) is None
    q = cq.context_qkv_norm_rope_cache(*args, k_cache, v_cache, pos, sumsq, EPS)
    q_ref = context_qkv_norm_rope_cache_reference(*args, k_ref, v_ref, pos, sumsq, EPS)
    assert_close(q, q_ref, dtype)
    written = ~k_ref.isnan()
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        assert torch.equal(written, ~got.isnan()) and written[:B].any()
        assert_close(got[written], want[written], dtype)


def test_x_sumsq_refusals_name_the_reason():
    weighted, sumsq, _ = weighted_rows(1, 2, 128, torch.bfloat16)
    inp = make_inputs(1, 2, 128, 4, 2, 64, 64, True, True, torch.bfloat16)
    args = (weighted, inp["w"], inp["b"], inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], 4, 2, 64)
    assert "a bias would be scaled with them" in qnr.qkv_norm_rope_supports(*args, sumsq, EPS)
    args = (weighted, inp["w"], None, *args[3:])
    assert "x_sumsq must be [1, 2, 2] fp32" in qnr.qkv_norm_rope_supports(*args, sumsq[..., :1], EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_kv_materialize_cache_provider_writes_the_batch_rows_of_a_larger_cache(dtype):
    """The dflash.kv_materialize_cache provider: a context of 2 rows in caches of 3 rows — rows 0 and 1 take the
    context k/v at their positions, every other slot and row 2 stay untouched; equal to the reference op."""
    B, C, n_kv, hd, s_max = 2, 5, 2, 64, 12
    inp = make_inputs(B, C, 32, 0, n_kv, hd, hd, False, True, dtype)
    args = (inp["x"], inp["w"], None, inp["k_norm"], EPS, inp["cos"], inp["sin"], n_kv, hd)
    k_cache, v_cache = poisoned(B + 1, n_kv, s_max, hd, dtype=dtype), poisoned(B + 1, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, C, s_max)
    assert kvm.kv_materialize_cache_supports(*args, k_cache, v_cache, pos) is None
    assert kvm.kv_materialize_cache(*args, k_cache, v_cache, pos) is None
    k_ref, v_ref = kv_materialize_reference(*args)
    check_cache(k_cache[:B], pos, k_ref, dtype)
    check_cache(v_cache[:B], pos, v_ref, dtype)
    assert k_cache[B].isnan().all() and v_cache[B].isnan().all()
    assert "cache_positions" in kvm.kv_materialize_cache_supports(*args, k_cache, v_cache, pos[:, :2])


def _context_case(B, C, S, dtype, shared_slot, seed=0, H=32, n_q=4, n_kv=2, hd=64, bias=True):
    """(args before the caches, caches of B + 1 rows poisoned, reference caches, positions [B, C + S]) of a
    context_qkv_norm_rope_cache call; `shared_slot`: row 0's first context slot is also its last block slot."""
    s_max = C + S + 4
    inp = make_inputs(B, C + S, H, n_q, n_kv, hd, hd, bias, True, dtype, seed=seed)
    ctx, x = inp["x"][:, :C].contiguous(), inp["x"][:, C:].contiguous()
    pos = cache_positions(B, C + S, s_max, seed=seed)
    if shared_slot:
        pos[0, 0] = pos[0, -1]
    args = (ctx, x, inp["w"], inp["b"], inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    caches = [poisoned(B + 1, n_kv, s_max, hd, dtype=dtype) for _ in range(4)]
    return args, caches, pos


# (B, C, S): one joined GEMM of 2·(3 + 5) and 1·(16 + 16) rows; 3·(9 + 4) = 39 rows take the cat + linear path
@pytest.mark.parametrize("B,C,S", [(2, 3, 5), (1, 16, 16), (3, 9, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_context_qkv_provider_equals_the_two_cache_ops(B, C, S, dtype):
    """The dflash.context_qkv_norm_rope_cache provider (joined skinny GEMM or cat + linear, then one epilogue with
    the context rows in front) = the reference kv_materialize_cache + qkv_norm_rope_cache: q, and both caches slot
    for slot — a slot both halves name keeps the block's k/v, the caches' spare row stays NaN."""
    args, (k_cache, v_cache, k_ref, v_ref), pos = _context_case(B, C, S, dtype, shared_slot=True)
    assert cq.context_qkv_norm_rope_cache_supports(*args, k_cache, v_cache, pos) is None
    check_context_qkv(args, k_cache, v_cache, k_ref, v_ref, pos, dtype)


def check_context_qkv(args, k_cache, v_cache, k_ref, v_ref, pos, dtype):
    q = cq.context_qkv_norm_rope_cache(*args, k_cache, v_cache, pos)
    q_ref = context_qkv_norm_rope_cache_reference(*args, k_ref, v_ref, pos)
    assert_close(q, q_ref, dtype)
    batch = pos.shape[0]
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        written = ~want.isnan()
        assert torch.equal(written, ~got.isnan()) and written[:batch].any() and not written[batch].any()
        assert_close(got[written], want[written], dtype)


def test_context_qkv_supports_explains_mismatched_inputs():
    args, (k_cache, v_cache, _, _), pos = _context_case(2, 3, 5, torch.bfloat16, shared_slot=False)
    ctx, x = args[:2]
    assert "ctx and x must be [B, C, H] and [B, S, H]" in \
        cq.context_qkv_norm_rope_cache_supports(ctx[:1], *args[1:], k_cache, v_cache, pos)
    assert "cache_positions has shape (2, 7)" in \
        cq.context_qkv_norm_rope_cache_supports(*args, k_cache, v_cache, pos[:, 1:])
    assert "do not broadcast over the token dims (2, 8)" in \
        cq.context_qkv_norm_rope_cache_supports(*args[:7], args[7][:, 1:], args[8][:, 1:], *args[9:], k_cache,
                                                v_cache, pos)


def test_into_cache_skips_positions_outside_the_cache():
    B, S, n_kv, hd, s_max = 1, 4, 1, 64, 6
    inp = make_inputs(B, S, 32, 2, n_kv, hd, hd, False, True, torch.float32)
    args = (inp["x"], inp["w"], None, inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], 2, n_kv, hd)
    k_cache, v_cache = poisoned(B, n_kv, s_max, hd, dtype=torch.float32), poisoned(B, n_kv, s_max, hd,
                                                                                     dtype=torch.float32)
    pos = torch.tensor([[-1, 2, s_max, 4]], device=DEVICE)
    qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos)
    _, k_ref, _ = qkv_norm_rope_reference(*args)
    assert_close(k_cache[0, :, [2, 4]].transpose(0, 1), k_ref[0, [1, 3]], torch.float32)
    assert k_cache[0, :, [0, 1, 3, 5]].isnan().all() and v_cache[0, :, [0, 1, 3, 5]].isnan().all()


def test_into_cache_rejects_a_cache_of_the_wrong_shape():
    inp = make_inputs(1, 3, 32, 2, 1, 64, 64, False, False, torch.float32)
    args = (inp["x"], inp["w"], None, None, None, EPS, inp["cos"], inp["sin"], 2, 1, 64)
    cache = poisoned(1, 2, 8, 64, dtype=torch.float32)
    with pytest.raises(InputError, match="k_cache has shape"):
        qnr.qkv_norm_rope_into_cache(*args, cache, cache.clone(), cache_positions(1, 3, 8))


# ---- kv_materialize ----

KV_SWEEP = [(dtype, hd, n_kv, rot, bias, norm)
            for dtype in (torch.float32, torch.bfloat16) for hd in (64, 128) for n_kv in (1, 4)
            for rot in (0.5, 1.0) for bias in (False, True) for norm in (False, True)]


@pytest.mark.parametrize("dtype,hd,n_kv,rot,bias,norm", KV_SWEEP, ids=param_id)
def test_kv_materialize(dtype, hd, n_kv, rot, bias, norm):
    case = KV_SWEEP.index((dtype, hd, n_kv, rot, bias, norm))
    B, S = SHAPES[case % len(SHAPES)]
    inp = make_inputs(B, S, 48, 0, n_kv, hd, int(hd * rot), bias, norm, dtype, seed=case)
    args = (inp["x"], inp["w"], inp["b"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_kv, hd)
    assert kvm.kv_materialize_supports(*args) is None
    out = (poisoned(B, S, n_kv, hd, dtype=dtype), poisoned(B, S, n_kv, hd, dtype=dtype))
    got = kvm.kv_materialize(*args, out=out)
    for g, o, r in zip(got, out, kv_materialize_reference(*args)):
        assert g is o
        assert_close(g, r, dtype)


def _layer_inputs(L, B, S, H, n_kv, hd, norm, dtype):
    inp = make_inputs(B, S, H, 0, n_kv, hd, hd, False, False, dtype)
    g = torch.Generator(DEVICE).manual_seed(7)
    w = rand(L, 2 * n_kv * hd, H, dtype=dtype, scale=H ** -0.5, gen=g)
    k_norm = rand(L, hd, dtype=dtype, gen=g) + 1 if norm else None
    return inp, w, k_norm


def _layer_refs(inp, w, k_norm, n_kv, hd):
    return [kv_materialize_reference(inp["x"], w[layer], None, None if k_norm is None else k_norm[layer], EPS,
                                     inp["cos"], inp["sin"], n_kv, hd) for layer in range(w.shape[0])]


@pytest.fixture
def launches(monkeypatch):
    """Counts GEMMs (linear.linear: the skinny kernel or F.linear) and epilogue launches made by kv_materialize."""
    counts = {"gemm": 0, "epilogue": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kvm, "linear", counting("gemm", kvm.linear))
    monkeypatch.setattr(kvm, "launch_norm_rope_heads", counting("epilogue", kvm.launch_norm_rope_heads))
    return counts


@pytest.mark.parametrize("dtype,norm", [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=param_id)
def test_kv_materialize_layers(dtype, norm, launches):
    L, B, S, n_kv, hd = 3, 2, 5, 2, 64
    inp, w, k_norm = _layer_inputs(L, B, S, 32, n_kv, hd, norm, dtype)
    out = (poisoned(L, B, S, n_kv, hd, dtype=dtype), poisoned(L, B, S, n_kv, hd, dtype=dtype))
    k, v = kvm.kv_materialize_layers(inp["x"], w, k_norm, EPS, inp["cos"], inp["sin"], n_kv, hd, out=out)
    assert launches == {"gemm": 1, "epilogue": 1}
    for layer, (k_ref, v_ref) in enumerate(_layer_refs(inp, w, k_norm, n_kv, hd)):
        assert_close(k[layer], k_ref, dtype)
        assert_close(v[layer], v_ref, dtype)


@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "per_layer_views"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_kv_materialize_layers_into_cache(dtype, as_list, launches):
    L, B, S, n_kv, hd, s_max = 3, 2, 4, 2, 64, 10
    inp, w, k_norm = _layer_inputs(L, B, S, 32, n_kv, hd, True, dtype)
    k_cache, v_cache = poisoned(L, B, n_kv, s_max, hd, dtype=dtype), poisoned(L, B, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, S, s_max, seed=3)
    given = (list(k_cache.unbind(0)), list(v_cache.unbind(0))) if as_list else (k_cache, v_cache)
    kvm.kv_materialize_layers(inp["x"], w, k_norm, EPS, inp["cos"], inp["sin"], n_kv, hd, *given, pos)
    assert launches == {"gemm": 1, "epilogue": 1}
    for layer, (k_ref, v_ref) in enumerate(_layer_refs(inp, w, k_norm, n_kv, hd)):
        check_cache(k_cache[layer], pos, k_ref, dtype)
        check_cache(v_cache[layer], pos, v_ref, dtype)


def test_kv_materialize_layers_rejects_separate_cache_tensors():
    L, B, S, n_kv, hd = 2, 1, 3, 1, 64
    inp, w, _ = _layer_inputs(L, B, S, 32, n_kv, hd, False, torch.float32)
    caches = [poisoned(B, n_kv, 8, hd, dtype=torch.float32) for _ in range(L)]
    with pytest.raises(InputError, match="views of one stacked"):
        kvm.kv_materialize_layers(inp["x"], w, None, EPS, inp["cos"], inp["sin"], n_kv, hd, caches, caches,
                                  cache_positions(B, S, 8))


# ---- rms_norm and rope alone ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("width", [64, 100, 1024])
@pytest.mark.parametrize("weight", [False, True])
def test_rms_norm(dtype, width, weight):
    g = torch.Generator(DEVICE).manual_seed(width)
    x = rand(2, 7, width, dtype=dtype, scale=3.0, gen=g)
    w = rand(width, dtype=dtype, gen=g) if weight else None
    assert nr.rms_norm_supports(x, w, EPS) is None
    y = nr.rms_norm(x, w, EPS, out=poisoned(2, 7, width, dtype=dtype))
    assert_close(y, rms_norm_reference(x, w, EPS), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("width,weight", [(96, True), (4096, True), (130, False)])
def test_add_rms_norm(dtype, width, weight):
    """The sum is stored rounded to the activation dtype and normalized from there: both outputs match the
    reference's (the interpreter rounds fp32 → bf16 differently from a GPU's cast, so the sum is compared within
    the bf16 tolerance too)."""
    g = torch.Generator(DEVICE).manual_seed(width)
    x, residual = rand(3, 5, width, dtype=dtype, scale=3.0, gen=g), rand(3, 5, width, dtype=dtype, gen=g)
    w = rand(width, dtype=dtype, gen=g) if weight else None
    assert nr.add_rms_norm_supports(x, residual, w, EPS) is None
    y, total = nr.add_rms_norm(x, residual, w, EPS)
    y_ref, total_ref = add_rms_norm_reference(x, residual, w, EPS)
    assert_close(total, total_ref, dtype)
    assert_close(y, y_ref, dtype)
    assert "residual has shape" in nr.add_rms_norm_supports(x, residual[:, :1], w, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("rows,inter", [(1, 12288), (16, 12288), (7, 200)])
def test_silu_mul_on_the_halves_of_a_merged_output(dtype, rows, inter):
    """gate and up as the two halves of one [rows, 2·inter] tensor (row stride 2·inter), and as separate tensors."""
    g = torch.Generator(DEVICE).manual_seed(rows + inter)
    merged = rand(rows, 2 * inter, dtype=dtype, scale=2.0, gen=g)
    gate, up = merged.split(inter, dim=-1)
    assert mlp.silu_mul_supports(gate, up) is None
    assert_close(mlp.silu_mul(gate, up), silu_mul_reference(gate, up), dtype)
    gate, up = gate.contiguous().view(1, rows, inter), up.contiguous().view(1, rows, inter)
    assert_close(mlp.silu_mul(gate, up), silu_mul_reference(gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("hd,rot", [(64, 32), (64, 64), (128, 128)])
@pytest.mark.parametrize("B,S", [(1, 1), (2, 9)])
def test_rope(dtype, hd, rot, B, S):
    inp = make_inputs(B, S, 8, 0, 0, hd, rot, False, False, dtype, seed=hd + rot)
    x = rand(B, S, 3, hd, dtype=dtype, gen=torch.Generator(DEVICE).manual_seed(S))
    assert nr.rope_supports(x, inp["cos"], inp["sin"]) is None
    y = nr.rope(x, inp["cos"], inp["sin"], out=poisoned(B, S, 3, hd, dtype=dtype))
    assert_close(y, rope_reference(x, inp["cos"], inp["sin"]), dtype)


def test_rope_of_a_strided_input():
    """x [B, S, H, D] as the transpose of a [B, H, S, D] tensor; cos/sin [1, S, rot] broadcast over the batch."""
    inp = make_inputs(1, 5, 8, 0, 0, 64, 64, False, False, torch.float32)
    x = torch.randn(2, 3, 5, 64, device=DEVICE).transpose(1, 2)
    assert_close(nr.rope(x, inp["cos"], inp["sin"]), rope_reference(x, inp["cos"], inp["sin"]), torch.float32)


# ---- launch policy, registration, supports() ----

@pytest.mark.parametrize("family", ["cuda", "rocm"])
@pytest.mark.parametrize("tokens,heads,layers", [(1, 48, 1), (32, 48, 1), (8192, 48, 1), (1024, 16, 5)])
def test_heads_block_policy(family, tokens, heads, layers):
    """The token tile is the largest power of two ≤ elems/hd (and ≤ the tokens) that keeps the grid at
    min_programs programs, or 1 when none does."""
    cfg = configs.launch_config("norm_rope_heads", family)
    cap = min(cfg["elems"] // 128, 1 << max(tokens - 1, 0).bit_length())
    wide = [b for b in (1 << i for i in range(cap.bit_length())) if b <= cap
            and -(-tokens // b) * heads * layers >= cfg["min_programs"]]
    assert nr._heads_block(cfg, 128, tokens, heads, layers) == max(wide, default=1)


@pytest.mark.parametrize("op", ["qkv_norm_rope", "kv_materialize", "rms_norm", "rope"])
def test_registered_for_cuda_and_rocm_only(op):
    for target in ("cuda", "rocm"):
        assert providers.candidates(op, target)[0].name == "triton"
    assert all(p.name != "triton" for p in providers.candidates(op, "cpu"))


def _qkv_args(**change):
    inp = make_inputs(1, 3, 32, 2, 1, 64, 64, False, True, torch.bfloat16)
    args = dict(x=inp["x"], w_qkv=inp["w"], b_qkv=None, q_norm_w=inp["q_norm"], k_norm_w=inp["k_norm"], eps=EPS,
                cos=inp["cos"], sin=inp["sin"], n_q=2, n_kv=1, head_dim=64)
    return {**args, **change}


@pytest.mark.parametrize("change,reason", [
    (dict(head_dim=48, w_qkv=torch.zeros(4 * 48, 32, dtype=torch.bfloat16)), "power of two"),
    (dict(q_norm_w=torch.ones(64)), "q_norm_w is torch.float32"),
    (dict(x=torch.zeros(1, 3, 32, dtype=torch.float64)), "not one of fp32/fp16/bf16"),
    (dict(cos=torch.zeros(1, 3, 80, dtype=torch.bfloat16), sin=torch.zeros(1, 3, 80, dtype=torch.bfloat16)),
     "rot_dim 80"),
    (dict(cos=torch.zeros(1, 4, 64, dtype=torch.bfloat16), sin=torch.zeros(1, 4, 64, dtype=torch.bfloat16)),
     "do not broadcast"),
    (dict(n_q=3), "w_qkv has shape"),
])
def test_qkv_supports_gives_reasons(change, reason):
    args = _qkv_args(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    assert reason in (qnr.qkv_norm_rope_supports(**args) or "")


def test_supports_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(nr, "interpreting", lambda: False)
    x = torch.zeros(2, 64)
    assert "CUDA/ROCm tensors" in nr.rms_norm_supports(x, None, EPS)
    assert "CUDA/ROCm tensors" in kvm.kv_materialize_supports(
        x, torch.zeros(128, 64), None, None, EPS, torch.zeros(2, 64), torch.zeros(2, 64), 1, 64)


def test_supports_reasons_of_rms_norm_and_rope():
    x = torch.zeros(2, 64, device=DEVICE)
    assert "weight is torch.bfloat16" in nr.rms_norm_supports(x, torch.zeros(64, dtype=torch.bfloat16,
                                                                             device=DEVICE), EPS)
    assert "row width 65536" in nr.rms_norm_supports(torch.zeros(1, 65536, device=DEVICE), None, EPS)
    table = torch.zeros(1, 3, 32, device=DEVICE)
    assert "power of two" in nr.rope_supports(torch.zeros(1, 3, 2, 96, device=DEVICE), table, table)


# ---- ahead-of-time compilation (a fresh process: the interpreter cannot compile) ----

AOT_SCRIPT = """
import json
from torch_dflash.compiler.triton import (aot, context_qkv, embedding, kv_materialize, norm_rope, qkv_norm_rope,
                                          rope_tables)
result = {}
for module in (norm_rope, qkv_norm_rope, kv_materialize, context_qkv, embedding, rope_tables):
    sizes = result.setdefault(module.__name__.rsplit(".", 1)[1], {})
    for arch in aot.ARCHS:
        for spec in module.aot_specs(aot.family(arch)):
            try:
                sizes[f"{spec.name}@{arch}"] = len(aot.binary(aot.compile_spec(spec, arch), arch))
            except Exception as error:
                sizes[f"{spec.name}@{arch}"] = f"{type(error).__name__}: {error}"[:400]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def aot_results():
    """{module: {"spec name@arch": binary size or the error}}, each module's specs built with the launch config
    of the arch's family (cuda rows for sm_*, rocm rows for gfx*)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["norm_rope", "qkv_norm_rope", "kv_materialize", "context_qkv", "embedding",
                                    "rope_tables"])
def test_aot_specs_compile_for_every_arch(aot_results, module):
    sizes = aot_results[module]
    per_arch = {arch: sorted(n.rsplit(",", 1)[0] for n in sizes if n.endswith("@" + arch)) for arch in
                ("sm_80", "sm_90", "gfx942", "gfx950")}
    # the archs of one family share its table rows; rocm's rows pick no fused qkv GEMM, so it builds a subset (of
    # the epilogues and fused GEMMs: the skinny GEMM's split differs per family)
    assert per_arch["sm_80"] == per_arch["sm_90"] and per_arch["gfx942"] == per_arch["gfx950"], per_arch
    rocm = {n for n in per_arch["gfx942"] if not n.startswith("skinny_gemm")}
    assert per_arch["gfx942"] and rocm <= set(per_arch["sm_80"]), per_arch
    failed = {name: size for name, size in sizes.items() if not isinstance(size, int) or size == 0}
    assert not failed, failed


def test_aot_specs_cover_norm_weights_and_caches(aot_results):
    names = [name for module in ("qkv_norm_rope", "kv_materialize", "context_qkv") for name in aot_results[module]
             if "norm_rope_heads" in name]
    for flag in ("qnorm", "knorm", "cache"):
        assert any(flag in n for n in names) and any(flag not in n for n in names)
    assert all("bf16,hd128" in n for n in names)


# ---- GPU: realistic shapes (Qwen3-8B draft: H 4096, 32/8 heads, hd 128, bf16) ----

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [32, 2048])
def test_gpu_qwen3_shapes(tokens):
    B, S, H, n_q, n_kv, hd, s_max, L, dtype = 2, tokens // 2, 4096, 32, 8, 128, tokens, 5, torch.bfloat16
    inp = make_inputs(B, S, H, n_q, n_kv, hd, hd, False, True, dtype)
    args = (inp["x"], inp["w"], None, inp["q_norm"], inp["k_norm"], EPS, inp["cos"], inp["sin"], n_q, n_kv, hd)
    refs = qkv_norm_rope_reference(*args)
    out = tuple(poisoned(*r.shape, dtype=dtype) for r in refs)
    for g, r in zip(qnr.qkv_norm_rope(*args, out=out), refs):
        assert_close(g, r, dtype)
    k_cache, v_cache = poisoned(B, n_kv, s_max, hd, dtype=dtype), poisoned(B, n_kv, s_max, hd, dtype=dtype)
    pos = cache_positions(B, S, s_max)
    assert_close(qnr.qkv_norm_rope_into_cache(*args, k_cache, v_cache, pos), refs[0], dtype)
    check_cache(k_cache, pos, refs[1], dtype)
    check_cache(v_cache, pos, refs[2], dtype)
    _, w, k_norm = _layer_inputs(L, B, S, H, n_kv, hd, True, dtype)
    k_caches, v_caches = poisoned(L, B, n_kv, s_max, hd, dtype=dtype), poisoned(L, B, n_kv, s_max, hd, dtype=dtype)
    kvm.kv_materialize_layers(inp["x"], w, k_norm, EPS, inp["cos"], inp["sin"], n_kv, hd, k_caches, v_caches, pos)
    for layer, (k_ref, v_ref) in enumerate(_layer_refs(inp, w, k_norm, n_kv, hd)):
        check_cache(k_caches[layer], pos, k_ref, dtype)
        check_cache(v_caches[layer], pos, v_ref, dtype)
    q_ref = refs[0]
    assert_close(nr.rope(q_ref, inp["cos"], inp["sin"], out=poisoned(*q_ref.shape, dtype=dtype)),
                 rope_reference(q_ref, inp["cos"], inp["sin"]), dtype)
    assert_close(nr.rms_norm(inp["x"], inp["w"][0], EPS, out=poisoned(B, S, H, dtype=dtype)),
                 rms_norm_reference(inp["x"], inp["w"][0], EPS), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [32, 2048])
def test_gpu_kv_materialize_per_layer(tokens):
    B, S, H, n_kv, hd, dtype = 1, tokens, 4096, 8, 128, torch.bfloat16
    inp = make_inputs(B, S, H, 0, n_kv, hd, hd, False, True, dtype)
    args = (inp["x"], inp["w"], None, inp["k_norm"], EPS, inp["cos"], inp["sin"], n_kv, hd)
    refs = kv_materialize_reference(*args)
    for g, r in zip(kvm.kv_materialize(*args, out=tuple(poisoned(*r.shape, dtype=dtype) for r in refs)), refs):
        assert_close(g, r, dtype)
    k_cache, v_cache = (poisoned(B + 1, n_kv, S + 16, hd, dtype=dtype) for _ in range(2))
    pos = cache_positions(B, S, S + 16)
    kvm.kv_materialize_cache(*args, k_cache, v_cache, pos)
    check_cache(k_cache[:B], pos, refs[0], dtype)
    check_cache(v_cache[:B], pos, refs[1], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_context_qkv_at_the_draft_shape(B):
    """The Qwen3-8B draft's layer (H 4096, 32/8 heads, hd 128, bf16, no bias), a 16-token context in front of a
    16-token block: batch 1 through the joined skinny GEMM (32 rows), batch 2 through cat + linear; a slot both
    halves name keeps the block's k/v (the epilogue's rule, racing stores otherwise)."""
    args, (k_cache, v_cache, k_ref, v_ref), pos = _context_case(B, 16, 16, torch.bfloat16, shared_slot=True, H=4096,
                                                                n_q=32, n_kv=8, hd=128, bias=False)
    check_context_qkv(args, k_cache, v_cache, k_ref, v_ref, pos, torch.bfloat16)


# ---- the benchmark module builds and runs its cases (tiny shapes; CPU through the interpreter) ----

def test_benchmark_cases_run_small(monkeypatch):
    """Every variant of every tiny case runs once, the eager/inductor baselines agree with the provider, and the
    case's own check (provider vs reference op) passes."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from torch_dflash.benchmarks.kernels_projections import cases

    built = cases(DEVICE, small=True)
    assert [c.extra["tokens"] for c in built] == [3, 8, 17]
    for case in built:
        extra = set(case.variants) - {"eager", "inductor", "gemm_only", "dflash"}
        assert len(case.variants) == 5 and len(extra) == 1 and extra.pop().startswith("dflash_")  # the other path
        assert case.floor_bytes > 0 and case.floor_flops > 0
        results = {name: run() for name, run in case.variants.items()}
        for name in ("eager", "inductor"):
            for got, want in zip(results[name], results["dflash"]):
                assert_close(got.transpose(1, 2), want, torch.bfloat16)
        case.check()
