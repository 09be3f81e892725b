"""canonicalize — rewrite AOT-autograd spellings into the export spellings the fusion passes match.

before → after (each site counted as "canonicalize.<what>"):
  linear:  mm(a, t(w)) | mm(a, permute(w, [1, 0]))               → linear(a, w)
           addmm(b, a, t(w))            (beta = alpha = 1)         → linear(a, w, b)
  linear_views: view(linear(view(x, [N, K]), w, b), [*lead, M]) → linear(x, w, b)  (x [*lead, K], N = Π lead)
  matmul:  view(bmm(view(expand(a, [*batch, n, k]), [N, n, k]), view(expand(b, [*batch, k, m]), [N, k, m])),
           [*batch, n, m])                                         → matmul(a, b)
           (how AOT spells a batched matmul: a and b broadcast to batch, N = Π batch; each operand's expand, a
           clone and further reshapes on the way are optional — only the shapes are trusted)
  sdpa:    getitem(_scaled_dot_product_{flash_attention_for_cpu | efficient_attention | flash_attention |
           cudnn_attention}(q, k, v, …), 0)  (no other output used) → scaled_dot_product_attention(q, k, v, mask, …)
           (enable_gqa=True when k has fewer heads than q: those kernels take GQA heads as they are)
  cast:    _to_copy(x, dtype=d) | prims.convert_element_type(x, d) | to.dtype_layout(x, dtype=d)
                                                                   → to.dtype(x, d)
           (only when device, layout and memory format stay as they are)
  assert_metadata: _assert_tensor_metadata(x, …) → removed. Export adds these checks of a dtype the graph already
           fixes; as extra users they would hide single-use values from the fusion matchers.
Matmuls of a ≥ 3-D tensor by a 2-D one that is not a transposed weight (view + mm) stay as they are.
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


def is_reshape(node) -> bool:
    """view / reshape / _unsafe_view to a shape (not aten.view.dtype, which reinterprets the bits)."""
    return is_call(node, *VIEWS) and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], (list, tuple))


def fold_linear_views(out_view: fx.Node) -> bool:
    """view(linear(view(x, [N, K]), w, b), [*lead, M]) → linear(x, w, b) when x is [*lead, K]."""
    if not is_reshape(out_view) or not is_call(out_view.args[0], aten.linear):
        return False
    lin = out_view.args[0]
    in_view = lin.args[0]
    if len(lin.users) != 1 or not is_reshape(in_view):
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


def batched_operand(node) -> tuple[fx.Node, tuple] | None:
    """(x, E) when node = reshape(clone?(expand(x, E))), through any chain of reshapes and clones; without an
    expand x is where the chain starts and E its shape. x must broadcast to E with E's last two dims as they are."""
    while is_reshape(node) or is_call(node, aten.clone):
        node = node.args[0]
    x = node.args[0] if is_call(node, aten.expand) else node
    full, src = tensor_meta(node), tensor_meta(x)
    if not isinstance(x, fx.Node) or full is None or src is None or not 2 <= src.dim() <= full.dim():
        return None
    lead = full.dim() - src.dim()
    for i, size in enumerate(src.shape):
        if not same_sizes([size], [full.shape[lead + i]]) and (i >= src.dim() - 2 or sym_expr(size) != 1):
            return None
    return x, tuple(full.shape)


def fold_bmm_views(out_view: fx.Node) -> bool:
    """view(bmm(A, B), [*batch, n, m]) → matmul(a, b) when A, B are a and b expanded to batch and flattened."""
    if not is_reshape(out_view) or not is_call(out_view.args[0], aten.bmm) or len(out_view.args[0].users) != 1:
        return False
    bmm = out_view.args[0]
    sides = [batched_operand(x) for x in bmm.args[:2]]
    out, a3, b3 = tensor_meta(out_view), tensor_meta(bmm.args[0]), tensor_meta(bmm.args[1])
    if None in sides or out is None or a3 is None or b3 is None or out.dim() < 3:
        return False
    (a, a_full), (b, b_full) = sides
    batch = out.shape[:-2]
    if not (same_sizes(a_full, [*batch, *a3.shape[1:]]) and same_sizes(b_full, [*batch, *b3.shape[1:]])
            and same_sizes(out.shape[-2:], [a3.shape[1], b3.shape[2]])
            and (sym_expr(a3.shape[0]) - sympy_prod(batch)).expand() == 0):
        return False
    flattened = bmm.args[:2]
    replace(out_view, aten.matmul.default, (a, b))
    erase_if_unused(bmm)
    for node in flattened:  # the views, clones and expands that only fed the bmm
        while node not in (a, b) and not node.users:
            node, dead = node.args[0], node
            node.graph.erase_node(dead)
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
        elif fold_bmm_views(node):
            ctx.matched("canonicalize.matmul")


PASS = GraphPass("canonicalize", run)
