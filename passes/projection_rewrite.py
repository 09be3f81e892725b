"""Emitting the fused projection ops: merged weights, cos/sin tables as [B, S, rot], where to insert, and
removing what the fused op replaced.

Merged weights: when every piece is a get_attr tensor (torch.export graphs) the merged tensor is built ONCE
here and registered on the module as a constant (`dflash_<prefix>_<i>`) together with its recipe (the cat of
row slices it is, see fx_utils.build_constant; the compile cache replays it); when a piece is a graph input
(AOT graphs lift parameters to placeholders) the merge is an aten.cat in the graph, recomputed per call.
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import add_constant, attr_tensor, infer_meta, meta_val, recipe_of, same_sizes
from .head_chains import Proj, Table, is_idle
from .rope_patterns import shape

aten = torch.ops.aten


class Emitter:
    """Inserts nodes before `anchor`, recording their fake values."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor

    def call(self, target, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        infer_meta(node)
        return node

    def outputs(self, target, n: int, *args) -> list[fx.Node]:
        node = self.call(target, *args)
        return [self.call(operator.getitem, node, i) for i in range(n)]

    def constant(self, prefix: str, recipe: tuple, like: fx.Node) -> fx.Node:
        return add_constant(self.gm, self.anchor, f"dflash_{prefix}", recipe, like=like)

    def size(self, node: fx.Node, dim: int):
        """node.shape[dim] as an int, or an aten.sym_size node when it is symbolic."""
        size = shape(node)[dim]
        return size if isinstance(size, int) else self.call(aten.sym_size.int, node, dim)

    def merged(self, prefix: str, parts: list[tuple[fx.Node | None, tuple[int, int] | None, int]],
               like: fx.Node) -> fx.Node | None:
        """Stack row pieces (param, rows or None for all, n_rows) along dim 0; a None param is n_rows zeros
        (a projection without bias next to ones with). Reuses the param when the pieces are it, in order."""
        params = [p for p, _, _ in parts]
        if all(p is None for p in params):
            return None
        first = params[0]
        sizes = [n for _, _, n in parts]
        if all(p is first for p in params) and [r for _, r, _ in parts] == _tiling(sizes) \
                and shape(first)[0] == sum(sizes):
            return first
        if all(attr_tensor(self.gm, p) is not None for p in params if p is not None):
            ref = recipe_of(self.gm, next(p for p in params if p is not None))
            pieces = [("zeros", ref, n) if p is None else ("rows", recipe_of(self.gm, p), *(rows or (0, n)))
                      for p, rows, n in parts]
            return self.constant(prefix, ("cat", pieces), like)
        ref = next(p for p in params if p is not None)
        pieces = [self.call(aten.new_zeros.default, ref, [n, *shape(ref)[1:]]) if p is None else
                  (self.call(aten.slice.Tensor, p, 0, *rows) if rows else p) for p, rows, n in parts]
        return self.call(aten.cat.default, pieces)

    def table(self, t: Table, x: fx.Node) -> fx.Node:
        """The op's [B, S, rot] cos / sin: squeeze the head axis, add missing leading axes, redo the sequence
        slice, broadcast to x's batch and sequence sizes."""
        node = t.base
        if t.head_axis is not None:
            node = self.call(aten.squeeze.dim, node, t.head_axis)
        while len(shape(node)) < 3:
            node = self.call(aten.unsqueeze.default, node, 0)
        if t.seq is not None:
            node = self.call(aten.slice.Tensor, node, 1, *t.seq.args[2:4])
        if not same_sizes(shape(node)[:2], shape(x)[:2]):
            node = self.call(aten.expand.default, node, [self.size(x, 0), self.size(x, 1), -1])
        return node

    def ones(self, dim: int, like: fx.Node) -> fx.Node:
        """A [dim] weight of ones in x's dtype, for an RMSNorm spelled without a weight."""
        return self.constant("ones", ("ones", dim, meta_val(like).dtype, meta_val(like).device), like)


def _tiling(sizes: list[int]) -> list[tuple[int, int]]:
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def proj_parts(projs: list[Proj], rows_per_proj: list[int], which: str):
    """(param, rows, n_rows) pieces of the weights (which='weight') or biases (which='bias') of projs."""
    return [(getattr(p, which), p.rows, n) for p, n in zip(projs, rows_per_proj)]


def insertion_anchor(graph: fx.Graph, inputs, outs) -> fx.Node | None:
    """The node to insert before: right after the last of `inputs`, provided that is before every use of outs."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max((n for n in inputs if isinstance(n, fx.Node)), key=order.__getitem__)
    first_use = min((order[u] for o in outs for u in o.users), default=len(order))
    return last.next if order[last] < first_use else None


def erase_unused(gm: fx.GraphModule, nodes) -> None:
    """Erase the nodes (with their metadata asserts and unused getitems) that no longer have users, last first;
    a parameter whose last get_attr goes is dropped from the module."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted((n for n in nodes if n in order), key=order.__getitem__, reverse=True):
        for user in [u for u in node.users if is_idle(u)]:
            graph.erase_node(user)
        if node.users or node.op in ("placeholder", "output"):
            continue
        graph.erase_node(node)
        if node.op == "get_attr" and not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
            owner, _, name = node.target.rpartition(".")
            delattr(gm.get_submodule(owner), name)
