"""attention_masks — give every attention site a mask KIND, so no dense mask is materialized.

before → after, for each aten.scaled_dot_product_attention(q, k, v, attn_mask=M, is_causal=c, scale=s):
  → dflash.attention(q, k, v, kind, scale, window, mask, q_pos)   counted as "attention.<kind>"
  no M, c False    → non_causal, q_pos None (every key)
  no M, c True     → causal. SDPA's is_causal is TOP-LEFT aligned (query i sees keys 0..i), our default is
                     bottom-right: q_pos None only when Sq = Sk provably, else q_pos = arange(Sq)
  M from index arithmetic, proven equal to a kind by mask_algebra (sympy) → that kind; q_pos None when the query
                     positions are bottom-right (q + Sk − Sq), else the graph tensor that holds them (e.g.
                     cache_positions, expanded to [B, Sq]), or arange(Sq) + c for a constant c
  anything else    → custom with M (correct, slower) plus a rejection that says why: the mask reads data (a
                     padding mask, a buffer), is random, or is not provably one of the kinds (a non-causal window)
GQA: k and v spelled repeat_kv(x) (transformers: x[:, :, None].expand(B, Hkv, rep, S, D).reshape(B, Hkv·rep, S, D))
are replaced by x — dflash.attention maps q head i to kv head i // rep itself, so no repeated K/V is materialized.
The mask's nodes and the repeats are left dead; cleanup removes them.
Guards (the site stays SDPA, with a rejection): dropout_p ≠ 0, q not [B, H, S, D], q heads not a multiple of kv heads.
"""

import math

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, node_arg, relax_views, same_sizes, sym_expr, tensor_meta
from .manager import GraphPass, PassContext
from .mask_algebra import B, IDX, Q, Kind, MaskEvaluator, NotIndexArithmetic, NotProven, classify, visibility

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class Custom(Exception):
    """The site keeps its dense mask; the message is the reason."""


def decide(q, k, mask, is_causal) -> tuple[Kind, MaskEvaluator | None]:
    sq, sk = sym_expr(tensor_meta(q).shape[-2]), sym_expr(tensor_meta(k).shape[-2])
    if mask is None:
        if not is_causal:
            return Kind("non_causal", None), None
        return Kind("causal", None if (sq - sk).expand() == 0 else Q), None
    evaluator = MaskEvaluator()
    try:
        return classify(visibility(evaluator(mask)), sq, sk), evaluator
    except NotIndexArithmetic as e:
        raise Custom(f"the mask {e}") from None
    except NotProven as e:
        raise Custom(str(e)) from None


def find_positions(evaluator: MaskEvaluator | None, qp, batch, sq):
    """(node, its axes of size ≠ 1, their roles 'b'/'q') for an integer node of the mask subgraph that holds
    qp(b, q) — or qp(b) for non_causal — else None."""
    for node, t in (evaluator.values.items() if evaluator else ()):
        val = tensor_meta(node)
        if t.is_bool or val.is_floating_point():
            continue
        free = [k for k, size in enumerate(t.shape) if size != 1]
        for roles in {0: [()], 1: [("q",), ("b",)], 2: [("b", "q")]}.get(len(free), []):
            wanted = {"b": batch, "q": sq}
            if any((t.shape[k] - wanted[r]).expand() != 0 for k, r in zip(free, roles)):
                continue
            value = t.value.xreplace({IDX[k]: {"b": B, "q": Q}[r] for k, r in zip(free, roles)})
            if (value - qp).expand() == 0:
                return node, free, roles
    return None


def emit(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    node = graph.call_function(target, args, kwargs)
    infer_meta(node)
    return node


def size_arg(graph, x: fx.Node, dim: int):
    size = tensor_meta(x).shape[dim]
    return size if isinstance(size, int) else emit(graph, aten.sym_size.int, x, dim)


def positions_tensor(graph, q: fx.Node, kind: Kind, evaluator) -> fx.Node | None:
    """q_pos [B, Sq] int64 holding kind.qp (inserted at the graph's current insertion point), None = bottom-right."""
    if kind.qp is None:
        return None
    meta = tensor_meta(q)
    found = find_positions(evaluator, kind.qp, sym_expr(meta.shape[0]), sym_expr(meta.shape[-2]))
    if found is not None:
        node, free, roles = found
        dropped = [d for d in range(tensor_meta(node).dim()) if d not in free]
        x = emit(graph, aten.squeeze.dims, node, dropped) if dropped else node
        if "b" not in roles:
            x = emit(graph, aten.unsqueeze.default, x, 0)
        if "q" not in roles:
            x = emit(graph, aten.unsqueeze.default, x, -1)
    else:
        offset = (kind.qp - Q).expand()
        if not offset.is_Integer:
            raise Custom(f"the query positions {kind.qp} are not a tensor of the graph")
        x = emit(graph, aten.arange.default, size_arg(graph, q, -2), dtype=torch.int64, device=meta.device)
        if offset != 0:
            x = emit(graph, aten.add.Tensor, x, int(offset))
        x = emit(graph, aten.unsqueeze.default, x, 0)
    x = emit(graph, aten.expand.default, x, [size_arg(graph, q, 0), size_arg(graph, q, -2)])
    return x if tensor_meta(x).dtype == torch.int64 else emit(graph, aten.to.dtype, x, torch.int64)


def skip_full_slices(node):
    while is_call(node, aten.slice) and tensor_meta(node) is not None and tensor_meta(node.args[0]) is not None \
            and same_sizes(tensor_meta(node).shape, tensor_meta(node.args[0]).shape):
        node = node.args[0]
    return node


def unrepeated(kv: fx.Node) -> fx.Node:
    """x when kv = repeat_kv(x) = reshape(expand(x[:, :, None], [B, Hkv, rep, S, D]), [B, Hkv·rep, S, D]), else kv.
    (AOT graphs add full slices and a clone on the way.)"""
    if not is_call(kv, aten.reshape, aten.view, aten._unsafe_view):
        return kv
    expand = kv.args[0].args[0] if is_call(kv.args[0], aten.clone, aten.contiguous) else kv.args[0]
    if not is_call(expand, aten.expand):
        return kv
    unsqueeze = skip_full_slices(expand.args[0])
    if not is_call(unsqueeze, aten.unsqueeze) or unsqueeze.args[1] != 2:
        return kv
    x = skip_full_slices(unsqueeze.args[0])
    xs, es, ks = (tensor_meta(n) for n in (x, expand, kv))
    if xs is None or es is None or ks is None or xs.dim() != 4 or es.dim() != 5:
        return kv
    b, h, s, d = xs.shape
    if not same_sizes(es.shape, [b, h, es.shape[2], s, d]) or not same_sizes(ks.shape, [b, h * es.shape[2], s, d]):
        return kv
    return x


def guard(q, k, dropout) -> str | None:
    qm, km = tensor_meta(q), tensor_meta(k)
    if dropout != 0.0:
        return f"attention has dropout_p {dropout}; dflash.attention has no dropout"
    if qm.dim() != 4 or km.dim() != 4:
        return f"q is {qm.dim()}-D and k {km.dim()}-D; dflash.attention takes [B, H, S, D]"
    if not isinstance(qm.shape[1], int) or not isinstance(km.shape[1], int) or qm.shape[1] % km.shape[1]:
        return f"q has {qm.shape[1]} heads, not a multiple of the {km.shape[1]} kv heads"
    if not isinstance(qm.shape[-1], int):
        return "the head dim is symbolic, so the default scale is unknown"
    return None


def rewrite(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    q, k, v = node.args[0], unrepeated(node.args[1]), unrepeated(node.args[2])
    mask = node_arg(node, 3, "attn_mask")
    is_causal = node_arg(node, 5, "is_causal", False)
    if reason := guard(q, k, node_arg(node, 4, "dropout_p", 0.0)):
        ctx.reject(node, reason)
        return
    scale = node.kwargs.get("scale")
    scale = 1.0 / math.sqrt(tensor_meta(q).shape[-1]) if scale is None else scale
    graph = gm.graph
    with graph.inserting_before(node):
        try:
            kind, evaluator = decide(q, k, mask, is_causal)
            q_pos = positions_tensor(graph, q, kind, evaluator)
            args = (q, k, v, kind.kind, scale, kind.window, None, q_pos)
        except Custom as e:
            ctx.reject(node, f"attention stays custom: {e}")
            kind, args = Kind("custom", None), (q, k, v, "custom", scale, 0, mask, None)
        fused = emit(graph, torch.ops.dflash.attention.default, *args)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    relax_views(fused)
    ctx.matched(f"attention.{kind.kind}")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is SDPA:
            rewrite(gm, node, ctx)


PASS = GraphPass("attention_masks", run)
