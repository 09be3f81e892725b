"""dflash.qkv_norm_rope on CUDA/ROCm, by one of two paths chosen per call by token count (configs.TABLE
"qkv_gemm.*" rows, see qkv_gemm.fused_gemm_chosen):

fused_gemm:    x[B,S,H] ─ qkv_gemm_norm_rope_kernel: the merged GEMM with per-head RMSNorm → rope in registers
gemm_epilogue: x[B,S,H] ─ linear(x, w_qkv, b_qkv) (dflash.linear's GEMM: the skinny GEMM where it serves, else
                        cuBLAS / hipBLASLt) ─ proj[B·S, (n_q+2·n_kv)·hd]
                        ─ norm_rope_heads_kernel: per head, RMSNorm (q, k; fp32) → rope (q, k) → store; v copied
both           → q[B,S,n_q,hd], k/v[B,S,n_kv,hd]  or  k/v written into caches [B, n_kv, S_max, hd] at positions[B,S].
The choice is made on the concrete token count of each call (a graph with a dynamic T keeps one provider).
"""

import torch
from torch import Tensor

from ...errors import InputError
from ..providers import Provider, register
from .aot import KernelSpec
from .linear import linear
from .norm_rope import (batch_and_seq, device_reason, dtype_reason, family_of, first_reason, head_dim_reason,
                        heads_spec, launch_norm_rope_heads, rope_reason, rope_table, row_sumsq_reason, shape_reason)
from .qkv_gemm import aot_specs as gemm_aot_specs
from .qkv_gemm import fused_gemm_chosen, gemm_config, launch_qkv_gemm

PATHS = ("fused_gemm", "gemm_epilogue")


def sumsq_reason(x: Tensor, b_qkv: Tensor | None, x_sumsq: Tensor | None) -> str | None:
    """Why the epilogue cannot finish x's RMSNorm from x_sumsq (linear_add_norm_stats's sums of squares)."""
    if x_sumsq is None:
        return None
    if b_qkv is not None:
        return "the rows' 1/rms is applied after the GEMM, which adds b_qkv: a bias would be scaled with them"
    return row_sumsq_reason(x, x_sumsq)


def qkv_norm_rope_supports(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq=None,
                           x_eps=0.0) -> str | None:
    width = (n_q + 2 * n_kv) * head_dim
    return first_reason(sumsq_reason(x, b_qkv, x_sumsq),
        device_reason(x), dtype_reason(x, w_qkv=w_qkv, b_qkv=b_qkv, q_norm_w=q_norm_w, k_norm_w=k_norm_w),
        head_dim_reason(head_dim), shape_reason("w_qkv", w_qkv, (width, x.shape[-1])),
        shape_reason("b_qkv", b_qkv, (width,)), shape_reason("q_norm_w", q_norm_w, (head_dim,)),
        shape_reason("k_norm_w", k_norm_w, (head_dim,)), rope_reason(cos, sin, x.shape[:-1], head_dim, x.device))


def _unit_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _run(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, q: Tensor,
         kv_dst: tuple[Tensor, Tensor], positions: Tensor | None, path: str | None,
         row_sumsq: tuple[Tensor, float] | None = None) -> None:
    """q contiguous [..., n_q, hd]; kv_dst (k, v) each [B, S_dst, n_kv, hd] with unit last stride; row_sumsq
    (x_sumsq, x_eps): x's rows are an RMSNorm's weighted rows, finished in the epilogue (gemm_epilogue only: the
    fused kernel with the statistic in its finisher lost 124 µs per AR step, docs/kernels/skinny_gemm.md)."""
    if path not in (None, *PATHS):
        raise InputError(f"qkv_norm_rope: unknown path {path!r}; choose one of {', '.join(PATHS)}.")
    if path == "fused_gemm" and row_sumsq is not None:
        raise InputError("qkv_norm_rope: the fused_gemm path does not finish a norm from x_sumsq; use gemm_epilogue.")
    lead, hidden = x.shape[:-1], x.shape[-1]
    tokens, family = lead.numel(), family_of(x)
    cos, sin = rope_table(cos, lead), rope_table(sin, lead)
    positions = None if positions is None else positions.contiguous()
    if row_sumsq is None and (path == "fused_gemm" or (path is None and fused_gemm_chosen(x, tokens, family))):
        launch_qkv_gemm(_unit_rows(x.reshape(-1, hidden)), _unit_rows(w_qkv), b_qkv, cos, sin, q_norm_w, k_norm_w,
                        eps, n_q, n_kv, head_dim, q, kv_dst, positions, gemm_config(tokens, family))
    else:
        proj = linear(x, w_qkv, b_qkv).reshape(-1, w_qkv.shape[0])
        launch_norm_rope_heads(proj, cos, sin, q_norm_w, k_norm_w, eps, n_q, n_kv, head_dim, q,
                               (kv_dst[0].unsqueeze(0), kv_dst[1].unsqueeze(0)), positions, row_sumsq=row_sumsq)


def qkv_norm_rope(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq=None, x_eps=0.0,
                  *, out: tuple[Tensor, Tensor, Tensor] | None = None,
                  path: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The dflash.qkv_norm_rope provider; `out` = preallocated contiguous (q, k, v) of the op's output shapes;
    `path` forces "fused_gemm" or "gemm_epilogue" (default: the table's choice for this token count; with x_sumsq
    always the epilogue, which applies the rows' 1/rms)."""
    lead = x.shape[:-1]
    B, S = batch_and_seq(lead)
    q, k, v = out if out is not None else (x.new_empty(*lead, n, head_dim) for n in (n_q, n_kv, n_kv))
    _run(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, q,
         (k.view(B, S, n_kv, head_dim), v.view(B, S, n_kv, head_dim)), None, path,
         None if x_sumsq is None else (x_sumsq, x_eps))
    return q, k, v


def cache_reason(x: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, n_kv: int, head_dim: int,
                 layers: int | None = None) -> str | None:
    """Why caches [L?, B, n_kv, S_max, hd] and positions [B, S] cannot take the k/v of x [B, S, H]."""
    if x.dim() != 3:
        return f"writing into a KV cache needs x [B, S, H], got {tuple(x.shape)}"
    B, S = x.shape[:2]
    s_max = k_cache.shape[-2] if k_cache.dim() >= 2 else 0
    want = (*(() if layers is None else (layers,)), B, n_kv, s_max, head_dim)
    return first_reason(
        shape_reason("k_cache", k_cache, want), shape_reason("v_cache", v_cache, want),
        None if k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 else
        "k_cache and v_cache must have equal strides and contiguous rows",
        dtype_reason(x, k_cache=k_cache, v_cache=v_cache), shape_reason("cache_positions", positions, (B, S)),
        None if positions.dtype in (torch.int32, torch.int64) and positions.device == x.device else
        f"cache_positions must be int32/int64 on {x.device}, got {positions.dtype} on {positions.device}")


def qkv_norm_rope_into_cache(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                             k_cache: Tensor, v_cache: Tensor, cache_positions: Tensor, *,
                             q_out: Tensor | None = None, path: str | None = None) -> Tensor:
    """Like qkv_norm_rope, but k/v go straight into caches [B, n_kv, S_max, hd] at slot cache_positions[b, s]
    (positions outside [0, S_max) are skipped); returns q [B, S, n_q, hd]."""
    why = first_reason(qkv_norm_rope_supports(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv,
                                              head_dim),
                       cache_reason(x, k_cache, v_cache, cache_positions, n_kv, head_dim))
    if why is not None:
        raise InputError(f"qkv_norm_rope_into_cache: {why}.")
    q = x.new_empty(*x.shape[:-1], n_q, head_dim) if q_out is None else q_out
    _run(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, q,
         (k_cache.transpose(1, 2), v_cache.transpose(1, 2)), cache_positions, path)
    return q


def qkv_norm_rope_cache_supports(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                                 k_cache, v_cache, cache_positions, x_sumsq=None, x_eps=0.0) -> str | None:
    return first_reason(
        qkv_norm_rope_supports(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq),
        cache_reason(x, k_cache[: x.shape[0]], v_cache[: x.shape[0]], cache_positions, n_kv, head_dim))


def qkv_norm_rope_cache(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                        k_cache, v_cache, cache_positions, x_sumsq=None, x_eps=0.0) -> Tensor:
    """The dflash.qkv_norm_rope_cache provider: x's batch rows are the caches' first rows; with x_sumsq the GEMM
    reads the weighted rows and the epilogue applies their 1/rms. The lowering checked
    qkv_norm_rope_cache_supports; like the qkv_norm_rope provider, the call does not check again."""
    rows, q = x.shape[0], x.new_empty(*x.shape[:-1], n_q, head_dim)
    _run(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, q,
         (k_cache[:rows].transpose(1, 2), v_cache[:rows].transpose(1, 2)), cache_positions, None,
         None if x_sumsq is None else (x_sumsq, x_eps))
    return q


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16, head_dim 128, full rotary, `family`'s launch configs. gemm_epilogue (its GEMM: linear.aot_specs): q/k
    norm into plain outputs and into caches (also finishing the rows' RMSNorm of width 4096), no norm into caches.
    fused_gemm: qkv_gemm.aot_specs (q/k norm, plain and into caches, per fused table row)."""
    return [heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=False, family=family),
            heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=True, family=family),
            heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=True, family=family,
                       stats_width=4096),
            heads_spec(torch.bfloat16, 128, 128, q_norm=False, k_norm=False, cache=True, family=family),
            *gemm_aot_specs(family)]


register(Provider("qkv_norm_rope", "triton", ("cuda", "rocm"), qkv_norm_rope, priority=10,
                  supports=qkv_norm_rope_supports, traceable=True))
register(Provider("qkv_norm_rope_cache", "triton", ("cuda", "rocm"), qkv_norm_rope_cache, priority=10,
                  supports=qkv_norm_rope_cache_supports, traceable=True))
