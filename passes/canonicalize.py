"""canonicalize — rewrite AOT-autograd spellings into the export spellings the fusion passes match.

before → after (each site counted as "canonicalize.<what>"):
  linear:  mm(a, t(w)) | mm(a, permute(w, [1, 0]))               → linear(a, w)
           addmm(b, a, t(w))            (beta = alpha = 1)         → linear(a, w, b)
  linear_views: view(linear(view(x, [N, K]), w, b), [*lead, M]) → linear(x, w, b)  (x [*lead, K], N = Π lead)
  sdpa:    getitem(_scaled_dot_product_{flash_attention_for_cpu | efficient_attention | flash_attention |
           cudnn_attention}(q, k, v, …), 0)  (no other output used) → scaled_dot_product_attention(q, k, v, mask, …)
           (enable_gqa=True when k has fewer heads than q: those kernels take GQA heads as they are)
  cast:    _to_copy(x, dtype=d) | prims.convert_element_type(x, d) | to.dtype_layout(x, dtype=d)
                                                                   → to.dtype(x, d)
           (only when device, layout and memory format stay as they are)
  assert_metadata: _assert_tensor_metadata(x, …) → removed. Export adds these checks of a dtype the graph already
           fixes; as extra users they would hide single-use values from the fusion matchers.
Matmuls whose second operand is not a transposed weight, and 3-D matmul spellings (expand + bmm), stay as they are.
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, node_arg, same_sizes, sym_expr, tensor_meta
from .manager import GraphPass, PassContext

aten, prims = torch.ops.aten, torch.ops.prims

VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
# fused SDPA kernel → (position of attn_mask / attn_bias, its name, position of dropout_p); is_causal follows
# dropout_p.
# A position of None means keyword-only; a name of None means the kernel takes no mask.
SDPA_VARIANTS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (None, "attn_mask", 3),
    aten._scaled_dot_product_efficient_attention.default: (3, "attn_bias", 5),
    aten._scaled_dot_product_flash_attention.default: (None, None, 3),
    aten._scaled_dot_product_cudnn_attention.default: (3, "attn_bias", 5),
}
KEEP_FORMATS = (None, torch.preserve_format, torch.contiguous_format)


def replace(node: fx.Node, target, args, kwargs=None) -> fx.Node:
    """Insert target(*args, **kwargs) before node, give it node's users and meta, erase node."""
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, tuple(args), kwargs or {})
    infer_meta(new)
    new.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
    return new


def transposed_weight(node) -> fx.Node | None:
    """w when node is t(w) or permute(w, [1, 0]) of a 2-D w."""
    if is_call(node, aten.t) or (is_call(node, aten.permute) and list(node.args[1]) in ([1, 0], [-1, -2])):
        return node.args[0]
    return None


def mm_to_linear(node: fx.Node) -> bool:
    if is_call(node, aten.mm):
        a, mat2, bias = node.args[0], node.args[1], None
    elif is_call(node, aten.addmm) and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        bias, a, mat2 = node.args[:3]
        if tensor_meta(bias) is None or tensor_meta(bias).dim() != 1:
            return False
    else:
        return False
    weight = transposed_weight(mat2)
    if weight is None:
        return False
    replace(node, aten.linear.default, (a, weight) if bias is None else (a, weight, bias))
    erase_if_unused(mat2)
    return True


def erase_if_unused(*nodes: fx.Node) -> None:
    """Drop what a rewrite left without users, so no stale view adds a use the fusion matchers would see."""
    for node in nodes:
        if not node.users:
            node.graph.erase_node(node)


def fold_linear_views(out_view: fx.Node) -> bool:
    """view(linear(view(x, [N, K]), w, b), [*lead, M]) → linear(x, w, b) when x is [*lead, K]."""
    if not is_call(out_view, *VIEWS) or not is_call(out_view.args[0], aten.linear):
        return False
    lin = out_view.args[0]
    in_view = lin.args[0]
    if len(lin.users) != 1 or not is_call(in_view, *VIEWS) or not isinstance(in_view.args[0], fx.Node):
        return False
    x, flat, out = tensor_meta(in_view.args[0]), tensor_meta(in_view), tensor_meta(out_view)
    if x is None or flat is None or out is None or flat.dim() != 2 or x.dim() < 2:
        return False
    lead = x.shape[:-1]
    rows = sym_expr(flat.shape[0]) - sympy_prod(lead)
    if rows.expand() != 0 or not same_sizes(out.shape[:-1], lead) or not same_sizes([x.shape[-1]], [flat.shape[1]]):
        return False
    replace(out_view, aten.linear.default, (in_view.args[0], *lin.args[1:]))
    erase_if_unused(lin, in_view)
    return True


def sympy_prod(sizes):
    total = sym_expr(1)
    for size in sizes:
        total = total * sym_expr(size)
    return total


def sdpa_to_aten(node: fx.Node) -> bool:
    spec = SDPA_VARIANTS.get(node.target)
    if spec is None:
        return False
    users = list(node.users)
    if not users or any(not (u.target is operator.getitem and u.args[1] == 0) for u in users):
        return False
    mask_index, mask_name, dropout_index = spec
    if mask_index is not None and len(node.args) > mask_index:
        mask = node.args[mask_index]
    else:
        mask = node.kwargs.get(mask_name) if mask_name else None
    q, k, v = node.args[:3]
    dropout = node_arg(node, dropout_index, "dropout_p", 0.0)
    is_causal = node_arg(node, dropout_index + 1, "is_causal", False)
    scale = node.kwargs.get("scale")
    kwargs = {} if scale is None else {"scale": scale}
    qm, km = tensor_meta(q), tensor_meta(k)
    if qm is None or km is None or qm.shape[-3] != km.shape[-3]:  # the fused kernels take GQA heads as they are
        kwargs["enable_gqa"] = True
    q_meta, k_meta = tensor_meta(q), tensor_meta(k)
    if q_meta is not None and k_meta is not None and q_meta.shape[-3] != k_meta.shape[-3]:
        kwargs["enable_gqa"] = True  # the fused variants take GQA natively; the composite op must be told
    first = users[0]
    for extra in users[1:]:
        extra.replace_all_uses_with(first)
        node.graph.erase_node(extra)
    replace(first, aten.scaled_dot_product_attention.default, (q, k, v, mask, dropout, is_causal), kwargs)
    node.graph.erase_node(node)
    return True


def cast_dtype(node: fx.Node):
    """The target dtype when node only changes the dtype of its input, else None."""
    if is_call(node, prims.convert_element_type):
        return node.args[1]
    if not (is_call(node, aten._to_copy) or node.target is aten.to.dtype_layout):
        return None
    kw = node.kwargs
    if kw.get("dtype") is None or kw.get("memory_format") not in KEEP_FORMATS or kw.get("layout") not in (
            None, torch.strided):
        return None
    if kw.get("device") is not None:
        src = tensor_meta(node.args[0])
        if src is None or src.device != kw["device"]:
            return None
    return kw["dtype"]


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            ctx.matched("canonicalize.assert_metadata")
        elif mm_to_linear(node):
            ctx.matched("canonicalize.linear")
        elif sdpa_to_aten(node):
            ctx.matched("canonicalize.sdpa")
        elif (dtype := cast_dtype(node)) is not None:
            replace(node, aten.to.dtype, (node.args[0], dtype))
            ctx.matched("canonicalize.cast")
    for node in list(graph.nodes):
        if fold_linear_views(node):
            ctx.matched("canonicalize.linear_views")


PASS = GraphPass("canonicalize", run)
