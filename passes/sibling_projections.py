"""merge_sibling_projections: linears that read the same input with constant weights become one GEMM.

before:  x ─ linear(W1[, b1]) ─▶ y1            (the MLP's gate_proj and up_proj: down(silu(gate(x)) * up(x)),
         x ─ linear(W2[, b2]) ─▶ y2             or q/k/v projections that qkv_norm_rope left alone)
after:   y = linear(x, W = cat(W1, W2)[, cat(b1, b2)]);  y1 = slice(y, -1, 0, N1);  y2 = slice(y, -1, N1, N1 + N2)

A decode-sized GEMM (M ≤ 32 rows) streams its weight once; two GEMMs over one x are two launches and two
half-sized weight streams, one is a single stream (and Inductor fuses silu · mul over the two slices into one
pointwise kernel). The merged weight is built once (projection_rewrite.Emitter.merged, like W_qkv) and the
originals are dropped from the module. Guards (each failure leaves the group alone and records why): every
weight and bias a constant (get_attr) tensor, every weight 2-D, and no other reader of a weight or bias (that
reader would keep the original alive next to the merged copy). One K and one dtype follow from the one input x:
aten.linear requires both.
"""

import torch
import torch.fx as fx

from .fx_utils import attr_tensor, is_call, node_arg, relax_views
from .head_chains import describe, is_idle
from .manager import GraphPass, PassContext
from .projection_rewrite import Emitter, erase_unused

aten = torch.ops.aten
NAME = "merge_sibling_projections"


def sibling_groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """The aten.linear nodes of the graph grouped by their input node, groups of two or more, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if is_call(node, aten.linear):
            groups.setdefault(node.args[0], []).append(node)
    return [group for group in groups.values() if len(group) > 1]


def other_reader(graph: fx.Graph, param: fx.Node, linear: fx.Node) -> fx.Node | None:
    """A node other than `linear` that reads the tensor behind get_attr `param` (through any get_attr of it)."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == param.target:
            for user in node.users:
                if user is not linear and not is_idle(user):
                    return user
    return None


def group_guards(gm: fx.GraphModule, group: list[fx.Node]) -> str | None:
    params = [(lin, p) for lin in group for p in (lin.args[1], node_arg(lin, 2, "bias")) if p is not None]
    for lin, p in params:
        if attr_tensor(gm, p) is None:
            return (f"{describe(p)} read by {describe(lin)} is not a constant tensor: a merged weight would be "
                    f"concatenated on every call")
    for lin in group:
        if attr_tensor(gm, lin.args[1]).dim() != 2:
            return f"the weight of {describe(lin)} is 1-D (a dot product per row, not a projection)"
    for lin, p in params:
        reader = other_reader(gm.graph, p, lin)
        if reader is not None:
            return (f"{describe(p)} is also read by {describe(reader)}: the original would stay alive next to "
                    f"the merged copy")
    return None


def merge(gm: fx.GraphModule, group: list[fx.Node]) -> None:
    x = group[0].args[0]
    rows = [attr_tensor(gm, lin.args[1]).shape[0] for lin in group]
    emit = Emitter(gm, group[0])
    weight = emit.merged("sibling_weight", [(lin.args[1], None, n) for lin, n in zip(group, rows)], x)
    bias = emit.merged("sibling_bias", [(node_arg(lin, 2, "bias"), None, n) for lin, n in zip(group, rows)], x)
    merged = emit.call(aten.linear.default, x, weight, *([bias] if bias is not None else []))
    start = 0
    for lin, n in zip(group, rows):
        piece = emit.call(aten.slice.Tensor, merged, -1, start, start + n)
        lin.replace_all_uses_with(piece)
        relax_views(piece)           # the piece is strided: a downstream view that flattens its last dim would fail
        start += n
    params = {p for lin in group for p in (lin.args[1], node_arg(lin, 2, "bias")) if p is not None}
    erase_unused(gm, [*group, *params])


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for group in sibling_groups(gm.graph):
        reason = group_guards(gm, group)
        if reason:
            ctx.reject(group[0], reason)
            continue
        merge(gm, group)
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
