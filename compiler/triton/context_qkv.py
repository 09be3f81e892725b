"""dflash.context_qkv_norm_rope_cache on CUDA/ROCm: the draft's context and block rows through one weight stream.

ctx[B,C,H], x[B,S,H] ─┬─ B·(C+S) ≤ 32, bf16/fp16: skinny_gemm.launch_joined(ctx, x, w_qkv, b_qkv)  (each
                      │                           row's tile from ctx or x: no cat)
                      └─ otherwise: linear(cat([ctx, x], 1), w_qkv, b_qkv)
                      ─ proj[B·(C+S), (n_q+2·n_kv)·hd] ─ norm_rope_heads_kernel with front = C: k/v of every row
                        into the caches at cache_positions, q of the block rows only → q[B,S,n_q,hd]
Before (kv_materialize_cache + qkv_norm_rope_cache) the k|v rows of w_qkv were read twice per draft layer — by
the context's GEMM and by the block's — in two GEMM and two epilogue launches; now once, in one of each. The
joined skinny GEMM serves every weight up to 32 rows (not only those `linear` routes to it at 17–32 rows): its
alternative here is a cat launch plus the vendor GEMM, which at 32 rows of the merged qkv weight measured no faster
than the kernel (docs/kernels/skinny_gemm.md).
"""

import torch
from torch import Tensor

from ..providers import Provider, register
from .aot import KernelSpec
from .linear import linear
from .norm_rope import first_reason, heads_spec, launch_norm_rope_heads, rope_reason, rope_table
from .qkv_norm_rope import cache_reason, qkv_norm_rope_supports
from .skinny_gemm import gemm_spec, launch_joined, unsupported


def context_qkv_norm_rope_cache_supports(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv,
                                         head_dim, k_cache, v_cache, cache_positions, x_sumsq=None,
                                         x_eps=0.0) -> str | None:
    if ctx.dim() != 3 or x.dim() != 3 or ctx.shape[0] != x.shape[0] or ctx.shape[2] != x.shape[2]:
        return f"ctx and x must be [B, C, H] and [B, S, H], got {tuple(ctx.shape)} and {tuple(x.shape)}"
    if ctx.dtype != x.dtype or ctx.device != x.device:
        return "ctx and x must share dtype and device"
    joined = x[:, :1].expand(-1, ctx.shape[1] + x.shape[1], -1)  # a view of the joined rows' shape
    return first_reason(
        rope_reason(cos, sin, joined.shape[:-1], head_dim, x.device),
        qkv_norm_rope_supports(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos[..., ctx.shape[1]:, :],
                               sin[..., ctx.shape[1]:, :], n_q, n_kv, head_dim, x_sumsq),
        cache_reason(joined, k_cache[: x.shape[0]], v_cache[: x.shape[0]], cache_positions, n_kv, head_dim))


def context_qkv_norm_rope_cache(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                                k_cache, v_cache, cache_positions, x_sumsq=None, x_eps=0.0) -> Tensor:
    """The dflash.context_qkv_norm_rope_cache provider: the batch rows are the caches' first rows; with x_sumsq
    the block rows' RMSNorm is finished in the epilogue. The lowering checked context_qkv_norm_rope_cache_supports;
    the call does not check again."""
    batch, front, rows = x.shape[0], ctx.shape[1], ctx.shape[1] + x.shape[1]
    if unsupported(x, w_qkv, b_qkv, front=ctx) is None:
        proj = launch_joined(ctx, x, w_qkv, b_qkv)
    else:
        proj = linear(torch.cat([ctx, x], 1), w_qkv, b_qkv).reshape(batch * rows, -1)
    q = x.new_empty(*x.shape[:-1], n_q, head_dim)
    lead = torch.Size((batch, rows))
    launch_norm_rope_heads(proj, rope_table(cos, lead), rope_table(sin, lead), q_norm_w, k_norm_w, eps, n_q, n_kv,
                           head_dim, q, (k_cache[None, :batch].transpose(2, 3), v_cache[None, :batch].transpose(2, 3)),
                           cache_positions, front=front, row_sumsq=None if x_sumsq is None else (x_sumsq, x_eps))
    return q


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16, head_dim 128, full rotary, `family`'s launch configs: the joined GEMM for 32 rows of the Qwen3-8B
    draft's merged qkv weight (a 16-token context and block) and the epilogue with q/k norms, context rows in front
    of blocks of up to 16 tokens, with and without finishing the block rows' RMSNorm (width 4096)."""
    return [gemm_spec(torch.bfloat16, 32, 6144, 4096, family=family, joined=True),
            heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=True, family=family, block_j=16),
            heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=True, family=family, block_j=16,
                       stats_width=4096)]


register(Provider("context_qkv_norm_rope_cache", "triton", ("cuda", "rocm"), context_qkv_norm_rope_cache,
                  priority=10, supports=context_qkv_norm_rope_cache_supports, traceable=True))
