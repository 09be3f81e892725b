"""joined_positions: rope tables of two position tensors joined → one op that also stands for the join.

before:  positions = cat([front, rest], -1)              (the DFlash draft: context and block positions)
         cos, sin = dflash.rope_cos_sin(positions, inv_freq, scale, dtype)       (pass rope_cos_sin)
         … positions read again: the cache slots of context_qkv_norm_rope_cache, the queries' positions
after:   joined, cos, sin = dflash.joined_rope_cos_sin(front, rest, inv_freq, scale, dtype)
         … joined read wherever the cat was
One launch instead of two on CUDA — and no ATen cat, which (launched without programmatic launch) also stalls the
launches around it. Runs right after rope_cos_sin; skipped before Inductor with it (pipeline.INDUCTOR_FUSES).
Guards (a refusal is recorded, the cat stays): the cat joins exactly two tensors along the last dim, of one dtype
and rank; the tables are read as cos and sin; inv_freq is a constant or computed before the cat's first reader.
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, node_arg, tensor_meta
from .head_chains import describe
from .manager import GraphPass, PassContext
from .projection_rewrite import erase_unused
from .rope_patterns import norm_dim

NAME = "joined_positions"
aten = torch.ops.aten


def _refusal(cat: fx.Node, rope: fx.Node) -> str | None:
    """Why the tables of `cat` stay apart from it, or None."""
    parts, val = cat.args[0], tensor_meta(cat)
    if len(parts) != 2:
        return f"it joins {len(parts)} tensors, not two"
    if val is None or val.dim() == 0 or norm_dim(node_arg(cat, 1, "dim", 0), val.dim()) != val.dim() - 1:
        return "it does not join along the last dim"
    vals = [tensor_meta(p) for p in parts]
    if any(v is None for v in vals) or vals[0].dtype != vals[1].dtype or vals[0].dim() != vals[1].dim():
        return "its two parts differ in dtype or rank"
    if not all(user.target is operator.getitem for user in rope.users):
        return "the tables are read whole, not as cos and sin"
    return None


def _join(gm: fx.GraphModule, rope: fx.Node, ctx: PassContext) -> None:
    """rope_cos_sin(cat([front, positions], -1)) → joined_rope_cos_sin(front, positions), whose first output
    stands for the cat wherever else it is read (the draft's cache slots and query positions)."""
    cat = rope.args[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first, inv = min((rope, *cat.users), key=order.__getitem__), rope.args[1]
    why = _refusal(cat, rope)
    if why is None and inv.op != "get_attr" and order[inv] > order[first]:
        why = "inv_freq is computed after the cat is read"
    if why:
        ctx.reject(cat, f"the positions {describe(cat)} stay a cat: {why}")
        return
    if inv.op == "get_attr":
        first.prepend(inv)
    with gm.graph.inserting_before(first):
        joined = gm.graph.call_function(torch.ops.dflash.joined_rope_cos_sin.default, (*cat.args[0], *rope.args[1:]))
        outs = [gm.graph.call_function(operator.getitem, (joined, i)) for i in range(3)]
    for node in (joined, *outs):
        infer_meta(node)
    for user in list(rope.users):
        user.replace_all_uses_with(outs[1 + user.args[1]])
    cat.replace_all_uses_with(outs[0])
    erase_unused(gm, {*rope.users, rope, cat})
    ctx.matched(NAME)


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if is_call(node, torch.ops.dflash.rope_cos_sin) and is_call(node.args[0], aten.cat):
            _join(gm, node, ctx)


PASS = GraphPass(NAME, run)
