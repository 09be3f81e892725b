"""silu_mul: SwiGLU's gate product becomes one dflash.silu_mul.

before:  h = mul(silu(gate), up)          (either order; gate/up e.g. the halves of the merged gate|up linear)
after:   h = dflash.silu_mul(gate, up)
In a graph that runs without Inductor that is one kernel instead of two per MLP, each reading strided halves of
the merged output. Skipped before Inductor, which fuses the pair itself (pipeline.INDUCTOR_FUSES).
Guards (a refusal is recorded, the pair stays): silu's result is read by the mul only; gate and up have one shape
(no broadcasting) and the product's dtype.
Numerics: the op computes in fp32 and rounds once; eager bf16 rounds silu(gate) first — one rounding apart.
"""

import torch
import torch.fx as fx

from .canonicalize import replace
from .fx_utils import is_call, meta_val, same_sizes
from .head_chains import describe
from .manager import GraphPass, PassContext

NAME = "silu_mul"
aten = torch.ops.aten


def _operands(mul: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(silu node, up) when mul multiplies a silu by another tensor."""
    if len(mul.args) != 2:
        return None
    for silu, up in (mul.args, reversed(mul.args)):
        if is_call(silu, aten.silu) and isinstance(up, fx.Node):
            return silu, up
    return None


def _why_not(mul: fx.Node, silu: fx.Node, up: fx.Node) -> str | None:
    if set(silu.users) != {mul}:
        return "silu's result is read elsewhere too"
    gate, up, out = meta_val(silu.args[0]), meta_val(up), meta_val(mul)
    if not all(isinstance(v, torch.Tensor) for v in (gate, up, out)):
        return "an operand has no tensor metadata"
    if not (same_sizes(gate.shape, out.shape) and same_sizes(up.shape, out.shape)) or \
            not gate.dtype == up.dtype == out.dtype:
        return "gate and up differ in shape or dtype (broadcast or promoted)"
    return None


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for mul in list(gm.graph.nodes):
        if not is_call(mul, aten.mul) or (pair := _operands(mul)) is None:
            continue
        silu, up = pair
        if why := _why_not(mul, silu, up):
            ctx.reject(mul, f"the SwiGLU product {describe(mul)} stays: {why}")
            continue
        replace(mul, torch.ops.dflash.silu_mul.default, (silu.args[0], up))
        gm.graph.erase_node(silu)
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
