"""Matchers for the pieces of an attention projection as ATen spells them: per-head RMSNorm, rotate-half rope
(the interleaved GPT-J form is recognised only to be refused), last-dim slices.

Each matcher walks BACKWARD from the node that produces the piece's value and returns a small record (with
the set of nodes it covers) or None. Shapes and dtypes come from `node.meta["val"]` (export / AOT tracing).
"""

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .fx_utils import is_call, meta_val, node_arg, tensor_meta

aten = torch.ops.aten

CASTS = (aten.to, aten._to_copy)
COPIES = (aten.clone, aten.contiguous, aten.alias)
SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.unsafe_split_with_sizes)


def shape(node) -> tuple | None:
    val = tensor_meta(node)
    return None if val is None else tuple(val.shape)


def dtype(node) -> torch.dtype | None:
    val = tensor_meta(node)
    return None if val is None else val.dtype


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def is_cast(node) -> bool:
    """A dtype conversion (or a plain copy) of its first argument."""
    return is_call(node, *CASTS, *COPIES) and isinstance(node.args[0], fx.Node)


def is_noop(node) -> bool:
    """A cast to the dtype its input already has, or a copy: the value is unchanged."""
    return is_cast(node) and dtype(node) is not None and dtype(node) == dtype(node.args[0])


def strip(node, nodes: set, test=is_cast) -> fx.Node:
    """Walk back through nodes passing `test` (casts by default), adding them to `nodes`."""
    while test(node):
        nodes.add(node)
        node = node.args[0]
    return node


# ── last-dim ranges: x[..., a:b], split / chunk pieces ────────────────────────────────────────────────────
@dataclass(frozen=True)
class Range:
    src: fx.Node
    start: int
    end: int
    nodes: frozenset


def _slice_range(node) -> Range | None:
    src, src_shape = node.args[0], shape(node.args[0])
    dim, start, end = node_arg(node, 1, "dim", 0), node_arg(node, 2, "start"), node_arg(node, 3, "end")
    if src_shape is None or node_arg(node, 4, "step", 1) != 1 or norm_dim(dim, len(src_shape)) != len(src_shape) - 1:
        return None
    size = src_shape[-1]
    start, end = 0 if start is None else start, size if end is None else end
    if not all(isinstance(v, int) for v in (start, end, size)):
        return None
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return Range(src, start, end, frozenset({node}))


def last_dim_range(node) -> Range | None:
    """node = src[..., start:end] spelled as aten.slice (step 1) or a getitem of a last-dim split / chunk."""
    if is_call(node, aten.slice) and isinstance(node.args[0], fx.Node):
        return _slice_range(node)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    if not is_call(split, *SPLITS) or not isinstance(split.args[0], fx.Node):
        return None
    pieces, src_shape = meta_val(split), shape(split.args[0])
    if src_shape is None or norm_dim(node_arg(split, 2, "dim", 0), len(src_shape)) != len(src_shape) - 1:
        return None
    widths = [p.shape[-1] for p in pieces]
    if not all(isinstance(w, int) for w in widths):
        return None
    start = sum(widths[:index])
    return Range(split.args[0], start, start + widths[index], frozenset({node, split}))


# ── RMSNorm over the last dim ─────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Norm:
    x: fx.Node                 # the tensor normalised (before any cast to fp32)
    weight: fx.Node | None     # the [D] weight (None: no weight)
    eps: float
    nodes: frozenset           # the spelling's nodes, the output included


def _normalized(node) -> tuple[fx.Node, float, set] | None:
    """xf * rsqrt(mean(xf², -1, keepdim) + eps), xf = x or a cast of x → (x, eps, nodes)."""
    if not is_call(node, aten.mul) or len(node.args) != 2:
        return None
    for xf, r in (node.args, node.args[::-1]):
        if not (is_call(r, aten.rsqrt) and is_call(r.args[0], aten.add)):
            continue
        add = r.args[0]
        mean, eps = add.args if isinstance(add.args[1], float) else add.args[::-1]
        if not (isinstance(eps, float) and is_call(mean, aten.mean) and node_arg(mean, 2, "keepdim", False)):
            continue
        rank = len(shape(mean.args[0]) or ())
        if [norm_dim(d, rank) for d in mean.args[1]] != [rank - 1]:
            continue
        sq = mean.args[0]
        if not ((is_call(sq, aten.pow) and sq.args[0] is xf and sq.args[1] == 2)
                or (is_call(sq, aten.mul) and sq.args[0] is xf and sq.args[1] is xf)):
            continue
        nodes = {node, r, add, mean, sq}
        return strip(xf, nodes), eps, nodes
    return None


def match_rms_norm(y) -> Norm | None:
    """y = RMSNorm(x) over the last dim, spelled as F.rms_norm (aten.rms_norm), as HF Llama/Qwen3RMSNorm (fp32
    statistics, cast back, times the weight), or as the plain product with or without casts."""
    if is_call(y, aten.rms_norm):
        x, normalized_shape, weight, eps = (list(y.args) + [None, None])[:4]
        if len(normalized_shape) != 1 or dtype(x) is None:
            return None
        return Norm(x, weight, torch.finfo(dtype(x)).eps if eps is None else eps, frozenset({y}))
    nodes: set = {y}
    top = strip(y, nodes)
    found, weight = _normalized(top), None
    if found is None and is_call(top, aten.mul) and len(top.args) == 2:
        for w, rest in (top.args, top.args[::-1]):
            cast_nodes: set = set()
            found = _normalized(strip(rest, cast_nodes))
            if found is not None and isinstance(w, fx.Node) and shape(w) == (shape(found[0]) or ())[-1:]:
                weight = strip(w, set())
                nodes |= cast_nodes | {top}
                break
            found = None
    if found is None:
        return None
    x, eps, inner = found
    return Norm(x, weight, eps, frozenset(nodes | inner))


# ── rope ──────────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Rope:
    out: fx.Node       # the roped tensor (the add, or the cat putting the pass-through channels back)
    x: fx.Node         # the tensor roped, all head channels
    cos: fx.Node       # the cos / sin operands of the products, broadcast against x's rotated channels
    sin: fx.Node
    rot_dim: int
    nodes: frozenset   # the spelling's nodes (out included; x, cos and sin not)


def _rotate_half_nodes(r, t) -> set | None:
    """r = cat(-t[..., h:], t[..., :h], -1) with 2h = t's last dim → its nodes, else None."""
    if not is_call(r, aten.cat) or len(r.args[0]) != 2 or shape(t) is None:
        return None
    rank = len(shape(t))
    if norm_dim(node_arg(r, 1, "dim", 0), rank) != rank - 1:
        return None
    neg, first = r.args[0]
    if is_call(neg, aten.neg):
        second = neg.args[0]
    elif is_call(neg, aten.mul) and -1 in neg.args:
        second = neg.args[0] if neg.args[1] == -1 else neg.args[1]
    else:
        return None
    a, b, width = last_dim_range(first), last_dim_range(second), shape(t)[-1]
    if a is None or b is None or a.src is not t or b.src is not t or width % 2:
        return None
    if (a.start, a.end, b.start, b.end) != (0, width // 2, width // 2, width):
        return None
    return {r, neg} | a.nodes | b.nodes


def _rotation(add) -> tuple[fx.Node, fx.Node, fx.Node, set] | None:
    """add = t*cos + rotate_half(t)*sin, any operand order → (t, cos, sin, nodes)."""
    if not is_call(add, aten.add) or len(add.args) != 2 or not all(is_call(m, aten.mul) for m in add.args):
        return None
    for m_cos, m_sin in (add.args, add.args[::-1]):
        for t, cos in (m_cos.args, m_cos.args[::-1]):
            for r, sin in (m_sin.args, m_sin.args[::-1]):
                if not all(isinstance(v, fx.Node) for v in (t, cos, sin)):
                    continue
                nodes = _rotate_half_nodes(r, t)
                if nodes is not None:
                    return t, cos, sin, nodes | {add, m_cos, m_sin}
    return None


def match_rope(out) -> Rope | None:
    """Neox rope x*cos + rotate_half(x)*sin, or partial: cat(rope(x[..., :r]), x[..., r:]) on the last dim."""
    if is_call(out, aten.cat) and len(out.args[0]) == 2 and shape(out) is not None:
        roped, rest = out.args[0]
        inner = _rotation(roped) if norm_dim(node_arg(out, 1, "dim", 0), len(shape(out))) == len(shape(out)) - 1 \
            else None
        rot = last_dim_range(inner[0]) if inner else None
        keep = last_dim_range(rest)
        if rot and keep and rot.src is keep.src and rot.start == 0 and keep.start == rot.end \
                and keep.end == shape(rot.src)[-1]:
            _, cos, sin, nodes = inner
            return Rope(out, rot.src, cos, sin, rot.end, frozenset(nodes | rot.nodes | keep.nodes | {out}))
    inner = _rotation(out)
    if inner is None:
        return None
    t, cos, sin, nodes = inner
    return Rope(out, t, cos, sin, shape(t)[-1], frozenset(nodes))


def is_interleaved_rope(node) -> bool:
    """x*cos + rot(x)*sin where rot(x) is built from x[..., ::2] and x[..., 1::2] (GPT-J, GLM), or a complex
    product of x viewed as pairs (Meta Llama's view_as_complex)."""
    if is_call(node, aten.view_as_complex):
        return True
    if not is_call(node, aten.add) or not all(is_call(m, aten.mul) for m in node.args[:2]):
        return False
    operands = [a for m in node.args[:2] for a in m.args if isinstance(a, fx.Node)]
    frontier, seen = list(operands), set()
    while frontier and len(seen) < 24:
        n = frontier.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if is_call(n, aten.slice) and node_arg(n, 4, "step", 1) == 2 and n.args[0] in operands:
            return True
        if is_call(n, aten.stack, aten.flatten, aten.view, aten.reshape, aten.neg, aten.cat, aten.mul,
                   aten.repeat_interleave, aten.unsqueeze, aten.slice, *CASTS):
            for a in n.args:
                frontier.extend(x for x in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(x, fx.Node))
    return False
