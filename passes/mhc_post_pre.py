"""mhc_post_pre — a DeepSeek-V4 mHC sublayer boundary (hc_post of sublayer L → hc_pre of L+1 → its RMSNorm) as one op.

before (transformers' DeepseekV4DecoderLayer / DeepseekV4HyperConnection spelling; models/mhc.py spells it the same):
  res' = post.to(dt).unsqueeze(-1) * x.unsqueeze(-2) + matmul(comb.to(dt).transpose(-1, -2), res)    hc_post of L
  xf   = res'.flatten(2).float();  xf = xf * rsqrt(mean(xf², -1) + rms_eps)                            hc_pre of L+1
  m    = linear(xf, fn.float());  m, base → split([n, n, n²]);  scale → unbind
  pre  = σ(m0·s0 + b0) + hc_eps;  post' = 2·σ(m1·s1 + b1)
  comb'= softmax(m2·s2 + b2) + hc_eps;  comb' /= comb'.sum(-2) + hc_eps;  (iters − 1) × (rows, columns), unrolled
  h    = RMSNorm_w((pre.unsqueeze(-1) * res').sum(2).to(dt), norm_eps)
after:
  res', h, post', comb' = dflash.mhc_post_pre(x, res, post, comb, fn, base, scale, w, rms_eps, hc_eps, iters, norm_eps)
The first sublayer's pre (its residual is not an hc_post) → layer_in, post', comb' = dflash.mhc_pre(res, fn, base, scale,
rms_eps, hc_eps, iters); its RMSNorm stays in the graph (mhc_pre has no norm). The last post (followed by the
hc_head, not a pre) → res' = dflash.mhc_post(x, res, post, comb). iters is counted from the unrolled Sinkhorn steps;
every eps is the graph's constant.
Guards (the site keeps its ATen spelling; the reason is recorded): Sinkhorn normalizes columns first, then (rows,
columns) pairs; one hc_eps throughout; the stream statistic and the mixes in fp32; comb transposed in hc_post; the
hc_post's output in the residual's dtype. A boundary whose layer input is read by more than its RMSNorm is fused
as mhc_post + mhc_pre instead. Its RMSNorm may multiply the weight in fp32 (DeepSeek) or after casting back
(transformers' DeepseekV4RMSNorm, like Qwen3's in qkv_norm_rope): the op multiplies in fp32, so in bf16 the normed
output can differ by one rounding.
In bf16 the fused ops accumulate in fp32 where transformers rounds post and comb to bf16 first (design §5).
AOT graphs (torch.compile) spell the matmul as expand + bmm; canonicalize turns that back into matmul first.
"""

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, node_arg, relax_views, same_sizes
from .manager import GraphPass, PassContext
from .rope_patterns import dtype, last_dim_range, match_rms_norm, norm_dim, shape, strip

aten = torch.ops.aten
dflash = torch.ops.dflash
VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten)


def readers(node: fx.Node) -> list[fx.Node]:
    """node's users, export's _assert_tensor_metadata checks left out (canonicalize drops them)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def same_shape(a, b) -> bool:
    return a is not None and b is not None and same_sizes(a, b)


def number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def ordered(node, target, test) -> tuple | None:
    """(a, b) = node's two operands with test(a, b) true, trying both orders (node a call of target)."""
    if not is_call(node, target) or len(node.args) != 2:
        return None
    for a, b in (node.args, node.args[::-1]):
        if test(a, b):
            return a, b
    return None


def with_const(node, target) -> tuple[fx.Node, float] | None:
    """node = target(x, c) or target(c, x) with a python constant c → (x, c)."""
    pair = ordered(node, target, lambda a, b: isinstance(a, fx.Node) and number(b) is not None)
    return (pair[0], number(pair[1])) if pair else None


def piece(node) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) when node (through casts and views) is source[..., start:end]."""
    r = last_dim_range(strip(strip(node, set()), set(), lambda n: is_call(n, *VIEWS)))
    return (strip(r.src, set()), r.start, r.end) if r else None


def scale_piece(node) -> tuple[fx.Node, int] | None:
    """(scale, k) when node is scale[k], spelled unbind(scale)[k] or select(scale, 0, k)."""
    node = strip(node, set())
    if is_call(node, aten.select) and node.args[1] == 0:
        return strip(node.args[0], set()), node.args[2]
    unbind = node.args[0] if node.target is operator.getitem else None
    if is_call(unbind, aten.unbind) and node_arg(unbind, 1, "dim", 0) == 0:
        return strip(node.args[0].args[0], set()), node.args[1]
    return None


def affine(node, mixes, base, scale, k, n) -> bool:
    """node = mixes[..., k·n:(k+1)·n] · scale[k] + base[k·n:(k+1)·n]."""
    def is_piece(x, src):
        return piece(x) == (src, k * n, (k + 1) * n)

    add = ordered(node, aten.add, lambda m, b: is_call(m, aten.mul) and is_piece(b, base))
    return add is not None and ordered(add[0], aten.mul, lambda p, s: is_piece(p, mixes) and
                                       scale_piece(s) == (scale, k)) is not None


@dataclass
class Pre:
    res: fx.Node          # the residual streams [.., n, D]
    first: fx.Node        # the flatten of res: where the fused op goes
    fn: fx.Node
    base: fx.Node
    scale: fx.Node
    n: int
    rms_eps: float
    hc_eps: float
    iters: int
    collapsed: fx.Node    # the layer input (the collapse, cast to res' dtype)
    post: fx.Node
    comb: fx.Node


def hc_statistic(normed) -> tuple[fx.Node, float] | str:
    """normed = xf * rsqrt(mean(xf², -1, keepdim) + eps)[.to(..)], xf the fp32 flattened streams → (xf, eps)."""
    def is_rsqrt(r, _):
        return is_call(strip(r, set()), aten.rsqrt)

    pair = ordered(normed, aten.mul, is_rsqrt)
    if pair is None:
        return "the mixes' input is not x * rsqrt(mean(x²) + eps)"
    rsqrt, xf = strip(pair[0], set()), pair[1]
    add = with_const(rsqrt.args[0], aten.add)
    mean = add[0] if add else None
    if not is_call(mean, aten.mean) or not node_arg(mean, 2, "keepdim", False):
        return "the stream statistic is not mean(x², -1, keepdim=True) + eps"
    square = mean.args[0]
    base = square.args[0] if is_call(square, aten.square) or (is_call(square, aten.pow) and square.args[1] == 2) \
        else square.args[0] if is_call(square, aten.mul) and square.args[0] is square.args[1] else None
    if base is None or strip(base, set()) is not strip(xf, set()):
        return "the stream statistic squares another tensor than it normalizes"
    if dtype(base) != torch.float32 or dtype(normed) != torch.float32:
        return f"the stream statistic runs in {dtype(base)}, not fp32"
    return xf, add[1]


def flattened_streams(xf, n) -> fx.Node | str:
    flat = strip(xf, set())
    if not is_call(flat, *VIEWS):
        return "the statistic's input is not the flattened residual streams"
    res, res_shape, flat_shape = flat.args[0], shape(flat.args[0]), shape(flat)
    if res_shape is None or flat_shape is None or len(res_shape) != len(flat_shape) + 1 or res_shape[-2] != n or \
            not same_shape(res_shape[:-2], flat_shape[:-1]):
        return f"the statistic's input {flat_shape} is not the residual {res_shape} with its {n} streams flattened"
    return res


def collapse_of(res, n) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(pre, the collapse sum, the layer input) for (pre.unsqueeze(-1) * res).sum(-2)[.to(res.dtype)]."""
    rank = len(shape(res))
    for user in res.users:
        pair = ordered(user, aten.mul, lambda u, r: r is res and is_call(u, aten.unsqueeze) and
                       norm_dim(u.args[1], rank) == rank - 1)
        if pair is None:
            continue
        for total in user.users:
            if is_call(total, aten.sum) and [norm_dim(d, rank) for d in total.args[1]] == [rank - 2] and \
                    not node_arg(total, 2, "keepdim", False):
                casts = [u for u in readers(total) if is_call(u, aten.to, aten._to_copy) and dtype(u) == dtype(res)]
                layer_in = casts[0] if len(readers(total)) == 1 and casts else total
                return pair[0].args[0], total, layer_in
    return None


def sinkhorn(comb0) -> tuple[fx.Node, list[int], set[float]] | None:
    """Follow comb /= comb.sum(d, keepdim) + eps from comb0 → (last comb, the dims normalized, the eps seen)."""
    comb, dims, eps = comb0, [], set()
    rank = len(shape(comb0))
    while True:
        step = None
        for user in comb.users:
            if is_call(user, aten.div) and user.args[0] is comb and (add := with_const(user.args[1], aten.add)):
                total = add[0]
                if is_call(total, aten.sum) and total.args[0] is comb and node_arg(total, 2, "keepdim", False) \
                        and len(total.args[1]) == 1:
                    step = user, norm_dim(total.args[1][0], rank) - rank, add[1]
        if step is None:
            return comb, dims, eps
        comb = step[0]
        dims.append(step[1])
        eps.add(step[2])


def post_of(mixes, base, scale, n) -> fx.Node | None:
    """The node 2·σ(mixes[.., n:2n]·scale[1] + base[n:2n]) among mixes' users."""
    pieces = [p for u in mixes.users for p in ([u] if u.target is not aten.split_with_sizes.default else u.users)]
    for p in pieces:
        for m in p.users:
            for a in m.users:
                if not affine(a, mixes, base, scale, 1, n):
                    continue
                for s in (s for s in a.users if is_call(s, aten.sigmoid)):
                    for post in s.users:
                        if with_const(post, aten.mul) == (s, 2.0):
                            return post
    return None


def match_pre(softmax) -> Pre | str | None:
    """An hc_pre anchored at its comb softmax; None when the softmax is not one (no reason recorded)."""
    if not is_call(softmax, aten.softmax, aten._softmax) or shape(softmax) is None:
        return None
    n = shape(softmax)[-1]
    if norm_dim(softmax.args[1], len(shape(softmax))) != len(shape(softmax)) - 1 or not isinstance(n, int):
        return None
    logits = ordered(softmax.args[0], aten.add, lambda m, b: is_call(m, aten.mul) and piece(b) is not None)
    mul = ordered(logits[0], aten.mul, lambda w, s: piece(w) is not None and scale_piece(s)) if logits else None
    if mul is None:
        return None
    (mixes, start, end), (base, b_start, b_end), (scale, k) = piece(mul[0]), piece(logits[1]), scale_piece(mul[1])
    if (start, end, b_start, b_end, k) != (2 * n, 2 * n + n * n, 2 * n, 2 * n + n * n, 2) or \
            not is_call(mixes, aten.linear) or len(mixes.args) != 2:
        return None
    fn = strip(mixes.args[1], set())
    stat = hc_statistic(mixes.args[0])
    if isinstance(stat, str):
        return stat
    res = flattened_streams(stat[0], n)
    if isinstance(res, str):
        return res
    if dtype(mixes) != torch.float32:
        return f"the mixes are {dtype(mixes)}, not fp32"
    collapse = collapse_of(res, n)
    post = post_of(mixes, base, scale, n)
    if collapse is None or post is None:
        return "the pre weights do not collapse the streams, or the post weights are not 2·σ(…)"
    pre_eps = with_const(collapse[0], aten.add)
    if not pre_eps or not is_call(pre_eps[0], aten.sigmoid) or not affine(pre_eps[0].args[0], mixes, base, scale, 0, n):
        return "the collapse weights are not σ(mixes·scale + base) + eps"
    comb0 = [u for u in softmax.users if with_const(u, aten.add)]
    if len(comb0) != 1:
        return "the softmax is not followed by + eps"
    comb, dims, eps = sinkhorn(comb0[0])
    if not dims or dims[0] != -2 or dims[1:] != [-1, -2] * ((len(dims) - 1) // 2):
        return f"Sinkhorn normalizes along {dims}: the op needs columns (-2) first, then (rows, columns) pairs"
    eps |= {pre_eps[1], with_const(comb0[0], aten.add)[1]}
    if len(eps) != 1:
        return f"the hc eps differ: {sorted(eps)}"
    if not same_shape(shape(fn), ((2 + n) * n, n * shape(res)[-1])):
        return f"fn is {shape(fn)}, not [(2+n)·n, n·D] for n = {n}"
    return Pre(res, strip(stat[0], set()), fn, base, scale, n, stat[1], eps.pop(), (len(dims) + 1) // 2,
               collapse[2], post, comb)


@dataclass
class Post:
    out: fx.Node
    x: fx.Node
    res: fx.Node
    post: fx.Node
    comb: fx.Node


def match_post(add) -> Post | str | None:
    """out = post.to(dt).unsqueeze(-1) * x.unsqueeze(-2) + matmul(comb.to(dt).transpose(-1, -2), res)."""
    pair = ordered(add, aten.add, lambda a, m: is_call(a, aten.mul) and is_call(m, aten.matmul))
    if pair is None or shape(add) is None:
        return None
    mix, matmul = pair
    rank = len(shape(add))
    weighted = ordered(mix, aten.mul, lambda p, x: is_call(p, aten.unsqueeze) and is_call(x, aten.unsqueeze) and
                       norm_dim(p.args[1], rank) == rank - 1 and norm_dim(x.args[1], rank) == rank - 2)
    res = matmul.args[1]
    if weighted is None or not same_shape(shape(res), shape(add)):
        return None
    post, x = strip(weighted[0].args[0], set()), weighted[1].args[0]
    n = shape(res)[-2]
    transposed = strip(matmul.args[0], set())
    last_two = {rank - 2, rank - 1}
    if not is_call(transposed, aten.transpose) or {norm_dim(d, rank) for d in transposed.args[1:]} != last_two:
        if same_shape(shape(transposed), shape(res)[:-1] + (n,)):
            return "comb is used untransposed (comb @ res, not combᵀ @ res)"
        return None
    comb = strip(transposed.args[0], set())
    lead = shape(res)[:-2]
    if not (same_shape(shape(post), lead + (n,)) and same_shape(shape(comb), lead + (n, n))
            and same_shape(shape(x), lead + shape(res)[-1:])):
        return None
    if dtype(add) != dtype(res):
        return f"the hc_post is {dtype(add)} while the residual is {dtype(res)}"
    return Post(add, x, res, post, comb)


def layer_norm(pre: Pre) -> tuple | str:
    """(norm output, weight, eps) of the RMSNorm that is the layer input's only reader."""
    frontier, seen = [pre.collapsed], []
    for _ in range(8):
        frontier = [u for f in frontier for u in f.users]
        seen += frontier
    found = [(n, m) for n in seen if (m := match_rms_norm(n)) and m.weight is not None
             and strip(m.x, set()) is strip(pre.collapsed, set())]
    if not found:
        return "the layer input has no RMSNorm with a weight"
    out, norm = max(found, key=lambda f: len(f[1].nodes))
    if any(u not in norm.nodes for u in readers(pre.collapsed)):
        return "the layer input is read by more than its RMSNorm"
    return out, norm.weight, norm.eps


class Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.graph, self.ctx, self.alias = gm.graph, ctx, {}
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}

    def resolve(self, node):
        while node in self.alias:
            node = self.alias[node]
        return node

    def emit(self, anchor, op, args, outputs, kind) -> bool:
        weights = [a for a in args if isinstance(a, fx.Node) and a.op in ("get_attr", "placeholder", "call_function")
                   and a in self.position and a not in self.alias]
        late = [w.name for w in weights if self.position[w] > self.position[anchor]]
        if late:
            self.ctx.reject(anchor, f"{', '.join(late)} is computed after the {kind} site")
            return False
        with self.graph.inserting_before(anchor):
            fused = self.graph.call_function(op, tuple(self.resolve(a) if isinstance(a, fx.Node) else a for a in args))
            infer_meta(fused)
            for i, old in enumerate(outputs):  # single-output ops (mhc_post) return the tensor itself
                if len(outputs) == 1:
                    item = fused
                else:
                    item = self.graph.call_function(operator.getitem, (fused, i))
                    infer_meta(item)
                old.replace_all_uses_with(item)
                self.alias[old] = item
                relax_views(item)
        self.ctx.matched(kind)
        return True

    def pre(self, q: Pre):
        args = (q.res, q.fn, q.base, q.scale, q.rms_eps, q.hc_eps, q.iters)
        self.emit(q.first, dflash.mhc_pre.default, args, [q.collapsed, q.post, q.comb], "mhc_pre")

    def post(self, p: Post):
        self.emit(p.out, dflash.mhc_post.default, (p.x, p.res, p.post, p.comb), [p.out], "mhc_post")

    def post_pre(self, p: Post, q: Pre, norm) -> bool:
        out, weight, eps = norm
        args = (p.x, p.res, p.post, p.comb, q.fn, q.base, q.scale, weight, q.rms_eps, q.hc_eps, q.iters, eps)
        return self.emit(p.out, dflash.mhc_post_pre.default, args, [p.out, out, q.post, q.comb], "mhc_post_pre")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    pres, posts = {}, []
    for node in list(gm.graph.nodes):
        for found in (match_pre(node), match_post(node)):
            if isinstance(found, str):
                ctx.reject(node, found)
            elif isinstance(found, Pre):
                pres[found.res] = found
            elif isinstance(found, Post):
                posts.append(found)
    rewriter = Rewriter(gm, ctx)
    sites = [(rewriter.position[q.first], "pre", q) for q in pres.values()] + \
            [(rewriter.position[p.out], "post", p) for p in posts]
    fused_pres = set()
    for _, kind, site in sorted(sites, key=lambda s: s[0]):
        if kind == "pre":
            if site.res not in fused_pres:
                rewriter.pre(site)
            continue
        q = pres.get(site.out)
        norm = layer_norm(q) if q else None
        if isinstance(norm, str):
            ctx.reject(site.out, f"{norm}: hc_post and hc_pre fused separately")
        if q is not None and not isinstance(norm, str) and rewriter.post_pre(site, q, norm):
            fused_pres.add(site.out)
        else:
            rewriter.post(site)


PASS = GraphPass("mhc_post_pre", run)
