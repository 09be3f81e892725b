"""kv_materialize: the DFlash draft's context path (z-lab DFlashDraftModel, models/draft.py).

before:  k = cat(linear(ctx, Wk), linear(block, Wk), seq) ─ view(B,C+b,nkv,hd) ─ RMSNorm(k_norm_w) ─ [transpose]
             ─ rope(cos, sin over ctx+block)
         v = cat(linear(ctx, Wv), linear(block, Wv), seq) ─ view ─ [transpose]
         q = linear(block, Wq) ─ view ─ RMSNorm(q_norm_w) ─ [transpose] ─ rope(cos, sin of the last b positions)
after:   q, k_blk, v_blk = dflash.qkv_norm_rope(block, W_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos[:, C:], sin[:, C:], …)
         k_ctx, v_ctx    = dflash.kv_materialize(ctx, W_kv, b_kv, k_norm_w, eps, cos[:, :C], sin[:, :C], nkv, hd)
         where W_kv = W_qkv[nq·hd:] (b_kv alike) when the context's k/v projections are the block's (z-lab's)
         k = cat(k_ctx, k_blk, seq), v = cat(v_ctx, v_blk, seq)   (+ transpose(1, 2) where the consumers had it)

Records both "kv_materialize" and "qkv_norm_rope" per site. Runs before qkv_norm_rope, so a draft site is
taken whole. Guards: q's cos / sin are the last b rows of k's (the block's positions), k's cover exactly C + b
positions, plus the qkv_norm_rope guards (eps, head_dim, dtypes, nothing used outside the site).
"""

import sys

import torch
import torch.fx as fx

from .fx_utils import node_arg, same_sizes
from .head_chains import Chain, ConcatProj, describe, find_roped, plain_chains
from .manager import GraphPass, PassContext
from .projection_rewrite import Emitter, erase_unused, insertion_anchor, proj_parts
from .qkv_norm_rope import dead_candidates, eps_of, norm_weight, replace, site_guards, site_inputs
from .rope_patterns import shape

aten = torch.ops.aten
END = sys.maxsize   # a slice end meaning "to the end", as torch.export prints it


def reaches_end(end, length) -> bool:
    return (isinstance(end, int) and end >= 2**62) or same_sizes([end], [length])


def block_table_guard(q: Chain, k: Chain, ctx_x: fx.Node, block_x: fx.Node) -> str | None:
    """q's cos / sin must be k's restricted to the last b (block) positions, and k's must span C + b."""
    c, b = shape(ctx_x)[1], shape(block_x)[1]
    for attr in ("cos", "sin"):
        tq, tk = getattr(q, attr), getattr(k, attr)
        if tq.base is not tk.base or tk.seq is not None or tk.head_axis != tq.head_axis:
            return f"q and k use different {attr} tensors ({describe(tq.base)} vs {describe(tk.base)})"
        seq_axis = -2 if tk.head_axis is None else (-2 if tk.head_axis == -3 else -3)
        if not same_sizes([shape(tk.base)[seq_axis]], [c + b]):
            return f"k's {attr} has {shape(tk.base)[seq_axis]} positions, not context {c} + block {b}"
        sliced = tq.seq
        if sliced is None or not same_sizes([shape(sliced)[node_arg(sliced, 1, "dim", 0)]], [b]) \
                or not reaches_end(node_arg(sliced, 3, "end", END), c + b):
            return f"q's {attr} is not the last {b} positions of k's"
    return None


def _context_weights(emit: Emitter, k: Chain, v: Chain, kv_rows: int, ctx_x: fx.Node, w_qkv: fx.Node,
                     b_qkv: fx.Node | None, q_rows: int) -> tuple[fx.Node, fx.Node | None]:
    """kv_materialize's w_kv and b_kv: the k|v rows of the merged w_qkv / b_qkv (views: no second copy, and the
    sharing stays visible to context_qkv) when the context's k and v projections are the block's — z-lab's
    k_proj(ctx), k_proj(x) —, else their own merged weights."""
    ctx_projs, rows = [k.source.ctx, v.source.ctx], [kv_rows] * 2
    if all(proj_parts(ctx_projs, rows, which) == proj_parts([k.source.block, v.source.block], rows, which)
           for which in ("weight", "bias")):
        return emit.call(aten.slice.Tensor, w_qkv, 0, q_rows, END), \
            None if b_qkv is None else emit.call(aten.slice.Tensor, b_qkv, 0, q_rows, END)
    return (emit.merged("kv_weight", proj_parts(ctx_projs, rows, "weight"), ctx_x),
            emit.merged("kv_bias", proj_parts(ctx_projs, rows, "bias"), ctx_x))


def fuse_site(gm: fx.GraphModule, ctx: PassContext, k: Chain, roped: list[Chain]) -> None:
    src: ConcatProj = k.source
    ctx_x, block_x = src.ctx.x, src.block.x
    qs = [c for c in roped if not isinstance(c.source, ConcatProj) and c.source.x is block_x]
    if len(qs) != 1:
        ctx.reject(k.out, f"{describe(block_x)} has {len(qs)} roped projections besides k; the draft's q is one")
        return
    q = qs[0]
    vs = [c for c in plain_chains(ctx_x) if isinstance(c.source, ConcatProj) and c.source.block.x is block_x
          and (c.heads, c.head_dim) == (k.heads, k.head_dim) and c.source.out is not src.out]
    if len(vs) != 1:
        ctx.reject(k.out, f"{len(vs)} concatenated context+block projections with {k.heads}×{k.head_dim} rows "
                          f"next to k (v is needed, exactly one)")
        return
    v = vs[0]
    reason = block_table_guard(q, k, ctx_x, block_x) or site_guards(block_x, q, k, v)
    anchor = None if reason else insertion_anchor(gm.graph, site_inputs(ctx_x, (q, k, v), (k.cos, k.sin)),
                                                  (q.out, k.out, v.out))
    if reason or anchor is None:
        ctx.reject(k.out, reason or "no point in the graph has every input of the fused ops before their consumers")
        return
    emit = Emitter(gm, anchor)
    kv_rows = k.heads * k.head_dim
    projs = [q.source, k.source.block, v.source.block]
    rows = [q.heads * q.head_dim, kv_rows, kv_rows]
    w_qkv = emit.merged("qkv_weight", proj_parts(projs, rows, "weight"), block_x)
    b_qkv = emit.merged("qkv_bias", proj_parts(projs, rows, "bias"), block_x)
    w_kv, b_kv = _context_weights(emit, k, v, kv_rows, ctx_x, w_qkv, b_qkv, q.heads * q.head_dim)
    c = emit.size(ctx_x, 1)
    cos, sin = emit.table(k.cos, src.out), emit.table(k.sin, src.out)
    cos_ctx, sin_ctx = (emit.call(aten.slice.Tensor, t, 1, 0, c) for t in (cos, sin))
    cos_blk, sin_blk = (emit.call(aten.slice.Tensor, t, 1, c, END) for t in (cos, sin))
    q_norm_w, k_norm_w, eps = norm_weight(emit, q, block_x), norm_weight(emit, k, block_x), eps_of(q, k)
    q_new, k_blk, v_blk = emit.outputs(torch.ops.dflash.qkv_norm_rope.default, 3, block_x, w_qkv, b_qkv, q_norm_w,
                                       k_norm_w, eps, cos_blk, sin_blk, q.heads, k.heads, q.head_dim)
    k_ctx, v_ctx = emit.outputs(torch.ops.dflash.kv_materialize.default, 2, ctx_x, w_kv, b_kv, k_norm_w, eps,
                                cos_ctx, sin_ctx, k.heads, k.head_dim)
    replace(emit, q, q_new)
    replace(emit, k, emit.call(aten.cat.default, [k_ctx, k_blk], 1))
    replace(emit, v, emit.call(aten.cat.default, [v_ctx, v_blk], 1))
    erase_unused(gm, dead_candidates((q, k, v)))
    ctx.matched("kv_materialize")
    ctx.matched("qkv_norm_rope")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    roped, _ = find_roped(gm.graph)   # the rejections of other ropes are qkv_norm_rope's to record
    for k in roped:
        if isinstance(k.source, ConcatProj):
            fuse_site(gm, ctx, k, roped)


PASS = GraphPass("kv_materialize", run)
