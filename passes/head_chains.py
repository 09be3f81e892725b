"""Per-head projection chains: x ─ linear ─ view(B,S,H,D) ─ [RMSNorm] ─ [transpose(1,2)] ─ [rope] ─▶ out.

`trace_roped(rope)` walks back from a rope to its projection; `plain_chains(x)` walks forward from the
projections of x to the un-roped head tensors (v candidates). A projection is a `Proj` (a linear, or a last-dim
piece of a fused linear) or a `ConcatProj` (the DFlash draft's cat(linear(ctx), linear(block)) on the seq dim).
Failures are returned as a sentence (str) for ctx.reject.
"""

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .fx_utils import is_call, node_arg, same_sizes
from .rope_patterns import (Norm, Rope, dtype, is_interleaved_rope, is_noop, last_dim_range, match_rms_norm,
                            match_rope, norm_dim, shape, strip, SPLITS)

aten = torch.ops.aten
HEAD_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten)
ATTENTION_OPS = (aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention,
                 aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention_for_cpu,
                 aten._scaled_dot_product_cudnn_attention, aten.matmul, aten.bmm)


def describe(node) -> str:
    target = getattr(node.target, "__name__", str(node.target)) if isinstance(node, fx.Node) else repr(node)
    return f"%{node.name} ({target})" if isinstance(node, fx.Node) else target


@dataclass(frozen=True)
class Proj:
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    rows: tuple[int, int] | None      # a row range of weight (a piece of a fused projection), None = all rows
    out: fx.Node                      # the projected [B, S, rows] tensor
    nodes: frozenset                  # linear (+ split / slice) nodes


@dataclass(frozen=True)
class ConcatProj:
    """cat([linear(ctx, W, b), linear(block, W, b)], seq dim): the draft's k / v over context + block."""
    ctx: Proj
    block: Proj
    out: fx.Node
    nodes: frozenset


@dataclass(frozen=True)
class Table:
    """A cos / sin table as the op wants it: `base` [B|1, S', rot] (or [S', rot], or still carrying a size-1
    head axis at `head_axis`), then `seq` = the slice node taken along its sequence axis (None: all of it)."""
    base: fx.Node
    seq: fx.Node | None
    head_axis: int | None              # a negative axis of base still to squeeze, None if already gone
    nodes: frozenset                   # unsqueeze / slice nodes between base and the rope's operand

    def key(self):
        return self.base, None if self.seq is None else tuple(self.seq.args[2:4])


@dataclass(frozen=True)
class Chain:
    source: Proj | ConcatProj
    heads: int
    head_dim: int
    bhsd: bool                         # out is [B, H, S, D] (else [B, S, H, D])
    out: fx.Node
    nodes: frozenset                   # between source.out (excluded) and out (included)
    norm: Norm | None = None
    rope: Rope | None = None
    cos: Table | None = None
    sin: Table | None = None


def _linear(node) -> Proj | None:
    if not is_call(node, aten.linear) or not isinstance(node.args[1], fx.Node):
        return None
    return Proj(node.args[0], node.args[1], node_arg(node, 2, "bias"), None, node, frozenset({node}))


def same_param(a, b) -> bool:
    return a is b or (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "get_attr"
                      and a.target == b.target)


def _proj(node) -> Proj | None:
    """linear(x, W, b), or a last-dim piece of one (a fused projection split into parts)."""
    node = strip(node, set(), is_noop)
    if (proj := _linear(node)) is not None:
        return proj
    piece = last_dim_range(node)
    if piece is not None and (whole := _linear(piece.src)) is not None:
        return Proj(whole.x, whole.weight, whole.bias, (piece.start, piece.end), node, whole.nodes | piece.nodes)
    return None


def match_source(node) -> Proj | ConcatProj | str:
    if (proj := _proj(node)) is not None:
        return proj
    if is_call(node, aten.cat) and len(node.args[0]) == 2 and len(shape(node) or ()) == 3 \
            and norm_dim(node_arg(node, 1, "dim", 0), 3) == 1:
        ctx, block = (_proj(a) for a in node.args[0])
        if ctx and block and same_param(ctx.weight, block.weight) and same_param(ctx.bias, block.bias) \
                and ctx.rows == block.rows:
            return ConcatProj(ctx, block, node, ctx.nodes | block.nodes | {node})
    return f"the heads come from {describe(node)}, not from a linear projection"


def _head_view(node) -> tuple[int, int] | None:
    """node reshapes [B, S, H·D] into [B, S, H, D] → (H, D)."""
    if not is_call(node, *HEAD_VIEWS) or not isinstance(node.args[0], fx.Node):
        return None
    src, out = shape(node.args[0]), shape(node)
    if src is None or out is None or len(src) != 3 or len(out) != 4 or tuple(src[:2]) != tuple(out[:2]):
        return None
    heads, head_dim = out[2], out[3]
    if not (isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim == src[2]):
        return None
    return heads, head_dim


def _is_transpose12(node) -> bool:
    """transpose(1, 2) of a 4-D tensor, or the same spelled as permute(0, 2, 1, 3)."""
    if len(shape(node) or ()) != 4:
        return False
    if is_call(node, aten.permute):
        return [norm_dim(d, 4) for d in node.args[1]] == [0, 2, 1, 3]
    return is_call(node, aten.transpose) and sorted(norm_dim(d, 4) for d in node.args[1:3]) == [1, 2]


def table(operand: fx.Node, head_axis: int, seq_axis: int) -> Table:
    """Peel the head-axis unsqueeze and one sequence slice off a rope's cos / sin operand (axes negative)."""
    node, seq, nodes = operand, None, set()
    while True:
        rank = len(shape(node) or ())
        if head_axis is not None and is_call(node, aten.unsqueeze) and norm_dim(node.args[1], rank) == rank + head_axis:
            nodes.add(node)
            node, seq_axis, head_axis = node.args[0], (seq_axis if seq_axis > head_axis else seq_axis + 1), None
        elif seq is None and is_call(node, aten.slice) and node_arg(node, 4, "step", 1) == 1 \
                and norm_dim(node_arg(node, 1, "dim", 0), rank) == rank + seq_axis:
            nodes.add(node)
            whole = same_sizes([shape(node)[seq_axis]], [shape(node.args[0])[seq_axis]])
            node, seq = node.args[0], None if whole else node
        else:
            return Table(node, seq, head_axis if head_axis is not None and rank >= -head_axis else None,
                         frozenset(nodes))


def trace_roped(rope: Rope) -> Chain | str:
    """Walk back from a rope to the projection: casts that change nothing, one transpose(1, 2), one RMSNorm
    over the head dim, then the [B, S, H·D] → [B, S, H, D] view."""
    nodes, node, bhsd, norm = set(rope.nodes), rope.x, False, None
    while (head := _head_view(node)) is None:
        if is_noop(node):
            nodes.add(node)
            node = node.args[0]
        elif _is_transpose12(node):
            nodes.add(node)
            node, bhsd = node.args[0], not bhsd
        elif norm is None and (found := match_rms_norm(node)) is not None:
            nodes |= found.nodes
            node, norm = found.x, found
        else:
            return f"{describe(node)} between the projection and the rope is not a view, transpose or RMSNorm"
    nodes.add(node)
    source = match_source(node.args[0])
    if isinstance(source, str):
        return source
    head_axis, seq_axis = (-3, -2) if bhsd else (-2, -3)
    cos, sin = table(rope.cos, head_axis, seq_axis), table(rope.sin, head_axis, seq_axis)
    for t, name in ((cos, "cos"), (sin, "sin")):
        base = shape(t.base)
        if base is None or base[-1] != rope.rot_dim or len(base) - (t.head_axis is not None) > 3 \
                or (t.head_axis is not None and base[t.head_axis] != 1):
            return f"the rope's {name} {describe(t.base)} of shape {base} is not a [B, S, {rope.rot_dim}] table"
    return Chain(source, *head, bhsd, rope.out, frozenset(nodes), norm, rope, cos, sin)


def _projections(x: fx.Node) -> list[Proj | ConcatProj]:
    """The projections of x: each linear(x) or each last-dim piece of a split one; the cat one feeds if any."""
    found = []
    for lin in x.users:
        if _linear(lin) is None or lin.args[0] is not x:
            continue
        users = _real_users(lin)
        pieces = [g for u in users for g in (u.users if is_call(u, *SPLITS) else [u])]
        for out in pieces if users and all(last_dim_range(p) for p in pieces) else [lin]:
            nxt = _real_users(out)
            found.append(match_source(nxt[0] if len(nxt) == 1 and is_call(nxt[0], aten.cat) else out))
    return [s for s in found if not isinstance(s, str)]


def plain_chains(x: fx.Node) -> list[Chain]:
    """The un-roped head tensors projected from x: projection ─ view(B,S,H,D) ─ [transpose(1,2)]."""
    chains = []
    for source in _projections(x):
        users = _real_users(source.out)
        if len(users) != 1 or (head := _head_view(users[0])) is None:
            continue
        view = out = users[0]
        after = _real_users(view)
        if len(after) == 1 and _is_transpose12(after[0]):
            out = after[0]
        chains.append(Chain(source, *head, out is not view, out, frozenset({view, out})))
    return chains


def _real_users(node) -> list[fx.Node]:
    return [u for u in node.users if not is_idle(u)]


def is_assert(node) -> bool:
    return is_call(node, aten._assert_tensor_metadata)


def is_idle(node) -> bool:
    """A user that does not count: a metadata assert, or an unused getitem (a split piece nobody reads)."""
    return is_assert(node) or (node.target is operator.getitem and not node.users)


def attention_operand(node: fx.Node, limit: int = 64) -> int | None:
    """Which positional argument of the attention op (SDPA, matmul) the value of node reaches first, following
    users breadth-first (through views, casts, GQA expands, cache writes); None if none within `limit` nodes."""
    frontier, seen = [node], {node}
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            for user in n.users:
                if is_call(user, *ATTENTION_OPS, torch.ops.dflash.attention):
                    return next(i for i, a in enumerate(user.args) if a is n) if n in user.args else None
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return None


def escaping_use(nodes: set, outs: set) -> tuple[fx.Node, fx.Node] | None:
    """(inner, user) where a node of the site other than its outputs is used outside the site."""
    for n in nodes - outs:
        for user in n.users:
            if user not in nodes and not is_idle(user):
                return n, user
    return None


def dtype_mismatch(reference: fx.Node, named: dict[str, fx.Node | None]) -> str | None:
    want = dtype(reference)
    for name, node in named.items():
        if node is not None and dtype(node) != want:
            return f"dtype of x is {want}, {name} {dtype(node)}"
    return None


def find_roped(graph: fx.Graph) -> tuple[list[Chain], list[tuple[fx.Node, str]]]:
    """Every neox rope of the graph traced back to its projection, and (node, reason) for those that could
    not be (interleaved ropes included). A rope nested in another (the inner add of a partial rope) is skipped."""
    ropes, failures = [], []
    for node in graph.nodes:
        rope = match_rope(node)
        if rope is not None:
            ropes.append(rope)
        elif is_interleaved_rope(node):
            failures.append((node, "rope is interleaved (GPT-J), not rotate-half"))
    inner = set().union(*(r.nodes - {r.out} for r in ropes))
    chains = []
    for rope in ropes:
        if rope.out in inner:
            continue
        chain = trace_roped(rope)
        if isinstance(chain, str):
            failures.append((rope.out, chain))
        else:
            chains.append(chain)
    return chains, failures
