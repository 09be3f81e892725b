"""cleanup — tidy the graph after the fusions (only weight_linears follows it in the pipeline).

before → after (each rewrite counted as "cleanup.<what>"):
  noop_cast: to.dtype(x, x.dtype) | _to_copy(x, dtype=x.dtype) | prims.convert_element_type(x, x.dtype) → x
  noop_view: view | reshape | _unsafe_view | expand | alias (x) with x's shape, slice(x, d, 0, end ≥ size)  → x
  cse:       view-like nodes (views, slices, selects, splits and their getitems, unsqueeze, transpose, sym_size, …)
             with the same target, arguments and keywords → the first of them (not reshapes in a graph that
             mutates tensors: a reshape may copy, and a copy taken before a write is not one taken after it)
  dead_code: nodes nobody uses and that have no side effects. A mutating op counts as dead only when what it
             updates is a tensor made inside the graph that nothing else reads (a mask built with `visible &= …`);
             updates of inputs and buffers (a KV-cache index_put_ / copy_) stay. An _assert_tensor_metadata of a
             value nothing else uses is dead too.
"""

import operator

import torch
import torch.fx as fx

from .canonicalize import cast_dtype
from .fx_utils import is_call, node_arg, same_sizes, tensor_meta
from .manager import GraphPass, PassContext

aten, prims = torch.ops.aten, torch.ops.prims

SAME_VALUE_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.alias)
VIEW_LIKE = (aten.view, aten.reshape, aten._unsafe_view, aten.slice, aten.select, aten.split, aten.split_with_sizes,
             aten.chunk, aten.unbind, aten.unsqueeze, aten.squeeze, aten.transpose, aten.permute, aten.t, aten.expand,
             aten.alias, aten.sym_size)


def is_noop_cast(node: fx.Node) -> bool:
    if node.target is not aten.to.dtype and cast_dtype(node) is None:
        return False
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    return src is not None and out is not None and src.dtype == out.dtype


def is_noop_view(node: fx.Node) -> bool:
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    if src is None or out is None or not same_sizes(src.shape, out.shape):
        return False
    if is_call(node, *SAME_VALUE_VIEWS):
        return True
    return is_call(node, aten.slice) and node_arg(node, 2, "start", None) in (None, 0) and \
        node_arg(node, 4, "step", 1) == 1


def frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    return value


def is_view_like(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return is_call(node.args[0], *VIEW_LIKE)
    return is_call(node, *VIEW_LIKE)


def mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def is_private(x, user: fx.Node) -> bool:
    """x is read by `user` only and is a fresh tensor of the graph (or an in-place update of one)."""
    if not isinstance(x, fx.Node) or x.op != "call_function" or set(x.users) != {user}:
        return False
    if mutates(x):
        return only_self_update(x) and is_private(x.args[0], x)
    schema = getattr(x.target, "_schema", None)
    return schema is not None and not any(r.alias_info for r in schema.returns)


def only_self_update(node: fx.Node) -> bool:
    """node updates its first argument and nothing else (`x.__iand__(y)`, `x.add_(y)`)."""
    args = node.target._schema.arguments
    return [a.name for a in args if a.alias_info is not None and a.alias_info.is_write] == [args[0].name]


def is_dead(node: fx.Node) -> bool:
    if node.users or node.op not in ("call_function", "call_method", "get_attr"):
        return False
    if node.target is aten._assert_tensor_metadata.default:
        return len(node.args[0].users) == 1
    if mutates(node):
        return only_self_update(node) and is_private(node.args[0], node)
    return not node.is_impure()


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, fx.Node):
            continue
        kind = "noop_cast" if is_noop_cast(node) else "noop_view" if is_noop_view(node) else None
        if kind:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            ctx.matched(f"cleanup.{kind}")
    seen: dict = {}
    writes = any(mutates(n) for n in graph.nodes)
    for node in list(graph.nodes):
        if node.op != "call_function" or not is_view_like(node) or (writes and is_call(node, aten.reshape)):
            continue
        try:
            key = (node.target, frozen(node.args), frozen(node.kwargs))
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave the node alone
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            ctx.matched("cleanup.cse")
    erased = erase_dead_code(graph)
    if erased:
        ctx.matched("cleanup.dead_code", erased)


def erase_dead_code(graph: fx.Graph) -> int:
    """Erase the nodes nobody uses that have no side effects (`is_dead`), users before producers; how many."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        if is_dead(node):
            graph.erase_node(node)
            erased += 1
    return erased


PASS = GraphPass("cleanup", run)
