"""dflash.linear — y = x @ wᵀ (+ b), nn.Linear's formula, as an op of its own; dflash.linear_silu_mul — the
merged gate|up linear with SwiGLU's product of its two halves; dflash.add_rms_norm_linear_silu_mul — that op on the
RMSNorm of a residual sum, the sum returned too (a decoder layer's post-attention norm and its MLP's first GEMM).

passes/weight_linears.py gives dflash.linear the decode-sized projections whose weight is a constant (o_proj, the
merged gate|up, down, lm_head, the draft's fc), so that the lowering can pick a weight-streaming kernel for them
(Triton: compiler/triton/linear.py) where the vendor GEMM leaves bandwidth unused; everywhere else it is F.linear.
passes/linear_silu_mul.py then joins the gate|up linear with the silu_mul of its halves, so that the kernel can
apply the product in its epilogue and the [.., 2·I] output is never stored; passes/add_rms_norm_linear_silu_mul.py
gives it the add_rms_norm in front, so that the same GEMM normalizes its input rows while it streams the weight.
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


def linear_silu_mul_reference(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """y = F.linear(x, w, b) in x's dtype (w = [gate; up] [2·I, K]), then silu_mul(y[..., :I], y[..., I:])."""
    _check_halves(w)
    gate, up = linear_reference(x, w, b).chunk(2, dim=-1)
    return silu_mul_reference(gate, up)


@torch.library.custom_op("dflash::linear_silu_mul", mutates_args=())
def linear_silu_mul(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return linear_silu_mul_reference(x, w, b)


@linear_silu_mul.register_fake
def _(x, w, b):
    _check(x, w, b)
    _check_halves(w)
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
