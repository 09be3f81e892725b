"""rope_cos_sin: the rope tables a step builds from its positions become one dflash.rope_cos_sin.

before:  freqs = mul(to(unsqueeze(positions, -1), f32), inv_freq)          (ours, transformers 5, z-lab's draft)
               | transpose(matmul(expand(inv_freq[None, :, None], [B, -1, 1]), to(positions[:, None, :], f32)), 1, 2)
                                                                            (transformers 4's RotaryEmbedding)
         emb = cat([freqs, freqs], -1)
         cos = to(mul(cos(emb), scale), dtype);  sin = to(mul(sin(emb), scale), dtype)   (scale, casts optional)
after:   tables = dflash.rope_cos_sin(positions, inv_freq, scale, dtype);  cos, sin = tables[0], tables[1]
An inv_freq computed from constants only (our arange / pow / reciprocal chain) is evaluated here, by the graph's
own ops on its device (the same bits), and becomes a constant (recipe "values"); a buffer or an input is read as
it is. Runs after the fusions, which take cos/sin as they find them; skipped before Inductor, which fuses the
chain itself (pipeline.INDUCTOR_FUSES).
Guards (a refusal is recorded, the chain stays): emb is read by one cos and one sin only; the angles are fp32
products of an integer positions tensor (cast to fp32) and a 1-D fp32 inv_freq; cos and sin are scaled and cast
alike. Numerics: the op computes what the chain computed — fp32 angles, cos/sin, one rounding.
"""

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .cleanup import SAME_VALUE_VIEWS, is_noop_view
from .fx_utils import add_constant, infer_meta, is_call, node_arg, same_sizes, tensor_meta
from .head_chains import describe
from .manager import GraphPass, PassContext
from .projection_rewrite import erase_unused
from .rope_patterns import dtype, is_noop, norm_dim, strip

NAME = "rope_cos_sin"
aten = torch.ops.aten
SWAPS = ((1, 2), (2, 1), (-1, -2), (-2, -1))


def _to_fp32(node) -> bool:
    return is_call(node, aten.to) and dtype(node) == torch.float32


def _same_values(node) -> bool:
    """A no-op cast or copy, or a view that keeps the shape (a full slice: `position_ids[:, None, :]`)."""
    return is_noop(node) or is_call(node, *SAME_VALUE_VIEWS, aten.slice) and is_noop_view(node)


def _positions(node, shape) -> tuple[fx.Node, set] | str:
    """The integer tensor of `shape` that node holds as fp32 with size-1 dims added, or why not."""
    nodes: set = set()
    while (val := tensor_meta(node)) is not None:
        if not val.is_floating_point() and not val.is_complex() and same_sizes(val.shape, shape):
            return node, nodes
        if not (is_call(node, aten.unsqueeze) or _to_fp32(node) or _same_values(node)):
            break
        nodes.add(node)
        node = node.args[0]
    if val is None or val.is_floating_point() or val.is_complex():
        return f"positions are {None if val is None else val.dtype}, not an integer tensor"
    return "positions do not have the tables' token dims"


def _inv_freq(node, width, expanded: bool) -> tuple[fx.Node, set] | str:
    """The 1-D fp32 [width] tensor node holds (as [1, width, 1] broadcast to [B, width, 1] when expanded)."""
    nodes: set = set()
    if expanded:
        node = strip(node, nodes, lambda n: is_call(n, aten.expand) or _same_values(n))
        val = tensor_meta(node)
        if val is None or not same_sizes(val.shape, (1, width, 1)):
            return "inv_freq is not broadcast along the batch only"
        node = strip(node, nodes, lambda n: is_call(n, aten.unsqueeze) or _same_values(n))
    root = strip(node, nodes, _same_values)
    val = tensor_meta(root)
    if val is None or val.dim() != 1 or val.dtype != torch.float32 or not same_sizes(val.shape, (width,)):
        return f"inv_freq is {None if val is None else (tuple(val.shape), val.dtype)}, not fp32 [{width}]"
    return root, nodes


def _angles(freqs: fx.Node) -> tuple[fx.Node, fx.Node, set] | str:
    """freqs = positions · inv_freq in one of the two spellings → (positions, inv_freq, the nodes), or why not."""
    val = tensor_meta(freqs)
    if val is None or val.dtype != torch.float32:
        return f"the angles are {None if val is None else val.dtype}, not fp32"
    lead, width = val.shape[:-1], val.shape[-1]
    if is_call(freqs, aten.mul) and len(freqs.args) == 2 and all(isinstance(a, fx.Node) for a in freqs.args):
        found: str | tuple = "the angles' product has no integer positions operand"
        for pos, inv in (freqs.args, freqs.args[::-1]):
            if tensor_meta(pos) is None or not same_sizes(tensor_meta(pos).shape, (*lead, 1)):
                continue
            found = _positions(pos, lead)
            if isinstance(found, tuple):
                inverse = _inv_freq(inv, width, expanded=False)
                if isinstance(inverse, str):
                    return inverse
                return found[0], inverse[0], found[1] | inverse[1] | {freqs}
        return found
    if is_call(freqs, aten.transpose) and tuple(freqs.args[1:]) in SWAPS and len(lead) == 2 and \
            is_call(freqs.args[0], aten.matmul):
        matmul = freqs.args[0]
        found = _positions(matmul.args[1], lead)
        inverse = _inv_freq(matmul.args[0], width, expanded=True)
        if isinstance(found, str) or isinstance(inverse, str):
            return found if isinstance(found, str) else inverse
        return found[0], inverse[0], found[1] | inverse[1] | {freqs, matmul}
    return f"the angles {describe(freqs)} are not positions · inv_freq"


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _scale_of(mul, table: fx.Node) -> float | None:
    if not is_call(mul, aten.mul) or len(mul.args) != 2 or table not in mul.args:
        return None
    factor = mul.args[1] if mul.args[0] is table else mul.args[0]
    return float(factor) if isinstance(factor, (int, float)) and not isinstance(factor, bool) else None


def _tail(table: fx.Node) -> tuple[float, torch.dtype, fx.Node, set]:
    """cos(emb) or sin(emb), then `* scale` and `.to(dtype)` while each is the only reader →
    (scale, dtype, the last node, the nodes)."""
    scale, end, nodes = 1.0, table, {table}
    factor = _scale_of(_only_user(end), end)
    if factor is not None:
        scale, end = factor, _only_user(end)
        nodes.add(end)
    user = _only_user(end)
    if user is not None and user.target is aten.to.dtype and dtype(user) is not None:
        end = user
        nodes.add(end)
    return scale, dtype(end), end, nodes


def _constant_chain(node: fx.Node) -> list[fx.Node] | None:
    """The nodes node is computed from, in graph order, when none reads an input, a buffer or a random state."""
    chain, todo = {}, [node]
    while todo:
        n = todo.pop()
        if n in chain:
            continue
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or \
                torch.Tag.nondeterministic_seeded in n.target.tags:
            return None
        chain[n] = None
        todo.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _fold(gm: fx.GraphModule, inv: fx.Node, anchor: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """inv as a constant (its chain evaluated with the graph's ops, on its device) when it is one, else itself."""
    chain = _constant_chain(inv)
    if chain is None:
        return inv, []
    values: dict = {}
    with unset_fake_temporarily(), torch.no_grad():
        for n in chain:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
            values[n] = n.target(*args, **kwargs)
    value = values[inv]
    constant = add_constant(gm, anchor, "dflash_inv_freq", ("values", tuple(value.tolist()), value.dtype,
                                                           str(value.device)), value, like=inv)
    return constant, chain


def _rewrite(gm: fx.GraphModule, emb: fx.Node, ctx: PassContext) -> None:
    tables = {user.target.overloadpacket: user for user in emb.users if is_call(user, aten.cos, aten.sin)}
    if len(tables) != len(emb.users):
        ctx.reject(emb, f"the rope tables of {describe(emb)} stay: emb is read by other ops than one cos and one sin")
        return
    angles = _angles(emb.args[0][0])
    tails = {op: _tail(node) for op, node in tables.items()}
    kinds = {(scale, dt) for scale, dt, _, _ in tails.values()}
    why = angles if isinstance(angles, str) else None
    if why is None and len(kinds) > 1:
        why = "cos and sin are scaled or cast differently"
    if why:
        ctx.reject(emb, f"the rope tables of {describe(emb)} stay: {why}")
        return
    positions, inv, nodes = angles
    (scale, dt), = kinds
    inv, folded = _fold(gm, inv, emb)
    with gm.graph.inserting_before(emb):
        op = gm.graph.call_function(torch.ops.dflash.rope_cos_sin.default, (positions, inv, scale, dt))
        outs = {aten.cos: gm.graph.call_function(operator.getitem, (op, 0)),
                aten.sin: gm.graph.call_function(operator.getitem, (op, 1))}
    for node in (op, *outs.values()):
        infer_meta(node)
    for kind, (_, _, end, tail) in tails.items():
        end.replace_all_uses_with(outs[kind])
        nodes |= tail
    erase_unused(gm, {*nodes, emb, *folded, *outs.values()})
    ctx.matched(NAME)


def _is_emb(node: fx.Node) -> bool:
    """cat([freqs, freqs], last dim) read by a cos or a sin."""
    if not is_call(node, aten.cat) or len(node.args[0]) != 2 or node.args[0][0] is not node.args[0][1]:
        return False
    rank = len(tensor_meta(node).shape) if tensor_meta(node) is not None else 0
    last = rank > 0 and norm_dim(node_arg(node, 1, "dim", 0), rank) == rank - 1
    return last and any(is_call(user, aten.cos, aten.sin) for user in node.users)


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if _is_emb(node):
            _rewrite(gm, node, ctx)


PASS = GraphPass(NAME, run)
