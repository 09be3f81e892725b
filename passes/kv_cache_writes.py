"""kv_cache_writes: the k and v of a fused q/k/v projection go straight into the KV cache, no kernel of their own.

before:  q, k, v = dflash.qkv_norm_rope(x, …)
         rows = unsqueeze(arange(B), 1)
         k_cache' = index_put_(k_cache, [rows, None, positions], k)      (the models' `cache[rows, :, pos] = k`)
         v_cache' = index_put_(v_cache, [rows, None, positions], v)
after:   q = dflash.qkv_norm_rope_cache(x, …, k_cache, v_cache, positions)   (readers of k_cache' read k_cache)

In the runtime's exported steps each write is an index kernel of its own (two per layer, ≈ 3.6 µs each on the
H100, plus the arange): the lowered op's epilogue stores k and v at their cache slots instead of into fresh
tensors. Graphs traced by AOTAutograd (`backend="dflash"`) hold functional `index_put` + a final `copy_` instead:
nothing to match there.
Guards (a refusal is recorded, the graph stays): k and v are read by their cache write only (directly or through
a view that drops leading 1-sized dims); both writes are in place, not accumulating, with indices
[arange(B)[:, None], None, positions] — the same rows and positions — where B is x's batch; x is [B, S, H]; each
cache is read by its write only (no read of the old contents can move after the new write) and is defined, with
the positions, before the projection.
"""

import torch
import torch.fx as fx

from .canonicalize import replace
from .fx_utils import is_call, meta_val, same_sizes
from .head_chains import describe
from .manager import GraphPass, PassContext

NAME = "kv_cache_writes"
aten = torch.ops.aten


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


def _why_not(qkv: fx.Node, k_write: fx.Node | None, v_write: fx.Node | None) -> str | None:
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
    order = {node: i for i, node in enumerate(qkv.graph.nodes)}
    if any(order[node] > order[qkv] for node in (k_cache, v_cache, k_indices[2])):
        return "a cache or the positions are defined after the projection"
    return None


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for qkv in list(gm.graph.nodes):
        if not is_call(qkv, torch.ops.dflash.qkv_norm_rope):
            continue
        outputs = {user.args[1]: user for user in qkv.users}
        if set(outputs) != {0, 1, 2} or len(qkv.users) != 3:
            continue    # an output nobody reads (nothing writes it anywhere), or read through two getitems
        k_update, v_update = _update(outputs[1]), _update(outputs[2])
        k_write, v_write = _cache_write(k_update), _cache_write(v_update)
        if k_write is None and v_write is None:
            continue    # not a step that caches (a draft's block k/v, a test's plain attention)
        if why := _why_not(qkv, k_write, v_write):
            ctx.reject(qkv, f"{describe(qkv)} keeps its cache writes: {why}")
            continue
        k_cache, (_, _, positions) = k_write.args[:2]
        v_cache = v_write.args[0]
        q = outputs[0]
        fused = replace(qkv, torch.ops.dflash.qkv_norm_rope_cache.default, qkv.args,
                        {**qkv.kwargs, "k_cache": k_cache, "v_cache": v_cache, "cache_positions": positions})
        q.replace_all_uses_with(fused)
        for write, cache in ((k_write, k_cache), (v_write, v_cache)):
            write.replace_all_uses_with(cache)
        for node in dict.fromkeys((k_write, v_write, k_update, v_update, outputs[1], outputs[2], q)):
            gm.graph.erase_node(node)
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
