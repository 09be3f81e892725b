"""qkv_norm_rope: one fused op per attention site.

before:  x ─ linear(Wq[,bq]) ─ view(B,S,nq,hd)  ─ [RMSNorm(q_norm_w, eps)] ─ [transpose] ─ rope(cos, sin) ─▶ q
         x ─ linear(Wk[,bk]) ─ view(B,S,nkv,hd) ─ [RMSNorm(k_norm_w, eps)] ─ [transpose] ─ rope(cos, sin) ─▶ k
         x ─ linear(Wv[,bv]) ─ view(B,S,nkv,hd) ─ [transpose] ─▶ v
         (or one fused linear whose output is split / chunked / sliced into q | k | v)
after:   q, k, v = dflash.qkv_norm_rope(x, W_qkv, b_qkv, q_norm_w, k_norm_w, eps, cos, sin, nq, nkv, hd)
         (+ transpose(1, 2) where the consumers had [B, H, S, D])

q and k are the two roped projections of x (told apart by the attention op they reach, else by head count);
v is the one un-roped projection of x with k's heads. Guards (each failure leaves the site and records why):
same cos and sin for q and k, same eps, same head_dim, one dtype throughout, and nothing inside the site used
outside it. The matchers live in rope_patterns.py / head_chains.py, the emission in projection_rewrite.py.
"""

import torch
import torch.fx as fx

from .head_chains import (Chain, ConcatProj, attention_operand, describe, dtype_mismatch, escaping_use,
                          find_roped, plain_chains)
from .manager import GraphPass, PassContext
from .projection_rewrite import Emitter, erase_unused, insertion_anchor, proj_parts

aten = torch.ops.aten


def q_and_k(a: Chain, b: Chain) -> tuple[Chain, Chain] | str:
    roles = attention_operand(a.out), attention_operand(b.out)
    if set(roles) == {0, 1}:
        return (a, b) if roles[0] == 0 else (b, a)
    if a.heads != b.heads:
        return (a, b) if a.heads > b.heads else (b, a)
    return (f"cannot tell q from k: {describe(a.out)} and {describe(b.out)} both have {a.heads} heads and do not "
            f"reach an attention op as its query and key")


def eps_guard(q: Chain, k: Chain) -> str | None:
    if q.norm and k.norm and q.norm.eps != k.norm.eps:
        return f"k_norm eps {k.norm.eps} ≠ q_norm eps {q.norm.eps}"
    return None


def table_guards(a: Chain, b: Chain, names=("q", "k")) -> str | None:
    for attr in ("cos", "sin"):
        ta, tb = getattr(a, attr), getattr(b, attr)
        if ta.key() != tb.key():
            return (f"{names[0]} and {names[1]} use different {attr} tensors ({describe(ta.base)}"
                    f"{'' if ta.seq is None else ' sliced'} vs {describe(tb.base)}{'' if tb.seq is None else ' sliced'})")
    return None


def site_guards(x: fx.Node, q: Chain, k: Chain, v: Chain, extra_nodes=frozenset()) -> str | None:
    """The guards every fused projection site shares (qkv_norm_rope and kv_materialize)."""
    if not q.head_dim == k.head_dim == v.head_dim:
        return f"head_dim differs: q {q.head_dim}, k {k.head_dim}, v {v.head_dim}"
    reason = eps_guard(q, k)
    if reason:
        return reason
    named = {"cos": q.cos.base, "sin": q.sin.base, "q": q.out, "k": k.out, "v": v.out}
    for chain, name in ((q, "q"), (k, "k"), (v, "v")):
        for proj in (chain.source.ctx, chain.source.block) if isinstance(chain.source, ConcatProj) \
                else (chain.source,):
            named[f"{name} weight"], named[f"{name} bias"] = proj.weight, proj.bias
        if chain.norm:
            named[f"{name}_norm weight"] = chain.norm.weight
    reason = dtype_mismatch(x, named)
    if reason:
        return reason
    nodes = set(extra_nodes).union(*(c.nodes | c.source.nodes for c in (q, k, v)))
    leak = escaping_use(nodes, {q.out, k.out, v.out})
    if leak:
        return f"{describe(leak[0])} inside the site is also used by {describe(leak[1])}"
    return None


def norm_weight(emit: Emitter, chain: Chain, x: fx.Node):
    if chain.norm is None:
        return None
    return chain.norm.weight if chain.norm.weight is not None else emit.ones(chain.head_dim, x)


def eps_of(q: Chain, k: Chain) -> float:
    norms = [c.norm for c in (q, k) if c.norm is not None]
    return norms[0].eps if norms else 0.0


def replace(emit: Emitter, chain: Chain, value: fx.Node) -> None:
    """Make chain.out's consumers read value ([B, S, H, D]), transposed back when they had [B, H, S, D]."""
    chain.out.replace_all_uses_with(emit.call(aten.transpose.int, value, 1, 2) if chain.bhsd else value)


def site_inputs(x: fx.Node, chains, cos_tables) -> list:
    inputs = [x]
    for chain in chains:
        source = chain.source
        for proj in (source.ctx, source.block) if isinstance(source, ConcatProj) else (source,):
            inputs += [proj.x, proj.weight, proj.bias]
        if chain.norm:
            inputs.append(chain.norm.weight)
    for t in cos_tables:
        inputs += [t.base, *(t.seq.args[2:4] if t.seq is not None else ())]
    return [n for n in inputs if isinstance(n, fx.Node)]


def dead_candidates(chains) -> set:
    nodes = set()
    for chain in chains:
        nodes |= chain.nodes | chain.source.nodes
        for t in (chain.cos, chain.sin):
            if t is not None:
                nodes |= t.nodes
        source = chain.source
        for proj in (source.ctx, source.block) if isinstance(source, ConcatProj) else (source,):
            nodes |= {proj.weight, proj.bias} - {None}
    return nodes


def fuse_site(gm: fx.GraphModule, ctx: PassContext, x: fx.Node, roped: list[Chain]) -> None:
    where = roped[0].out
    if len(roped) != 2:
        ctx.reject(where, f"{describe(x)} has {len(roped)} roped projections; q and k make 2")
        return
    pair = q_and_k(*roped)
    if isinstance(pair, str):
        ctx.reject(where, pair)
        return
    q, k = pair
    vs = [c for c in plain_chains(x) if (c.heads, c.head_dim) == (k.heads, k.head_dim)
          and not isinstance(c.source, ConcatProj) and c.source.out not in (q.source.out, k.source.out)]
    if len(vs) != 1:
        ctx.reject(where, f"{describe(x)} has {len(vs)} un-roped projections with {k.heads}×{k.head_dim} rows "
                          f"(a v projection next to q and k is needed, exactly one)")
        return
    v = vs[0]
    reason = table_guards(q, k) or site_guards(x, q, k, v)
    anchor = None if reason else insertion_anchor(gm.graph, site_inputs(x, (q, k, v), (q.cos, q.sin)),
                                                  (q.out, k.out, v.out))
    if reason or anchor is None:
        ctx.reject(where, reason or "no point in the graph has every input of the fused op before its consumers")
        return
    emit = Emitter(gm, anchor)
    rows = [q.heads * q.head_dim, k.heads * k.head_dim, v.heads * v.head_dim]
    projs = [q.source, k.source, v.source]
    w = emit.merged("qkv_weight", proj_parts(projs, rows, "weight"), x)
    b = emit.merged("qkv_bias", proj_parts(projs, rows, "bias"), x)
    cos, sin = emit.table(q.cos, x), emit.table(q.sin, x)
    outs = emit.outputs(torch.ops.dflash.qkv_norm_rope.default, 3, x, w, b, norm_weight(emit, q, x),
                        norm_weight(emit, k, x), eps_of(q, k), cos, sin, q.heads, k.heads, q.head_dim)
    for chain, value in zip((q, k, v), outs):
        replace(emit, chain, value)
    erase_unused(gm, dead_candidates((q, k, v)))
    ctx.matched("qkv_norm_rope")


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    chains, failures = find_roped(gm.graph)
    for node, reason in failures:
        ctx.reject(node, reason)
    by_x: dict[fx.Node, list[Chain]] = {}
    for chain in chains:
        if isinstance(chain.source, ConcatProj):
            ctx.reject(chain.out, "the heads concatenate two projections (the draft's context path); "
                                  "kv_materialize takes those")
            continue
        by_x.setdefault(chain.source.x, []).append(chain)
    for x, roped in by_x.items():
        fuse_site(gm, ctx, x, roped)


PASS = GraphPass("qkv_norm_rope", run)
