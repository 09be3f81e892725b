"""dflash.qkv_norm_rope, dflash.kv_materialize and their cache-writing forms — projection + per-head RMSNorm + rope
in one op.

qkv_norm_rope:  x[B,S,H] ─ x@w_qkvᵀ(+b) ─ split q|k|v ─ per-head rms_norm(q), rms_norm(k) ─ rope(q), rope(k)
qkv_norm_rope_cache: the same, k and v written into k_cache/v_cache [B_max, n_kv, S_max, hd] at
                cache_positions [B, S] (row b of x into cache row b) instead of returned; returns q
kv_materialize: the draft's context path: ctx[B,C,H] ─ ctx@w_kvᵀ(+b) ─ split k|v ─ rms_norm(k) ─ rope(k)
kv_materialize_cache: the same, k and v written into k_cache/v_cache at cache_positions [B, C]; returns nothing
context_qkv_norm_rope_cache: the draft's [context ; block] rows through ONE projection when the context's k|v
                weights are the block's (z-lab's draft: k_proj(ctx), k_proj(x)) — kv_materialize_cache(ctx, the k|v
                rows of w_qkv, …, cos/sin/cache_positions[:, :C]) then qkv_norm_rope_cache(x, …, [:, C:]); returns
                the block's q [B, S, n_q, hd] (a slot both halves name keeps the block's k/v)
Norm weights are optional (Llama has none); eps is shared by q and k (a pass refuses to fuse otherwise).
qkv_norm_rope and the cache-writing forms take x_sumsq [B, S, H / 64] (with x_eps): x then holds the weighted rows of
an RMSNorm whose statistic is not applied yet (dflash.linear_add_norm_stats) and the op projects
x · rsqrt(Σ x_sumsq / H + x_eps)   (x_eps the norm's eps; eps stays the q/k norms').
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

from .linear import check_sumsq, finish_rms_norm
from .norm_rope import rms_norm_reference, rope_reference


def _norm_rope(t: Tensor, norm_w: Tensor | None, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    if norm_w is not None:
        t = rms_norm_reference(t, norm_w, eps)
    return rope_reference(t, cos, sin)


def qkv_norm_rope_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq=None,
                            x_eps=0.0):
    _check_width(w_qkv, n_q + 2 * n_kv, head_dim, "qkv_norm_rope")
    qkv = torch.nn.functional.linear(finish_rms_norm(x, x_sumsq, x_eps), w_qkv, b_qkv)
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.unflatten(-1, (n_q, head_dim))
    k = k.unflatten(-1, (n_kv, head_dim))
    v = v.unflatten(-1, (n_kv, head_dim))
    return _norm_rope(q, q_norm_w, eps, cos, sin), _norm_rope(k, k_norm_w, eps, cos, sin), _fresh(v)


def qkv_norm_rope_cache_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                                  k_cache, v_cache, cache_positions, x_sumsq=None, x_eps=0.0):
    q, k, v = qkv_norm_rope_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                                      x_sumsq, x_eps)
    _write_cache(k_cache, v_cache, k, v, cache_positions)
    return q


def kv_materialize_reference(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim):
    _check_width(w_kv, 2 * n_kv, head_dim, "kv_materialize")
    kv = torch.nn.functional.linear(ctx, w_kv, b_kv)
    k, v = kv.unflatten(-1, (2 * n_kv, head_dim)).split([n_kv, n_kv], dim=-2)
    return _norm_rope(k, k_norm_w, eps, cos, sin), _fresh(v)


def kv_materialize_cache_reference(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, k_cache, v_cache,
                                   cache_positions) -> None:
    k, v = kv_materialize_reference(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim)
    _write_cache(k_cache, v_cache, k, v, cache_positions)


def context_qkv_norm_rope_cache_reference(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv,
                                          head_dim, k_cache, v_cache, cache_positions, x_sumsq=None, x_eps=0.0):
    x = finish_rms_norm(x, x_sumsq, x_eps)
    c, q_rows = ctx.shape[1], n_q * head_dim
    kv_materialize_cache_reference(ctx, w_qkv[q_rows:], None if b_qkv is None else b_qkv[q_rows:], k_norm_w, eps,
                                   cos[:, :c], sin[:, :c], n_kv, head_dim, k_cache, v_cache, cache_positions[:, :c])
    return qkv_norm_rope_cache_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos[:, c:], sin[:, c:], n_q, n_kv,
                                         head_dim, k_cache, v_cache, cache_positions[:, c:])


def _write_cache(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_positions: Tensor) -> None:
    """Row b of k/v [B, S, n_kv, hd] into cache row b [n_kv, S_max, hd] at slots cache_positions[b]."""
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, :, cache_positions] = k
    v_cache[rows, :, cache_positions] = v


def _fresh(v: Tensor) -> Tensor:
    """A contiguous copy at storage offset 0 (what the fake promises; `.contiguous()` may return a view)."""
    return v.clone(memory_format=torch.contiguous_format)


def _check_width(w: Tensor, heads: int, head_dim: int, op: str) -> None:
    if isinstance(w, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, w.shape[0] == heads * head_dim,
                      lambda: f"{op}: weight has {w.shape[0]} rows, expected {heads}×{head_dim}.")


@torch.library.custom_op("dflash::qkv_norm_rope", mutates_args=())
def qkv_norm_rope(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, q_norm_w: Tensor | None,
                  k_norm_w: Tensor | None, eps: float, cos: Tensor, sin: Tensor, n_q: int, n_kv: int, head_dim: int,
                  x_sumsq: Tensor | None = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    return qkv_norm_rope_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq,
                                   x_eps)


@qkv_norm_rope.register_fake
def _(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, x_sumsq=None, x_eps=0.0):
    _check_width(w_qkv, n_q + 2 * n_kv, head_dim, "qkv_norm_rope")
    check_sumsq(x, x_sumsq)
    lead = x.shape[:-1]
    return (x.new_empty(*lead, n_q, head_dim), x.new_empty(*lead, n_kv, head_dim),
            x.new_empty(*lead, n_kv, head_dim))


@torch.library.custom_op("dflash::qkv_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def qkv_norm_rope_cache(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, q_norm_w: Tensor | None,
                        k_norm_w: Tensor | None, eps: float, cos: Tensor, sin: Tensor, n_q: int, n_kv: int,
                        head_dim: int, k_cache: Tensor, v_cache: Tensor, cache_positions: Tensor,
                        x_sumsq: Tensor | None = None, x_eps: float = 0.0) -> Tensor:
    return qkv_norm_rope_cache_reference(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim,
                                         k_cache, v_cache, cache_positions, x_sumsq, x_eps)


@qkv_norm_rope_cache.register_fake
def _(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, k_cache, v_cache, cache_positions,
      x_sumsq=None, x_eps=0.0):
    _check_width(w_qkv, n_q + 2 * n_kv, head_dim, "qkv_norm_rope_cache")
    check_sumsq(x, x_sumsq)
    return x.new_empty(*x.shape[:-1], n_q, head_dim)


@torch.library.custom_op("dflash::kv_materialize", mutates_args=())
def kv_materialize(ctx: Tensor, w_kv: Tensor, b_kv: Tensor | None, k_norm_w: Tensor | None, eps: float,
                   cos: Tensor, sin: Tensor, n_kv: int, head_dim: int) -> tuple[Tensor, Tensor]:
    return kv_materialize_reference(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim)


@kv_materialize.register_fake
def _(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim):
    _check_width(w_kv, 2 * n_kv, head_dim, "kv_materialize")
    lead = ctx.shape[:-1]
    return ctx.new_empty(*lead, n_kv, head_dim), ctx.new_empty(*lead, n_kv, head_dim)


@torch.library.custom_op("dflash::kv_materialize_cache", mutates_args=("k_cache", "v_cache"))
def kv_materialize_cache(ctx: Tensor, w_kv: Tensor, b_kv: Tensor | None, k_norm_w: Tensor | None, eps: float,
                         cos: Tensor, sin: Tensor, n_kv: int, head_dim: int, k_cache: Tensor, v_cache: Tensor,
                         cache_positions: Tensor) -> None:
    kv_materialize_cache_reference(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, k_cache, v_cache,
                                   cache_positions)


@kv_materialize_cache.register_fake
def _(ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, head_dim, k_cache, v_cache, cache_positions):
    _check_width(w_kv, 2 * n_kv, head_dim, "kv_materialize_cache")


@torch.library.custom_op("dflash::context_qkv_norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def context_qkv_norm_rope_cache(ctx: Tensor, x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, q_norm_w: Tensor | None,
                                k_norm_w: Tensor | None, eps: float, cos: Tensor, sin: Tensor, n_q: int, n_kv: int,
                                head_dim: int, k_cache: Tensor, v_cache: Tensor, cache_positions: Tensor,
                                x_sumsq: Tensor | None = None, x_eps: float = 0.0) -> Tensor:
    return context_qkv_norm_rope_cache_reference(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv,
                                                 head_dim, k_cache, v_cache, cache_positions, x_sumsq, x_eps)


@context_qkv_norm_rope_cache.register_fake
def _(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, head_dim, k_cache, v_cache,
      cache_positions, x_sumsq=None, x_eps=0.0):
    _check_width(w_qkv, n_q + 2 * n_kv, head_dim, "context_qkv_norm_rope_cache")
    check_sumsq(x, x_sumsq)
    return x.new_empty(*x.shape[:-1], n_q, head_dim)
