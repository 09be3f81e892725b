"""context_qkv: the draft's context rows join the block's projection when they share its k|v weights.

before:  dflash.kv_materialize_cache(ctx, w_qkv[n_q·hd:], b_qkv[n_q·hd:], k_norm_w, eps, cos[:, :C], sin[:, :C],
                                     n_kv, hd, k_cache, v_cache, ctx_positions)
         q = dflash.qkv_norm_rope_cache(x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos[:, C:], sin[:, C:], n_q, n_kv,
                                        hd, k_cache, v_cache, block_positions)
after:   q = dflash.context_qkv_norm_rope_cache(ctx, x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv,
                                                hd, k_cache, v_cache, positions)
where positions is cat([ctx_positions, block_positions], 1) — the draft's own cat, or the tensor both halves slice,
else a new cat. The pair is what kv_materialize (w_kv as rows of w_qkv: z-lab's draft projects context and block
with the same k_proj / v_proj) and kv_cache_writes leave for each draft layer: one weight stream and one epilogue
instead of two of each (the k|v weight rows were read twice per layer).
Guards (a refusal is recorded, the graph stays): the context op's weight (and bias) are the k|v row slice of the
block op's; the same k norm weight, eps, heads and caches; cos / sin the two halves of one table at the context
length; the context op comes first and no other reader of a cache sits between the two.
"""

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, node_arg, same_sizes
from .head_chains import describe
from .kv_cache_writes import order_in
from .kv_materialize import END, reaches_end
from .manager import GraphPass, PassContext
from .projection_rewrite import erase_unused
from .rope_patterns import shape

NAME = "context_qkv"
aten = torch.ops.aten
KV_CACHE = torch.ops.dflash.kv_materialize_cache.default
QKV_CACHE = torch.ops.dflash.qkv_norm_rope_cache.default
# argument positions: kv_materialize_cache (ctx, w_kv, b_kv, k_norm_w, eps, cos, sin, n_kv, hd, k_cache, v_cache,
# positions); qkv_norm_rope_cache (x, w_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, n_q, n_kv, hd, k_cache,
# v_cache, positions)
KV_ARGS = ("ctx", "w_kv", "b_kv", "k_norm_w", "eps", "cos", "sin", "n_kv", "head_dim", "k_cache", "v_cache",
           "cache_positions")
QKV_ARGS = ("x", "w_qkv", "b_qkv", "q_norm_w", "k_norm_w", "eps", "cos", "sin", "n_q", "n_kv", "head_dim", "k_cache",
            "v_cache", "cache_positions", "x_sumsq", "x_eps")


def _args(node: fx.Node, names: tuple[str, ...]) -> dict:
    return {name: node_arg(node, i, name, None) for i, name in enumerate(names)}


def _bounds(part: fx.Node) -> tuple:
    """(start, end) of an aten.slice node, None read as the default (0, to the end)."""
    start, end = node_arg(part, 2, "start", None), node_arg(part, 3, "end", None)
    return 0 if start is None else start, END if end is None else end


def _to_end(part: fx.Node, whole: fx.Node, dim: int) -> bool:
    dims = shape(whole)
    return dims is not None and reaches_end(_bounds(part)[1], dims[dim])


def _rows_from(part, whole, start) -> bool:
    """part is aten.slice(whole, 0, start, end of whole)."""
    return is_call(part, aten.slice) and part.args[0] is whole and node_arg(part, 1, "dim", 0) == 0 and \
        _bounds(part)[0] == start and _to_end(part, whole, 0)


def _halves_of(first, second, dim: int = 1):
    """The tensor whose dim-`dim` slices [0, c) and [c, end) first and second are (with the same c), or None."""
    if not (is_call(first, aten.slice) and is_call(second, aten.slice)) or first.args[0] is not second.args[0]:
        return None
    (zero, c), (start, _) = _bounds(first), _bounds(second)
    same_dim = node_arg(first, 1, "dim", 0) == node_arg(second, 1, "dim", 0) == dim
    split = zero == 0 and (start is c or same_sizes([start], [c]))
    return first.args[0] if same_dim and split and _to_end(second, first.args[0], dim) else None


def _why_not(kv: dict, qkv: dict) -> str | None:
    q_rows = qkv["n_q"] * qkv["head_dim"]
    if not _rows_from(kv["w_kv"], qkv["w_qkv"], q_rows):
        return "the context's k|v weight is not the k|v rows of the block's merged weight"
    if not (kv["b_kv"] is None and qkv["b_qkv"] is None) and not _rows_from(kv["b_kv"], qkv["b_qkv"], q_rows):
        return "the context's k|v bias is not the k|v rows of the block's merged bias"
    if kv["k_norm_w"] is not qkv["k_norm_w"] or kv["eps"] != qkv["eps"] or \
            (kv["n_kv"], kv["head_dim"]) != (qkv["n_kv"], qkv["head_dim"]):
        return "the two ops differ in k norm weight, eps or heads"
    if any(_halves_of(kv[t], qkv[t]) is None for t in ("cos", "sin")):
        return "cos / sin are not the context and block halves of one table"
    return None


def _positions(gm: fx.GraphModule, ctx_positions: fx.Node, block_positions: fx.Node, anchor: fx.Node) -> fx.Node:
    """cat([ctx_positions, block_positions], 1): the graph's own (the draft's), the tensor both halves slice, or a
    new cat before anchor."""
    whole = _halves_of(ctx_positions, block_positions)
    if whole is not None:
        return whole
    for user in ctx_positions.users:
        if is_call(user, aten.cat) and list(user.args[0]) == [ctx_positions, block_positions] and \
                node_arg(user, 1, "dim", 0) in (1, -1):
            return user
    with gm.graph.inserting_before(anchor):
        cat = gm.graph.call_function(aten.cat.default, ([ctx_positions, block_positions], 1))
    infer_meta(cat)
    return cat


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    order = order_in(gm.graph)
    for kv_node in [n for n in gm.graph.nodes if n.target is KV_CACHE]:
        kv = _args(kv_node, KV_ARGS)
        pairs = [n for n in kv["k_cache"].users if n.target is QKV_CACHE and _args(n, QKV_ARGS)["k_cache"] is
                 kv["k_cache"]]
        if len(pairs) != 1:
            continue    # a context op without the block's (not the draft's pair)
        qkv_node = pairs[0]
        qkv = _args(qkv_node, QKV_ARGS)
        between = [n for cache in (kv["k_cache"], kv["v_cache"]) for n in cache.users
                   if order(kv_node) < order(n) < order(qkv_node)]
        why = _why_not(kv, qkv) or (
            None if qkv["v_cache"] is kv["v_cache"] else "the two ops write different v caches") or (
            None if order(kv_node) < order(qkv_node) and not between else
            "the context op does not come first, or a cache is read between the two")
        if why:
            ctx.reject(qkv_node, f"{describe(qkv_node)} keeps its context op: {why}")
            continue
        positions = _positions(gm, kv["cache_positions"], qkv["cache_positions"], qkv_node)
        table = {t: _halves_of(kv[t], qkv[t]) for t in ("cos", "sin")}
        with gm.graph.inserting_before(qkv_node):
            fused = gm.graph.call_function(torch.ops.dflash.context_qkv_norm_rope_cache.default, (
                kv["ctx"], qkv["x"], qkv["w_qkv"], qkv["b_qkv"], qkv["q_norm_w"], qkv["k_norm_w"], qkv["eps"],
                table["cos"], table["sin"], qkv["n_q"], qkv["n_kv"], qkv["head_dim"]),
                {"k_cache": qkv["k_cache"], "v_cache": qkv["v_cache"], "cache_positions": positions,
                 **({"x_sumsq": qkv["x_sumsq"], "x_eps": qkv["x_eps"]} if qkv["x_sumsq"] is not None else {})})
        infer_meta(fused)
        fused.meta.setdefault("stack_trace", qkv_node.meta.get("stack_trace"))
        qkv_node.replace_all_uses_with(fused)
        gm.graph.erase_node(qkv_node)
        gm.graph.erase_node(kv_node)
        erase_unused(gm, [kv[name] for name in ("w_kv", "b_kv", "cos", "sin", "cache_positions")] +
                     [qkv[name] for name in ("cos", "sin", "cache_positions")])
        ctx.matched(NAME)
        order = order_in(gm.graph)


PASS = GraphPass(NAME, run)
