"""dflash.kv_materialize (and _cache) on CUDA/ROCm, per layer and for all draft layers at once.

Per layer:  ctx[B,C,H] ─ linear(ctx, w_kv, b_kv) ─ norm_rope_heads_kernel with n_q = 0 (k-norm, k-rope, v copy)
            into fresh k/v, or (kv_materialize_cache) into the caches' rows at cache_positions.
All layers: ONE GEMM over the stacked weights viewed as [L·2·n_kv·hd, H] ─ proj[B·C, L·2·n_kv·hd]
            ─ ONE epilogue launch, grid (token blocks, 2·n_kv heads, L) → k/v [L, B, C, n_kv, hd] or straight
            into stacked caches [L, B, n_kv, S_max, hd] at cache_positions[B, C].
The GEMM is dflash.linear's (linear.py): the skinny GEMM for the few context rows of a decode turn, else the
vendor's.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ...errors import InputError
from ..providers import Provider, register
from .aot import KernelSpec
from .linear import linear
from .norm_rope import (batch_and_seq, device_reason, dtype_reason, first_reason, head_dim_reason, heads_spec,
                        launch_norm_rope_heads, rope_reason, rope_table, shape_reason)
from .qkv_norm_rope import cache_reason


def kv_materialize_supports(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim) -> str | None:
    width = 2 * n_kv * head_dim
    return first_reason(
        device_reason(ctx), dtype_reason(ctx, w_kv=w_kv, b_kv=b_kv, k_norm_w=k_norm_w), head_dim_reason(head_dim),
        shape_reason("w_kv", w_kv, (width, ctx.shape[-1])), shape_reason("b_kv", b_kv, (width,)),
        shape_reason("k_norm_w", k_norm_w, (head_dim,)), rope_reason(cos, sin, ctx.shape[:-1], head_dim, ctx.device))


def _launch(proj: Tensor, ctx: Tensor, k_norm_w, eps, cos, sin, n_kv, head_dim, kv_dst, positions=None) -> None:
    lead = ctx.shape[:-1]
    launch_norm_rope_heads(proj, rope_table(cos, lead), rope_table(sin, lead), None, k_norm_w, eps, 0, n_kv,
                           head_dim, None, kv_dst, positions)


def kv_materialize(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, *,
                   out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The dflash.kv_materialize provider; `out` = preallocated contiguous (k, v) [..., n_kv, hd]."""
    lead = ctx.shape[:-1]
    B, S = batch_and_seq(lead)
    k, v = out if out is not None else (ctx.new_empty(*lead, n_kv, head_dim) for _ in range(2))
    proj = linear(ctx, w_kv, b_kv).reshape(-1, w_kv.shape[0])
    _launch(proj, ctx, k_norm_w, eps, cos, sin, n_kv, head_dim,
            (k.view(1, B, S, n_kv, head_dim), v.view(1, B, S, n_kv, head_dim)))
    return k, v


def kv_materialize_cache_supports(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, k_cache, v_cache,
                                  cache_positions) -> str | None:
    return first_reason(
        kv_materialize_supports(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim),
        cache_reason(ctx, k_cache[: ctx.shape[0]], v_cache[: ctx.shape[0]], cache_positions, n_kv, head_dim))


def kv_materialize_cache(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, k_cache, v_cache,
                         cache_positions) -> None:
    """The dflash.kv_materialize_cache provider: ctx's batch rows are the caches' first rows. The lowering checked
    kv_materialize_cache_supports; the call does not check again."""
    rows = ctx.shape[0]
    proj = linear(ctx, w_kv, b_kv).reshape(-1, w_kv.shape[0])
    _launch(proj, ctx, k_norm_w, eps, cos, sin, n_kv, head_dim,
            (k_cache[None, :rows].transpose(2, 3), v_cache[None, :rows].transpose(2, 3)), cache_positions)


def stacked(caches: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """A stacked cache [L, B, n_kv, S_max, hd] as given, or rebuilt (as a view) from per-layer views of one."""
    if isinstance(caches, Tensor):
        return caches
    first = caches[0]
    step = caches[1].data_ptr() - first.data_ptr() if len(caches) > 1 else 0
    one_stack = step % first.element_size() == 0 and all(
        c.shape == first.shape and c.stride() == first.stride() and c.dtype == first.dtype
        and c.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and c.data_ptr() - first.data_ptr() == i * step for i, c in enumerate(caches))
    if not one_stack:
        raise InputError(f"kv_materialize_layers: the per-layer {name} must be equally spaced views of one stacked "
                         f"[L, B, n_kv, S_max, hd] tensor (e.g. stacked.unbind(0)).")
    return first.as_strided((len(caches), *first.shape), (step // first.element_size(), *first.stride()))


def kv_materialize_layers(ctx: Tensor, w_kv_stacked: Tensor, k_norm_w_stacked: Tensor | None, eps: float,
                          cos: Tensor, sin: Tensor, n_kv: int, head_dim: int,
                          k_caches: Tensor | Sequence[Tensor] | None = None,
                          v_caches: Tensor | Sequence[Tensor] | None = None,
                          cache_positions: Tensor | None = None, *,
                          out: tuple[Tensor, Tensor] | None = None):
    """kv_materialize for all L draft layers in one GEMM and one epilogue launch.

    w_kv_stacked [L, 2·n_kv·hd, H] contiguous; k_norm_w_stacked [L, hd] or None. Without caches returns
    (k, v) [L, *ctx.shape[:-1], n_kv, hd] (or fills `out`); with caches (stacked [L, B, n_kv, S_max, hd] or a
    sequence of per-layer views of one) writes slot cache_positions[b, s] of every layer and returns the caches.
    """
    layers, width = w_kv_stacked.shape[0], 2 * n_kv * head_dim
    why = first_reason(
        kv_materialize_supports(ctx, w_kv_stacked[0], None, None, eps, cos, sin, n_kv, head_dim),
        shape_reason("w_kv_stacked", w_kv_stacked, (layers, width, ctx.shape[-1])),
        None if w_kv_stacked.is_contiguous() else "w_kv_stacked must be contiguous (stack the weights once at load)",
        dtype_reason(ctx, k_norm_w_stacked=k_norm_w_stacked),
        shape_reason("k_norm_w_stacked", k_norm_w_stacked, (layers, head_dim)),
        None if (k_caches is None) == (v_caches is None) == (cache_positions is None) else
        "k_caches, v_caches and cache_positions go together")
    kv_dst = None
    if why is None and k_caches is not None:
        k_caches, v_caches = stacked(k_caches, "k_caches"), stacked(v_caches, "v_caches")
        why = cache_reason(ctx, k_caches, v_caches, cache_positions, n_kv, head_dim, layers)
        kv_dst = (k_caches.transpose(2, 3), v_caches.transpose(2, 3))
    if why is not None:
        raise InputError(f"kv_materialize_layers: {why}.")
    if kv_dst is None:
        lead = ctx.shape[:-1]
        B, S = batch_and_seq(lead)
        k, v = out if out is not None else (ctx.new_empty(layers, *lead, n_kv, head_dim) for _ in range(2))
        kv_dst = (k.view(layers, B, S, n_kv, head_dim), v.view(layers, B, S, n_kv, head_dim))
    proj = linear(ctx, w_kv_stacked.view(layers * width, -1), None).reshape(-1, layers * width)
    _launch(proj, ctx, k_norm_w_stacked, eps, cos, sin, n_kv, head_dim, kv_dst, cache_positions)
    return (k_caches, v_caches) if k_caches is not None else (k, v)


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16, head_dim 128, full rotary, n_q = 0, `family`'s launch config: k-norm into caches; no norm into
    plain outputs (the per-layer op and kv_materialize_layers launch the same compiled kernel)."""
    return [heads_spec(torch.bfloat16, 128, 128, q_norm=False, k_norm=True, cache=True, family=family),
            heads_spec(torch.bfloat16, 128, 128, q_norm=False, k_norm=False, cache=False, family=family)]


register(Provider("kv_materialize", "triton", ("cuda", "rocm"), kv_materialize, priority=10,
                  supports=kv_materialize_supports, traceable=True))
register(Provider("kv_materialize_cache", "triton", ("cuda", "rocm"), kv_materialize_cache, priority=10,
                  supports=kv_materialize_cache_supports, traceable=True))
