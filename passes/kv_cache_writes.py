"""kv_cache_writes: the k and v of a fused q/k/v projection go straight into the KV cache, no kernel of their own.

before:  q, k, v = dflash.qkv_norm_rope(x, …)
         rows = unsqueeze(arange(B), 1)
         k_cache' = index_put_(k_cache, [rows, None, positions], k)      (the models' `cache[rows, :, pos] = k`)
         v_cache' = index_put_(v_cache, [rows, None, positions], v)
after:   q = dflash.qkv_norm_rope_cache(x, …, k_cache, v_cache, positions)   (readers of k_cache' read k_cache)

The DFlash draft (kv_materialize's form) writes [context ; block] keys in one go:
before:  k_ctx, v_ctx = dflash.kv_materialize(ctx, …)                    q, k, v = dflash.qkv_norm_rope(x, …)
         k_cache' = index_put_(k_cache, [rows, None, positions], cat([k_ctx, k], 1))   (v alike)
after:   dflash.kv_materialize_cache(ctx, …, k_cache, v_cache, positions[:, :C])
         q = dflash.qkv_norm_rope_cache(x, …, k_cache, v_cache, positions[:, C:])
where positions[:, :C] / [:, C:] are the two halves of `cat([ctx_positions, block_positions], 1)` when the
positions are that cat (the draft's), else slices.

In the runtime's exported steps each write is an index kernel of its own (two per layer, ≈ 3.6 µs each on the
H100, plus the arange): the lowered op's epilogue stores k and v at their cache slots instead of into fresh
tensors. Graphs traced by AOTAutograd (`backend="dflash"`) hold functional `index_put` + a final `copy_` instead:
nothing to match there.
Guards (a refusal is recorded, the graph stays): k and v are read by their cache write only (directly or through
a view that drops leading 1-sized dims); both writes are in place, not accumulating, with indices
[arange(B)[:, None], None, positions] — the same rows and positions — where B is x's batch; x is [B, S, H]; each
cache is read by its write only (no read of the old contents can move after the new write) and is defined, with
the positions, before the projection(s). The draft's form also needs both halves read only by their cat (dim 1).
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, meta_val, node_arg, same_sizes
from .head_chains import describe
from .kv_materialize import END
from .manager import GraphPass, PassContext

NAME = "kv_cache_writes"
aten = torch.ops.aten
PROJECTION_ARGS = 11  # qkv_norm_rope's arguments up to head_dim; the cache op takes the caches after them


def _leading_ones_dropped(shape) -> list:
    """shape without its leading dims of static size 1 (a symbolic size is never compared: no guard added)."""
    shape = list(shape)
    while shape and isinstance(shape[0], int) and shape[0] == 1:
        shape.pop(0)
    return shape


def _update(value: fx.Node) -> fx.Node:
    """value, or its only reader when that is a view dropping leading 1-sized dims (a batch of 1 exported
    static: the update [1, S, n_kv, hd] is written as [S, n_kv, hd])."""
    users = list(value.users)
    if len(users) == 1 and is_call(users[0], aten.view, aten.reshape, aten._unsafe_view):
        src, out = meta_val(value), meta_val(users[0])
        if src is not None and out is not None and \
                same_sizes(_leading_ones_dropped(src.shape), _leading_ones_dropped(out.shape)):
            return users[0]
    return value


def _cache_write(value: fx.Node) -> fx.Node | None:
    """The in-place, non-accumulating index_put_ that is value's only reader, with value as its update."""
    users = list(value.users)
    if len(users) != 1 or not is_call(users[0], aten.index_put_):
        return None
    write = users[0]
    if len(write.args) < 3 or write.args[2] is not value or (write.args[3:] or [False])[0] or \
            write.kwargs.get("accumulate", False):
        return None
    return write


def _batch_rows(rows: object, batch) -> bool:
    """rows is unsqueeze(arange(batch), 1): row b of the update goes to cache row b."""
    if not is_call(rows, aten.unsqueeze) or rows.args[1] not in (1, -1):
        return False
    arange = rows.args[0]
    if is_call(arange, aten.arange) and arange.target is aten.arange.default:
        return same_sizes([arange.args[0]], [batch])
    return is_call(arange, aten.arange) and arange.target is aten.arange.start and arange.args[0] == 0 and \
        same_sizes([arange.args[1]], [batch])


def _context_join(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | str | None:
    """(kv_materialize node, k's cat, v's cat) when the block's k and v are read only as the second half of
    cat([kv_materialize's k / v, block k / v], 1) — the draft's [context ; block] — and the context halves only
    there; a reason when a cat joins kv_materialize's output otherwise; None when nothing joins it (not a draft)."""
    cats = [next((u for u in node.users if is_call(u, aten.cat)), None) for node in (k, v)]
    firsts = [cat.args[0][0] if cat is not None else None for cat in cats]
    kvm = firsts[0].args[0] if is_call(firsts[0], operator.getitem) else None
    if not is_call(kvm, torch.ops.dflash.kv_materialize):
        return None
    for block, cat, first, index in zip((k, v), cats, firsts, (0, 1)):
        joins = cat is not None and len(block.users) == 1 and node_arg(cat, 1, "dim", 0) in (1, -3) and \
            len(cat.args[0]) == 2 and cat.args[0][1] is block
        if not joins or not is_call(first, operator.getitem) or first.args[0] is not kvm or first.args[1] != index \
                or len(first.users) != 1:
            return (f"its {'kv'[index]} is not joined only as cat([context {'kv'[index]} of "
                    f"{describe(kvm)}, block {'kv'[index]}], dim 1), read by nothing else")
    return kvm, cats[0], cats[1]


def _why_not(qkv: fx.Node, k_write: fx.Node | None, v_write: fx.Node | None,
             producers: tuple[fx.Node, ...]) -> str | None:
    if k_write is None or v_write is None:
        return "its k or v is read by something other than one in-place cache write (index_put_)"
    x = meta_val(qkv.args[0])
    if x is None or x.dim() != 3:
        return "its input is not [B, S, H]"
    k_cache, k_indices = k_write.args[:2]
    v_cache, v_indices = v_write.args[:2]
    if len(k_indices) != 3 or k_indices[1] is not None or list(k_indices) != list(v_indices) or \
            not _batch_rows(k_indices[0], x.shape[0]):
        return "the writes do not index [arange(B)[:, None], :, positions] with the same rows and positions"
    if set(k_cache.users) != {k_write} or set(v_cache.users) != {v_write}:
        return "a cache is read apart from its write (the write would move before that read)"
    order = order_in(qkv.graph)
    first = min(order(node) for node in producers)
    if any(order(node) > first for node in (k_cache, v_cache, k_indices[2])):
        return "a cache or the positions are defined after the projection"
    return None


def _write_points(qkv: fx.Node, kvm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the node kv_materialize_cache goes before, the node qkv_norm_rope_cache goes before) so that the context is
    written before the block, as the cat ordered them (a slot both write — the runtime's scratch slot — keeps the
    block's k/v): their own places when kvm comes first; both at qkv's when every input of kvm is defined before
    it; both at kvm's when every reader of q comes after kvm; else None."""
    order = order_in(qkv.graph)
    if order(kvm) < order(qkv):
        return kvm, qkv
    if all(order(node) < order(qkv) for node in kvm.all_input_nodes):
        return qkv, qkv
    q_readers = [reader for q in qkv.users if q.args[1] == 0 for reader in q.users]
    return (kvm, kvm) if all(order(reader) > order(kvm) for reader in q_readers) else None


def _split_positions(positions: fx.Node, context: fx.Node, anchor: fx.Node) -> tuple[fx.Node, fx.Node]:
    """positions [B, C + b] as its context half [B, C] and block half [B, b]: the operands of the draft's
    cat([ctx_positions, block_positions], 1), else slices inserted before anchor."""
    c = meta_val(context).shape[1]
    if is_call(positions, aten.cat) and node_arg(positions, 1, "dim", 0) in (1, -1) and \
            len(positions.args[0]) == 2 and same_sizes([meta_val(positions.args[0][0]).shape[1]], [c]):
        return tuple(positions.args[0])
    graph = positions.graph
    with graph.inserting_before(anchor):
        size = graph.call_function(aten.sym_size.int, (context, 1))
        halves = tuple(graph.call_function(aten.slice.Tensor, (positions, 1, start, end))
                       for start, end in ((0, size), (size, END)))
    size.meta["val"] = c
    for half in halves:
        infer_meta(half)
    return halves


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for qkv in list(gm.graph.nodes):
        if not is_call(qkv, torch.ops.dflash.qkv_norm_rope):
            continue
        outputs = {user.args[1]: user for user in qkv.users}
        if set(outputs) != {0, 1, 2} or len(qkv.users) != 3:
            continue    # an output nobody reads (nothing writes it anywhere), or read through two getitems
        joined = _context_join(outputs[1], outputs[2])
        if isinstance(joined, str):
            ctx.reject(qkv, f"{describe(qkv)} keeps its cache writes: {joined}")
            continue
        k_value, v_value = joined[1:] if joined else (outputs[1], outputs[2])
        k_update, v_update = _update(k_value), _update(v_value)
        k_write, v_write = _cache_write(k_update), _cache_write(v_update)
        if k_write is None and v_write is None:
            continue    # not a step that caches (a test's plain attention)
        producers = (qkv,) if joined is None else (qkv, joined[0])
        points = (qkv, qkv) if joined is None else _write_points(qkv, joined[0])
        why = _why_not(qkv, k_write, v_write, producers)
        if why is None and points is None:
            why = f"{describe(joined[0])} cannot write before it: an input of it is defined after the projection " \
                  "and q is read before it"
        if why:
            ctx.reject(qkv, f"{describe(qkv)} keeps its cache writes: {why}")
            continue
        k_cache, (_, _, positions) = k_write.args[:2]
        v_cache = v_write.args[0]
        caches = {"k_cache": k_cache, "v_cache": v_cache}
        if joined is not None:
            kvm = joined[0]
            ctx_positions, positions = _split_positions(positions, kvm.args[0], min(producers, key=order_in(gm.graph)))
            with gm.graph.inserting_before(points[0]):
                gm.graph.call_function(torch.ops.dflash.kv_materialize_cache.default, kvm.args,
                                       {**kvm.kwargs, **caches, "cache_positions": ctx_positions})
        with gm.graph.inserting_before(points[1]):
            finish = dict(zip(("x_sumsq", "x_eps"), qkv.args[PROJECTION_ARGS:]))  # after the caches in the new op
            fused = gm.graph.call_function(torch.ops.dflash.qkv_norm_rope_cache.default, qkv.args[:PROJECTION_ARGS],
                                           {**finish, **qkv.kwargs, **caches, "cache_positions": positions})
        infer_meta(fused)
        fused.meta.setdefault("stack_trace", qkv.meta.get("stack_trace"))
        q = outputs[0]
        q.replace_all_uses_with(fused)
        for write, cache in ((k_write, k_cache), (v_write, v_cache)):
            write.replace_all_uses_with(cache)
        dead = (k_write, v_write, k_update, v_update, k_value, v_value, outputs[1], outputs[2], q, qkv)
        if joined is not None:
            dead += (*(part for cat in joined[1:] for part in cat.args[0][:1]), joined[0])
        for node in dict.fromkeys(dead):
            gm.graph.erase_node(node)
        ctx.matched(NAME)


def order_in(graph: fx.Graph):
    """A key giving each node of graph its position."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


PASS = GraphPass(NAME, run)
