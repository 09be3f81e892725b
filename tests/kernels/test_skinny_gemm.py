"""The split-K skinny GEMM (compiler/triton/skinny_gemm.py) and the dflash.linear / dflash.linear_silu_mul providers
on it (compiler/triton/linear.py) vs fp32 references: interpreter numerics with tails in M, N and K, bias, one split
and several (the last-arriving slice sums the partials; its tickets reset), the SwiGLU epilogue (GLU), the norm in
front of it (NORM), a norm's 1/rms deferred to it from another GEMM's sums of squares (DEFERRED), one-sentence
refusals, the config rule against the H100 sweep's best configs, the providers'
run-time choice (kernel or F.linear) into NaN-poisoned outputs, and ahead-of-time builds for sm_80, sm_90, gfx942,
gfx950 within shared memory."""

import pytest
import torch
from aot_testing import COMPILE_SPECS, run_aot_script
from test_triton_qkv_gemm import SHARED_LIMIT

from torch_dflash.compiler.ops.linear import (add_rms_norm_linear_silu_mul_reference, linear_add_norm_stats_reference,
                                              linear_silu_mul_reference)
from torch_dflash.compiler.ops.mlp import silu_mul_reference
from torch_dflash.compiler.triton import configs
from torch_dflash.compiler.triton import linear as linear_provider
from torch_dflash.compiler.triton import mlp, norm_rope
from torch_dflash.compiler.triton import skinny_gemm as sg
from torch_dflash.errors import InputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, w, b=None):
    y = x.float() @ w.float().t()
    return (y if b is None else y + b.float()).to(x.dtype)


def _operands(m, n, k, bias=False, lead=()):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(*lead, m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(n, generator=g).to(torch.bfloat16).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize("m,n,k,split,bias", [(1, 96, 256, 1, True), (5, 72, 200, 3, False),
                                              (16, 64, 128, 4, True), (32, 40, 96, 2, True)])
def test_matches_mm_with_tails_and_splits(m, n, k, split, bias):
    """72 / 40 rows are not multiples of BLOCK_N 32; 200 / 96 of K are not multiples of split × BLOCK_K."""
    x, w, b = _operands(m, n, k, bias)
    config = {"block_n": 32, "block_k": 32, "split_k": split}
    want = _reference(x, w, b)
    for _ in range(2):   # the second call finds the tickets the first one reset
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
        got = sg.skinny_gemm(x, w, config, out=out, bias=b)
        assert got is out
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    if split > 1:
        assert not sg._arrival_counters(x, n // 32 + 1).any()


@pytest.mark.parametrize("m,inter,k,split,bias", [(1, 48, 256, 1, True), (5, 36, 200, 3, False),
                                                  (16, 64, 128, 4, True), (32, 20, 96, 2, True)])
def test_glu_epilogue_is_silu_mul_of_the_halves(m, inter, k, split, bias):
    """w = [gate; up]: a BLOCK_N 32 tile holds 16 gate and the same 16 up rows; 36 / 20 columns leave a tail. The
    epilogue's h equals the plain kernel's output through silu_mul_kernel bit for bit (both round y to bf16 first)."""
    x, w, b = _operands(m, 2 * inter, k, bias)
    config = {"block_n": 32, "block_k": 32, "split_k": split}
    y = _reference(x, w, b)
    want = silu_mul_reference(y[:, :inter], y[:, inter:])
    for _ in range(2):   # the second call finds the tickets the first one reset
        out = torch.full((m, inter), float("nan"), dtype=x.dtype, device=DEVICE)
        got = sg.skinny_gemm_glu(x, w, b, config, out=out)
        assert got is out
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(got, mlp.silu_mul(*sg.skinny_gemm(x, w, config, bias=b).chunk(2, dim=-1)))


def test_glu_refuses_an_odd_row_count():
    x, w, _ = _operands(4, 7, 64)
    with pytest.raises(InputError, match="a \\[gate; up\\] weight has an even row count, not 7"):
        sg.skinny_gemm_glu(x, w)


def _record_glu_launches(monkeypatch) -> list[str]:
    """The kernels the linear_silu_mul provider launches, in order ("glu": the epilogue; "silu_mul": the pair's)."""
    launched = []
    monkeypatch.setattr(linear_provider, "skinny_gemm_glu",
                        lambda *a, **kw: launched.append("glu") or sg.skinny_gemm_glu(*a, **kw))
    monkeypatch.setattr(linear_provider, "silu_mul", lambda *a: launched.append("silu_mul") or mlp.silu_mul(*a))
    return launched


@pytest.mark.parametrize("m,kernel", [(16, True), (33, False)])
def test_linear_silu_mul_provider_picks_the_epilogue_or_the_pair(monkeypatch, m, kernel):
    launched = _record_glu_launches(monkeypatch)
    x, w, b = _operands(m, 2 * 40, 256, bias=True)
    got = linear_provider.linear_silu_mul(x[None], w, b)
    assert launched == (["glu"] if kernel else ["silu_mul"]) and got.shape == (1, m, 40)
    y = _reference(x, w, b)
    torch.testing.assert_close(got[0].float(), silu_mul_reference(y[:, :40], y[:, 40:]).float(), atol=2e-2,
                               rtol=2e-2)


def _deferred_operands(m, inter, k, bias=False):
    """h = the o GEMM's s, its weighted rows s · norm_w and their 64-column sums of squares (linear_add_norm_stats's
    three outputs, here from the reference), and a [gate; up] weight."""
    g = torch.Generator().manual_seed(m + inter + k)
    s = (4 * torch.randn(m, k, generator=g)).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16)
    weighted = (s.float() * norm_w.float()).to(torch.bfloat16)
    sumsq = s.float().pow(2).unflatten(-1, (-1, 64)).sum(-1)
    _, w, b = _operands(m, 2 * inter, k, bias)
    return weighted.to(DEVICE), sumsq.to(DEVICE), w, b


@pytest.mark.parametrize("m,inter,k,split,bias", [(16, 64, 256, 1, False), (3, 36, 192, 3, True),
                                                  (1, 32, 1024, 2, False)])
def test_deferred_norm_scales_the_product_rows_like_finishing_the_norm_first(m, inter, k, split, bias):
    """x holds an RMSNorm's weighted rows and x_sumsq their sums of squares per 64 columns: the kernel scales each
    row of the product by rsqrt(Σ x_sumsq / K + eps) before the bias and the SwiGLU (any K split: the partials are
    scaled before they are summed; K 1024 has 16 groups, 192 has 3 of a 4-wide load) — within bf16 rounding of the
    reference, which rounds the finished rows before the GEMM."""
    x, sumsq, w, b = _deferred_operands(m, inter, k, bias)
    want = linear_silu_mul_reference(x, w, b, sumsq, 1e-6)
    plain = linear_silu_mul_reference(x, w, b)
    config = {"block_n": 32, "block_k": 64, "split_k": split}
    for _ in range(2):   # the second call finds the tickets the first one reset
        out = torch.full((m, inter), float("nan"), dtype=x.dtype, device=DEVICE)
        got = sg.skinny_gemm_glu(x, w, b, config, out=out, x_sumsq=sumsq, x_eps=1e-6)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())
    assert (got.float() - plain.float()).abs().max() > 0.1 * plain.float().abs().max()  # the scale is applied


def test_deferred_norm_refuses_sums_of_the_wrong_shape():
    x, sumsq, w, _ = _deferred_operands(4, 32, 256)
    with pytest.raises(InputError, match=r"x_sumsq must be \[4, 4\] fp32"):
        sg.skinny_gemm_glu(x, w, x_sumsq=sumsq[:, :3])


@pytest.mark.parametrize("m,kernel", [(16, True), (33, False)])
def test_linear_silu_mul_provider_finishes_a_deferred_norm_in_the_epilogue_or_before_the_pair(monkeypatch, m, kernel):
    launched = _record_glu_launches(monkeypatch)
    x, sumsq, w, _ = _deferred_operands(m, 40, 256)
    got = linear_provider.linear_silu_mul(x[None], w, None, sumsq[None], 1e-6)
    assert launched == (["glu"] if kernel else ["silu_mul"]) and got.shape == (1, m, 40)
    want = linear_silu_mul_reference(x, w, None, sumsq, 1e-6)
    torch.testing.assert_close(got[0].float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())


def _norm_operands(m, inter, k, bias=False):
    x, w, b = _operands(m, 2 * inter, k, bias)
    g = torch.Generator().manual_seed(m + k)
    residual = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16).to(DEVICE)
    return x, residual, norm_w, w, b


def assert_norm_close(got, want):
    """h within bf16 rounding of the output's scale (the kernel scales by 1/rms after the product of the unrounded
    x + residual, the reference rounds s and the normed row first; the interpreter also truncates where the GPU
    rounds); s to one bf16 ulp."""
    (h, total), (h_ref, total_ref) = got, want
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=2e-2, atol=2e-2 * h_ref.float().abs().max().item())
    torch.testing.assert_close(total.float(), total_ref.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("m,inter,k,bias", [(16, 96, 256, False), (3, 36, 200, True), (1, 32, 128, False)])
def test_norm_prologue_matches_add_rms_norm_then_the_glu_gemm(m, inter, k, bias):
    """x + residual normalized inside the GEMM (one K slice; 200 is no multiple of BLOCK_K), s stored by the
    N-tile-0 programs; the norm's weight folded into w's columns as the pass folds it."""
    x, residual, norm_w, w, b = _norm_operands(m, inter, k, bias)
    folded = (w.float() * norm_w.float()).to(w.dtype)
    want = add_rms_norm_linear_silu_mul_reference(x, residual, norm_w, 1e-6, w, b)
    for _ in range(2):
        assert_norm_close(sg.skinny_gemm_glu_norm(x, residual, 1e-6, folded, b), want)


@pytest.mark.parametrize("m,norm_weight,kernel", [(16, False, True), (33, False, False), (16, True, False)])
def test_add_rms_norm_linear_silu_mul_provider_picks_the_norm_prologue_or_the_pair(monkeypatch, m, norm_weight,
                                                                                    kernel):
    """The kernel for served rows and a norm without a weight (folded into w); else add_rms_norm, then the GEMM."""
    launched = []
    monkeypatch.setattr(linear_provider, "skinny_gemm_glu_norm",
                        lambda *a, **kw: launched.append("norm") or sg.skinny_gemm_glu_norm(*a, **kw))
    monkeypatch.setattr(linear_provider, "add_rms_norm",
                        lambda *a: launched.append("add_rms_norm") or norm_rope.add_rms_norm(*a))
    x, residual, norm_w, w, b = _norm_operands(m, 40, 256)
    norm_w = norm_w if norm_weight else None
    got = linear_provider.add_rms_norm_linear_silu_mul(x[None], residual[None], norm_w, 1e-6, w, b)
    assert launched == (["norm"] if kernel else ["add_rms_norm"]) and got[0].shape == (1, m, 40)
    want = add_rms_norm_linear_silu_mul_reference(x, residual, norm_w, 1e-6, w, b)
    assert_norm_close((got[0][0], got[1][0]), want)


def _stats_operands(m, n, k, bias=False):
    x, w, b = _operands(m, n, k, bias)
    g = torch.Generator().manual_seed(m + n)
    residual = (4 * torch.randn(m, n, generator=g)).to(torch.bfloat16).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16).to(DEVICE)
    return x, w, b, residual, norm_w


def assert_stats_close(got, x, w, b, residual, norm_w):
    """s to one bf16 ulp (of the output's scale) of the plain kernel's tile plus the residual — the same bf16 tile;
    the interpreter truncates where the GPU rounds —, s_w the weight times the kernel's own s to one ulp, the sums
    of squares those of its own s (fp32, reassociated) and within bf16 rounding of the reference's."""
    total, weighted, sumsq = got
    plain = sg.skinny_gemm(x, w, bias=b) + residual
    torch.testing.assert_close(total.float(), plain.float(), rtol=2 ** -7, atol=2 ** -7 * plain.float().abs().max())
    exact = total.float()
    torch.testing.assert_close(weighted.float(), (exact * norm_w.float()).to(x.dtype).float(), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(sumsq, exact.pow(2).unflatten(-1, (-1, 64)).sum(-1), rtol=1e-5, atol=0)
    want = linear_add_norm_stats_reference(x, w, b, residual, norm_w)[2]
    torch.testing.assert_close(sumsq, want, rtol=2e-2, atol=0)


@pytest.mark.parametrize("m,n,k,bias", [(16, 128, 256, False), (5, 192, 200, True), (1, 64, 1024, False)])
def test_stats_epilogue_adds_the_residual_and_leaves_the_norm_in_parts(m, n, k, bias):
    """STATS: the program that stores the tile (one slice, or the last of 2–8 to arrive) adds the residual to the
    rounded tile and stores s, s · norm_w and Σ s² of each 64 columns (N tiles of at least 64 rows)."""
    operands = _stats_operands(m, n, k, bias)
    assert sg.plan(m, n, k, sg.gemm_config(n, k, "cuda"))["SPLIT_K"] > 1
    for _ in range(2):   # the second call finds the tickets the first one reset
        assert_stats_close(sg.skinny_gemm_add_stats(*operands), *operands)


@pytest.mark.parametrize("m,kernel", [(16, True), (33, False)])
def test_linear_add_norm_stats_provider_picks_the_epilogue_or_the_rows_kernel(monkeypatch, m, kernel):
    launched = []
    monkeypatch.setattr(linear_provider, "skinny_gemm_add_stats",
                        lambda *a: launched.append("gemm") or sg.skinny_gemm_add_stats(*a))
    monkeypatch.setattr(linear_provider, "add_norm_stats",
                        lambda *a: launched.append("rows") or norm_rope.add_norm_stats(*a))
    x, w, b, residual, norm_w = _stats_operands(m, 128, 256, bias=True)
    got = linear_provider.linear_add_norm_stats(x[None], w, b, residual[None], norm_w)
    assert launched == (["gemm"] if kernel else ["rows"])
    assert [t.shape for t in got] == [(1, m, 128)] * 2 + [(1, m, 2)]
    if kernel:
        assert_stats_close(tuple(t[0] for t in got), x, w, b, residual, norm_w)
    else:
        want = linear_add_norm_stats_reference(x, w, b, residual, norm_w)
        for t, ref in zip(got, want):
            torch.testing.assert_close(t[0].float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max())


def test_stats_epilogue_refuses_a_width_of_no_whole_groups():
    x, w, b, residual, norm_w = _stats_operands(4, 96, 64)
    with pytest.raises(InputError, match="sums of squares per 64 columns need N % 64 == 0, not 96"):
        sg.skinny_gemm_add_stats(x, w, b, residual, norm_w)


def test_norm_prologue_refuses_a_mismatched_residual():
    x, residual, _, w, _ = _norm_operands(4, 8, 64)
    with pytest.raises(InputError, match="the residual must match x"):
        sg.skinny_gemm_glu_norm(x, residual[:3], 1e-6, w)


@pytest.mark.parametrize("x,w,b,match", [
    (torch.zeros(33, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16), None,
     "33 rows; the kernel takes 1 to 32"),
    (torch.zeros(2, 8), torch.zeros(4, 8), None, "must both be bf16 or fp16"),
    (torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16), None,
     r"\[M, K\] and w \[N, K\]"),
    (torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4),
     r"bias must be \[4\] in torch.bfloat16"),
])
def test_refuses_what_it_cannot_run(x, w, b, match):
    with pytest.raises(InputError, match=match):
        sg.skinny_gemm(x.to(DEVICE), w.to(DEVICE), bias=None if b is None else b.to(DEVICE))


@pytest.mark.parametrize("batch,front,rows,split", [(1, 16, 16, 1), (2, 3, 5, 2), (3, 1, 2, 4), (1, 5, 1, 1)])
def test_joined_rows_match_mm_of_the_cat(batch, front, rows, split):
    """skinny_gemm_joined(front, x, w) = cat([front, x], 1) @ wᵀ: batch rows of `front` then `rows` rows each
    (32 rows in all at batch 1 with 16 + 16; partial BLOCK_M otherwise), x given non-contiguous in the batch dim."""
    g = torch.Generator().manual_seed(batch + front + rows)
    front_rows = torch.randn(batch, front, 96, generator=g).to(torch.bfloat16).to(DEVICE)
    x = torch.randn(rows, batch, 96, generator=g).to(torch.bfloat16).to(DEVICE).transpose(0, 1)
    w = (torch.randn(72, 96, generator=g) * 96 ** -0.5).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(72, generator=g).to(torch.bfloat16).to(DEVICE)
    got = sg.skinny_gemm_joined(front_rows, x, w, b, config={"block_n": 32, "block_k": 32, "split_k": split})
    want = _reference(torch.cat([front_rows, x], 1).reshape(-1, 96), w, b)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_joined_rows_refuse_more_than_32_rows_and_mismatched_batches():
    w, rows = torch.zeros(8, 16, dtype=torch.bfloat16, device=DEVICE), torch.zeros(2, 9, 16, dtype=torch.bfloat16,
                                                                                   device=DEVICE)
    with pytest.raises(InputError, match="34 rows; the kernel takes 1 to 32"):
        sg.skinny_gemm_joined(rows, rows[:, :8], w)
    with pytest.raises(InputError, match=r"front and x must be \[B, C, K\] and \[B, S, K\]"):
        sg.skinny_gemm_joined(rows[:1], rows, w)


# (N, K) -> what the rule picks (block_n, block_k, split_k) at the Qwen3-8B shapes (docs/kernels/skinny_gemm.md):
# N tiles of at least 64 rows — the steps' interleaved A/B (draft and AR −43 µs, verify +2) chose that over the
# isolated sweep's 32-row tiles for qkv and o at M 16; down's sweep best at M 16 is the pick, (64, 128, 4).
RULE = {"qkv": ((6144, 4096), (64, 128, 2)), "o": ((4096, 4096), (64, 128, 4)),
        "gate_up": ((24576, 4096), (64, 128, 1)), "down": ((4096, 12288), (64, 128, 4)),
        "lm_head": ((151936, 4096), (128, 128, 1)), "draft_fc": ((4096, 20480), (64, 128, 4))}


@pytest.mark.parametrize("shape", RULE)
def test_config_rule_picks(shape):
    (n, k), want = RULE[shape]
    cfg = sg.gemm_config(n, k, "cuda")
    assert (cfg["block_n"], cfg["block_k"], cfg["split_k"], cfg["num_warps"], cfg["num_stages"]) == (*want, 4, 4)
    assert sg.plan(16, n, k, cfg)["PREFETCH_K"] == 256   # the row's prefetch_k: every slice is wider


@pytest.mark.parametrize("prefetch,k,split,want", [(256, 4096, 4, 256), (100, 4096, 1, 64), (48, 4096, 1, 0),
                                                   (5000, 4096, 4, 1024), (256, 96, 1, 128), (0, 4096, 1, 0)])
def test_prefetch_is_whole_lines_a_power_of_two_within_a_slice(prefetch, k, split, want):
    cfg = {"block_n": 64, "block_k": 128, "split_k": split, "prefetch_k": prefetch}
    assert sg.plan(16, 4096, k, cfg)["PREFETCH_K"] == want


def test_kernel_serves_what_it_won_in_the_sweep():
    """M ≤ 16 every shape; M 32 only the large weights (the sweep: cuBLAS wins o and qkv there); M 0 / 33 never."""
    served = {m: {s for s, ((n, k), _) in RULE.items() if sg.serves(m, n, k, "cuda")} for m in (0, 1, 16, 32, 33)}
    assert served == {0: set(), 1: set(RULE), 16: set(RULE), 32: {"gate_up", "down", "lm_head", "draft_fc"},
                      33: set()}


@pytest.mark.parametrize("m,large_m_weights,kernel", [(1, False, True), (16, False, True), (32, False, False),
                                                      (32, True, True), (33, True, False)])
def test_linear_provider_picks_kernel_or_vendor_gemm_at_run_time(monkeypatch, m, large_m_weights, kernel):
    """x [2, M/2 or M, K] with bias; the kernel writes into a NaN-filled output. large_m_weights: the table's
    min_weight_elems lowered to 0 so that a small weight is served at M 32 (in the sweep only ≥ 32 Mi elements
    were)."""
    if large_m_weights:
        monkeypatch.setitem(configs.TABLE["skinny_gemm"], "cuda",
                            {**configs.TABLE["skinny_gemm"]["cuda"], "min_weight_elems": 0})
    launched = []

    def poisoned(x2, w, bias=None):
        launched.append(x2.shape[0])
        out = torch.full((x2.shape[0], w.shape[0]), float("nan"), dtype=x2.dtype, device=x2.device)
        return sg.skinny_gemm(x2, w, out=out, bias=bias)

    monkeypatch.setattr(linear_provider, "skinny_gemm", poisoned)
    lead = (2,) if m % 2 == 0 else ()
    x, w, b = _operands(m // 2 if lead else m, 96, 512, bias=True, lead=lead)
    got = linear_provider.linear(x, w, b)
    assert launched == ([m] if kernel else [])
    assert got.shape == (*x.shape[:-1], 96) and not got.isnan().any()
    torch.testing.assert_close(got.float(), torch.nn.functional.linear(x.float(), w.float(), b.float()),
                               atol=2e-2, rtol=2e-2)


AOT_SCRIPT = """
import json, sys, torch
from torch_dflash.compiler.triton import aot, linear, skinny_gemm
fam = sys.argv[1]
specs = linear.aot_specs(fam) + [skinny_gemm.gemm_spec(torch.bfloat16, 32, 24576, 4096, bias=True, family=fam),
                                 skinny_gemm.gemm_spec(torch.bfloat16, 32, 6144, 4096, family=fam, joined=True)]
"""


def test_compiles_for_every_arch():
    """The provider's specs (Qwen3-8B shapes, 16 rows: splits 1, 2 and 4, block_n 32 to 128; the gate|up one also
    with the SwiGLU epilogue, with the norm, without, and with its deferred 1/rms; the down one storing the next
    norm's statistic), a 32-row build with bias and a 32-row joined build (the draft's context + block rows of the
    merged qkv weight), for sm_80, sm_90, gfx942 and gfx950, within each target's shared memory."""
    results = run_aot_script(AOT_SCRIPT + COMPILE_SPECS)
    assert len(results) == 4 * (9 + 2)   # 4 archs × (9 distinct provider specs: GLU, GLU + norm, deferred, stats; + 2)
    failed = {name: r for name, r in results.items() if not isinstance(r, list) or r[0] == 0}
    assert not failed, failed
    over = {name: shared for name, (_, shared) in results.items() if shared > SHARED_LIMIT[name.split("@")[1]]}
    assert not over, over


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 32])
def test_gpu_qwen3_shapes(m):
    """The Qwen3-8B shapes of the sweep with the rule's configs (K 4096 → N 24576 merged gate|up with a bias;
    K 12288 → 4096 down; K 4096 → 4096 o, split 2) and the provider on them; the gate|up SwiGLU epilogue with and
    without the norm in front; the down GEMM storing the residual sum and the next norm's statistic."""
    for n, k, bias in ((24576, 4096, True), (4096, 12288, False), (4096, 4096, False)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
        want = _reference(x, w, b).float()
        torch.testing.assert_close(sg.skinny_gemm(x, w, bias=b).float(), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(linear_provider.linear(x, w, b).float(), want, atol=2e-2, rtol=2e-2)
    half = 24576 // 2   # the merged gate|up with the SwiGLU epilogue, against the reference and the plain pair
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2 * half, 4096, device="cuda", dtype=torch.bfloat16) * 4096 ** -0.5
    y = _reference(x, w)
    got = linear_provider.linear_silu_mul(x, w, None)
    torch.testing.assert_close(got.float(), silu_mul_reference(y[:, :half], y[:, half:]).float(), atol=2e-2,
                               rtol=2e-2)
    pair = mlp.silu_mul(*sg.skinny_gemm(x, w).chunk(2, dim=-1))
    assert (got != pair).float().mean() < 1e-3   # the same bf16 y and formula: equal but for rare last-bit ties
    residual = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)   # and with the norm in front
    norm_w = 1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    got = linear_provider.add_rms_norm_linear_silu_mul(x, residual, None, 1e-6,
                                                       (w.float() * norm_w.float()).to(w.dtype), None)
    want = add_rms_norm_linear_silu_mul_reference(x, residual, norm_w, 1e-6, w, None)
    assert_norm_close(got, want)
    assert torch.equal(got[1], want[1])   # s: one rounding of the same fp32 sum on the GPU
    h = torch.randn(m, 12288, device="cuda", dtype=torch.bfloat16)   # the down GEMM storing the norm's statistic
    w_down = torch.randn(4096, 12288, device="cuda", dtype=torch.bfloat16) * 12288 ** -0.5
    got = linear_provider.linear_add_norm_stats(h, w_down, None, residual, norm_w)
    assert_stats_close(got, h, w_down, None, residual, norm_w)
    assert torch.equal(got[0], sg.skinny_gemm(h, w_down) + residual)   # the same tile, rounded alike
