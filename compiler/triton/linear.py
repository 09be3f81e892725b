"""dflash.linear and dflash.linear_silu_mul on CUDA/ROCm: the split-K skinny GEMM (skinny_gemm.py) for the token
counts it serves, else the vendor GEMM — one branch on the run-time row count, here and nowhere in the models.

x[..., K] ─ rows M = Π lead ─┬─ skinny_gemm.serves(M, N, K): skinny_gemm_kernel(x[M, K], w, b) ─▶ y[..., N]
                             └─ otherwise (prefill, fp32 …):  F.linear(x, w, b) (cuBLAS / hipBLASLt)
linear_silu_mul (w = [gate; up] [2·I, K]): served rows → skinny_gemm_kernel with the SwiGLU product in its
epilogue (GLU; with x_sumsq each row scaled by its norm's 1/rms first, DEFERRED) ─▶ h[..., I]; otherwise the norm
finished (finish_rms_norm), the linear above, then silu_mul_kernel over its halves.
add_rms_norm_linear_silu_mul: served rows (bf16/fp16, the norm's weight folded into w) → the same kernel normalizing
x + residual as it streams w (NORM: one K slice per program), s stored beside ─▶ (h, s); otherwise add_rms_norm,
then the above.
linear_add_norm_stats: served rows → the same kernel adding the residual where it stores the tile, with the norm's
weighted rows and the sums of squares per 64 columns beside (STATS) ─▶ (s, s_w, sumsq); otherwise F.linear, then
rms_norm_rows_kernel storing the same three (STATS).
"""

import math

import torch
from torch import Tensor

from ..ops.linear import finish_rms_norm
from ..ops.mlp import silu_mul_reference
from ..providers import Provider, register
from .aot import KernelSpec
from .norm_rope import (add_norm_stats, add_rms_norm, add_rms_norm_supports, device_reason, dtype_reason, family_of,
                        first_reason, row_sumsq_reason, shape_reason)
from .mlp import silu_mul, silu_mul_supports
from .skinny_gemm import gemm_spec, serves, skinny_gemm, skinny_gemm_add_stats, skinny_gemm_glu, skinny_gemm_glu_norm

# Qwen3-8B (H 4096, inter 12288, vocab 151936) and its 5-layer DFlash draft's fc: o, gate|up, down, lm_head, fc;
# the GEMMs of qkv_norm_rope's and kv_materialize's epilogue paths: merged qkv, one layer's k|v, 5 layers' k|v
GATE_UP = (24576, 4096)
AOT_SHAPES = ((4096, 4096), GATE_UP, (4096, 12288), (151936, 4096), (4096, 20480), (6144, 4096),
              (2048, 4096), (10240, 4096))


def linear_supports(x: Tensor, w: Tensor, b: Tensor | None) -> str | None:
    rows = math.prod(x.shape[:-1])  # stays symbolic (torch.Size.numel() would specialize a dynamic token dim)
    return first_reason(
        device_reason(x),
        None if x.dtype in (torch.bfloat16, torch.float16) else f"the skinny GEMM takes bf16/fp16, not {x.dtype}",
        dtype_reason(x, w=w, b=b),
        None if w.dim() == 2 else f"w must be [N, K], got {tuple(w.shape)}",
        None if not isinstance(rows, int) or serves(rows, w.shape[0], w.shape[-1], family_of(x)) else
        f"{rows} token rows: the vendor GEMM serves this shape (configs.TABLE['skinny_gemm'])")


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The dflash.linear provider (and the GEMM of the qkv / kv epilogue paths): skinny_gemm for bf16/fp16 when
    skinny_gemm.serves the run-time row count, else F.linear."""
    (n, k), lead = w.shape, x.shape[:-1]
    rows = lead.numel()
    if x.dtype not in (torch.bfloat16, torch.float16) or not serves(rows, n, k, family_of(x)):
        return torch.nn.functional.linear(x, w, b)
    return skinny_gemm(x.reshape(rows, k), w, bias=b).view(*lead, n)


def linear_silu_mul_supports(x: Tensor, w: Tensor, b: Tensor | None, x_sumsq: Tensor | None = None,
                              x_eps: float = 0.0) -> str | None:
    return first_reason(
        device_reason(x), dtype_reason(x, w=w, b=b),
        None if w.dim() == 2 and w.shape[0] % 2 == 0 else f"w must be [gate; up] [2·I, K], got {tuple(w.shape)}",
        row_sumsq_reason(x, x_sumsq))


def linear_silu_mul(x: Tensor, w: Tensor, b: Tensor | None, x_sumsq: Tensor | None = None,
                    x_eps: float = 0.0) -> Tensor:
    """The dflash.linear_silu_mul provider: the skinny GEMM with the product in its epilogue (and, with x_sumsq,
    each row's 1/rms applied to the product) where `linear` would launch the skinny GEMM, else the norm finished,
    `linear` and then silu_mul_kernel (the reference's product for an activation dtype silu_mul_kernel does not
    take)."""
    (n, k), lead = w.shape, x.shape[:-1]
    rows = lead.numel()
    if x.dtype in (torch.bfloat16, torch.float16) and serves(rows, n, k, family_of(x)):
        sumsq = None if x_sumsq is None else x_sumsq.reshape(rows, k // 64)
        return skinny_gemm_glu(x.reshape(rows, k), w, bias=b, x_sumsq=sumsq, x_eps=x_eps).view(*lead, n // 2)
    gate, up = linear(finish_rms_norm(x, x_sumsq, x_eps), w, b).chunk(2, dim=-1)
    return silu_mul(gate, up) if silu_mul_supports(gate, up) is None else silu_mul_reference(gate, up)


def add_rms_norm_linear_silu_mul_supports(x: Tensor, residual: Tensor, norm_w: Tensor | None, eps: float, w: Tensor,
                                          b: Tensor | None) -> str | None:
    return first_reason(linear_silu_mul_supports(x, w, b), add_rms_norm_supports(x, residual, norm_w, eps))


def add_rms_norm_linear_silu_mul(x: Tensor, residual: Tensor, norm_w: Tensor | None, eps: float, w: Tensor,
                                 b: Tensor | None) -> tuple[Tensor, Tensor]:
    """The dflash.add_rms_norm_linear_silu_mul provider: the skinny GEMM normalizing its input rows where
    `linear_silu_mul` would launch the skinny GEMM and the norm has no weight (the pass folds a constant one into
    w); else add_rms_norm's kernel (supports() asked it), then `linear_silu_mul`."""
    (n, k), lead = w.shape, x.shape[:-1]
    rows = lead.numel()
    if norm_w is None and x.dtype in (torch.bfloat16, torch.float16) and serves(rows, n, k, family_of(x)):
        h, total = skinny_gemm_glu_norm(x.reshape(rows, k), residual.reshape(rows, k), eps, w, b)
        return h.view(*lead, n // 2), total.view(x.shape)
    normed, total = add_rms_norm(x, residual, norm_w, eps)
    return linear_silu_mul(normed, w, b), total


def linear_add_norm_stats_supports(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor,
                                   norm_w: Tensor | None) -> str | None:
    n = w.shape[0] if w.dim() == 2 else -1
    return first_reason(
        device_reason(x), dtype_reason(x, w=w, b=b, residual=residual, norm_w=norm_w),
        None if w.dim() == 2 and n % 64 == 0 else f"w must be [N, K] with N a multiple of 64, got {tuple(w.shape)}",
        shape_reason("residual", residual, (*x.shape[:-1], n)), shape_reason("norm_w", norm_w, (n,)))


def linear_add_norm_stats(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor,
                          norm_w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The dflash.linear_add_norm_stats provider: the skinny GEMM storing the three outputs where `linear` would
    launch it, else `linear` and rms_norm_rows_kernel's STATS form."""
    (n, k), lead = w.shape, x.shape[:-1]
    rows = lead.numel()
    if x.dtype in (torch.bfloat16, torch.float16) and serves(rows, n, k, family_of(x)):
        total, weighted, sumsq = skinny_gemm_add_stats(x.reshape(rows, k), w, b, residual.reshape(rows, n), norm_w)
        return total.view(*lead, n), weighted.view(*lead, n), sumsq.view(*lead, n // 64)
    return add_norm_stats(linear(x, w, b), residual, w.new_ones(n) if norm_w is None else norm_w)


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16, up to 16 rows (a 16-token block at batch 1), no bias, the launches gemm_config picks for AOT_SHAPES,
    and the merged gate|up one with the SwiGLU epilogue, with and without the norm in front or its deferred 1/rms,
    and the down one storing the residual sum and the next norm's statistic."""
    specs = [gemm_spec(torch.bfloat16, 16, n, k, family=family) for n, k in AOT_SHAPES]
    specs.append(gemm_spec(torch.bfloat16, 16, *GATE_UP, family=family, glu=True))
    specs.append(gemm_spec(torch.bfloat16, 16, *GATE_UP, family=family, glu=True, norm=True))
    specs.append(gemm_spec(torch.bfloat16, 16, *GATE_UP, family=family, glu=True, deferred=True))
    specs.append(gemm_spec(torch.bfloat16, 16, 4096, 12288, family=family, stats=True))
    return list({spec.name: spec for spec in specs}.values())


register(Provider("linear", "triton", ("cuda", "rocm"), linear, priority=10, supports=linear_supports, traceable=True))
register(Provider("linear_silu_mul", "triton", ("cuda", "rocm"), linear_silu_mul, priority=10,
                  supports=linear_silu_mul_supports, traceable=True))
register(Provider("add_rms_norm_linear_silu_mul", "triton", ("cuda", "rocm"), add_rms_norm_linear_silu_mul,
                  priority=10, supports=add_rms_norm_linear_silu_mul_supports, traceable=True))
register(Provider("linear_add_norm_stats", "triton", ("cuda", "rocm"), linear_add_norm_stats, priority=10,
                  supports=linear_add_norm_stats_supports, traceable=True))
