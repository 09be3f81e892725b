"""dflash.linear — y = x @ wᵀ (+ b), nn.Linear's formula, as an op of its own; dflash.linear_silu_mul — the
merged gate|up linear with SwiGLU's product of its two halves; dflash.add_rms_norm_linear_silu_mul — that op on the
RMSNorm of a residual sum, the sum returned too (a decoder layer's post-attention norm and its MLP's first GEMM);
dflash.linear_add_norm_stats — a linear, the residual add after it, and the next RMSNorm's weighted rows and sums of
squares, its statistic left for the projection that reads the rows (a layer's down GEMM and the next layer's norm).

passes/weight_linears.py gives dflash.linear the decode-sized projections whose weight is a constant (o_proj, the
merged gate|up, down, lm_head, the draft's fc), so that the lowering can pick a weight-streaming kernel for them
(Triton: compiler/triton/linear.py) where the vendor GEMM leaves bandwidth unused; everywhere else it is F.linear.
passes/linear_silu_mul.py then joins the gate|up linear with the silu_mul of its halves, so that the kernel can
apply the product in its epilogue and the [.., 2·I] output is never stored; passes/add_rms_norm_linear_silu_mul.py
gives it the add_rms_norm in front, so that the same GEMM normalizes its input rows while it streams the weight;
passes/deferred_rms_norm.py gives a down linear the add_rms_norm after it when the norm feeds the next qkv projection,
which finishes the norm (dflash.qkv_norm_rope_cache's x_sumsq), and an o linear the add_rms_norm after it when the
norm feeds the gate|up GEMM (dflash.linear_silu_mul's x_sumsq).
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

from .mlp import silu_mul_reference
from .norm_rope import add_rms_norm_reference


def _check(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, w.dim() == 2, lambda: f"linear: w must be [N, K], got {tuple(w.shape)}.")
    torch._check_with(InputError, x.shape[-1] == w.shape[-1],
                      lambda: f"linear: x has {x.shape[-1]} features but w {tuple(w.shape)} takes {w.shape[-1]}.")
    if b is not None:
        torch._check_with(InputError, b.dim() == 1 and b.shape[0] == w.shape[0],
                          lambda: f"linear: b must be [{w.shape[0]}], got {tuple(b.shape)}.")


def linear_reference(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear: x [..., K] @ w [N, K]ᵀ (+ b [N]) → [..., N] in x's dtype."""
    _check(x, w, b)
    return torch.nn.functional.linear(x, w, b)


@torch.library.custom_op("dflash::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return linear_reference(x, w, b)


@linear.register_fake
def _(x, w, b):
    _check(x, w, b)
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _check_halves(w: Tensor) -> None:
    if isinstance(w, torch.fx.Proxy):
        return
    torch._check_with(InputError, w.dim() == 2 and w.shape[0] % 2 == 0,
                      lambda: f"linear_silu_mul: w must be [gate; up] [2·I, K], got {tuple(w.shape)}.")


def linear_silu_mul_reference(x: Tensor, w: Tensor, b: Tensor | None, x_sumsq: Tensor | None = None,
                              x_eps: float = 0.0) -> Tensor:
    """y = F.linear(x, w, b) in x's dtype (w = [gate; up] [2·I, K]), then silu_mul(y[..., :I], y[..., I:]). With
    x_sumsq (linear_add_norm_stats's), x holds an RMSNorm's weighted rows, finished first (finish_rms_norm)."""
    _check_halves(w)
    gate, up = linear_reference(finish_rms_norm(x, x_sumsq, x_eps), w, b).chunk(2, dim=-1)
    return silu_mul_reference(gate, up)


@torch.library.custom_op("dflash::linear_silu_mul", mutates_args=())
def linear_silu_mul(x: Tensor, w: Tensor, b: Tensor | None, x_sumsq: Tensor | None = None,
                    x_eps: float = 0.0) -> Tensor:
    return linear_silu_mul_reference(x, w, b, x_sumsq, x_eps)


@linear_silu_mul.register_fake
def _(x, w, b, x_sumsq=None, x_eps=0.0):
    _check(x, w, b)
    _check_halves(w)
    check_sumsq(x, x_sumsq)
    return x.new_empty(*x.shape[:-1], w.shape[0] // 2)


def add_rms_norm_linear_silu_mul_reference(x: Tensor, residual: Tensor, norm_w: Tensor | None, eps: float, w: Tensor,
                                           b: Tensor | None) -> tuple[Tensor, Tensor]:
    """(linear_silu_mul(rms_norm(s, norm_w, eps), w, b), s) with s = x + residual in x's dtype: add_rms_norm, then
    linear_silu_mul of its normed output."""
    normed, total = add_rms_norm_reference(x, residual, norm_w, eps)
    return linear_silu_mul_reference(normed, w, b), total


@torch.library.custom_op("dflash::add_rms_norm_linear_silu_mul", mutates_args=())
def add_rms_norm_linear_silu_mul(x: Tensor, residual: Tensor, norm_w: Tensor | None, eps: float, w: Tensor,
                                 b: Tensor | None) -> tuple[Tensor, Tensor]:
    return add_rms_norm_linear_silu_mul_reference(x, residual, norm_w, eps, w, b)


@add_rms_norm_linear_silu_mul.register_fake
def _(x, residual, norm_w, eps, w, b):
    _check(x, w, b)
    _check_halves(w)
    return x.new_empty(*x.shape[:-1], w.shape[0] // 2), torch.empty_like(x, memory_format=torch.contiguous_format)


SUMSQ_COLUMNS = 64  # linear_add_norm_stats sums s² over groups of this many columns


def _check_stats(x: Tensor, w: Tensor, residual: Tensor, norm_w: Tensor | None) -> None:
    if isinstance(x, torch.fx.Proxy):
        return
    n = w.shape[0]
    torch._check_with(InputError, n % SUMSQ_COLUMNS == 0,
                      lambda: f"linear_add_norm_stats: w has {n} rows, not a multiple of {SUMSQ_COLUMNS}.")
    torch._check_with(InputError, tuple(residual.shape) == (*x.shape[:-1], n) and residual.dtype == x.dtype,
                      lambda: f"linear_add_norm_stats: the residual must be {(*x.shape[:-1], n)} in {x.dtype}, got "
                              f"{tuple(residual.shape)} in {residual.dtype}.")
    torch._check_with(InputError, norm_w is None or tuple(norm_w.shape) == (n,),
                      lambda: f"linear_add_norm_stats: norm_w must be [{n}], got {tuple(norm_w.shape)}.")


def linear_add_norm_stats_reference(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor,
                                    norm_w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(s, s_w, sumsq) for s = linear(x, w, b) + residual in x's dtype (each rounded, as the two ops were): s_w =
    s · norm_w in x's dtype (a copy of s without a weight), sumsq [..., N / 64] fp32 the sums of s² over each
    group of 64 columns. rms_norm(s, norm_w, eps) = s_w · rsqrt(Σ sumsq / N + eps) up to one rounding — what a
    projection given x_sumsq finishes."""
    _check(x, w, b)
    _check_stats(x, w, residual, norm_w)
    total = (linear_reference(x, w, b) + residual).contiguous()
    exact = total.float()
    weighted = total.clone() if norm_w is None else (exact * norm_w.float()).to(x.dtype)
    return total, weighted, exact.pow(2).unflatten(-1, (-1, SUMSQ_COLUMNS)).sum(-1)


@torch.library.custom_op("dflash::linear_add_norm_stats", mutates_args=())
def linear_add_norm_stats(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor,
                          norm_w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return linear_add_norm_stats_reference(x, w, b, residual, norm_w)


@linear_add_norm_stats.register_fake
def _(x, w, b, residual, norm_w):
    _check(x, w, b)
    _check_stats(x, w, residual, norm_w)
    lead, n = x.shape[:-1], w.shape[0]
    return (x.new_empty(*lead, n), x.new_empty(*lead, n),
            x.new_empty(*lead, n // SUMSQ_COLUMNS, dtype=torch.float32))


def check_sumsq(x: Tensor, x_sumsq: Tensor | None) -> None:
    """x_sumsq, when given, holds one sum of squares per 64 columns of each of x's rows."""
    if x_sumsq is None or isinstance(x, torch.fx.Proxy):
        return
    want = (*x.shape[:-1], x.shape[-1] // SUMSQ_COLUMNS)
    torch._check_with(InputError, x.shape[-1] % SUMSQ_COLUMNS == 0 and tuple(x_sumsq.shape) == want,
                      lambda: f"x_sumsq must be {want} for x {tuple(x.shape)} (one sum per {SUMSQ_COLUMNS} "
                              f"columns), got {tuple(x_sumsq.shape)}.")


def finish_rms_norm(x: Tensor, x_sumsq: Tensor | None, x_eps: float) -> Tensor:
    """x · rsqrt(Σ x_sumsq / H + x_eps) in x's dtype, x [..., H] the weighted rows and x_sumsq [..., H / 64] the
    sums of squares of a linear_add_norm_stats (x itself when x_sumsq is None)."""
    check_sumsq(x, x_sumsq)
    if x_sumsq is None:
        return x
    scale = torch.rsqrt(x_sumsq.float().sum(-1, keepdim=True) / x.shape[-1] + x_eps)
    return (x.float() * scale).to(x.dtype)
