"""linear_silu_mul: the merged gate|up linear and SwiGLU's product of its halves become one op.

before:  y = dflash.linear(x, W, b)        W = [gate; up] [2·I, K] (the sibling merge of gate_proj and up_proj)
         h = dflash.silu_mul(y[..., :I], y[..., I:])
after:   h = dflash.linear_silu_mul(x, W, b)
The skinny GEMM then applies the product in its epilogue (compiler/triton/linear.py): one launch instead of two
per MLP, and the [T, 2·I] output is neither stored nor read again. Runs after weight_linears (the linears it made)
and silu_mul (the products it made), so it is skipped before Inductor with them.
Guards (a refusal is recorded, the pair stays): the product's operands are y's first and second I columns, each
read only by the product, and y read only by them. A product of anything but ranges of one dflash.linear is not a
candidate (no record).
Numerics: unchanged — the op rounds y to x's dtype before the product, as the pair does.
"""

import torch
import torch.fx as fx

from .canonicalize import replace
from .fx_utils import is_call
from .head_chains import describe
from .manager import GraphPass, PassContext
from .projection_rewrite import erase_unused
from .rope_patterns import last_dim_range, shape

NAME = "linear_silu_mul"
dflash = torch.ops.dflash


def _candidate(product: fx.Node) -> tuple[fx.Node, set] | str | None:
    """(the linear, the slice nodes to drop) when the product's operands are the two halves of one dflash.linear;
    why not when they are ranges of one dflash.linear but not joinable; None when they are not (e.g. a prefill
    graph's gate|up stays aten.linear: weight_linears records why)."""
    gate, up = (last_dim_range(a) for a in product.args[:2])
    if gate is None or up is None or gate.src is not up.src or not is_call(gate.src, dflash.linear):
        return None
    lin, width = gate.src, (shape(gate.src) or (None,))[-1]
    if not isinstance(width, int) or (gate.start, gate.end, up.start, up.end) != (0, width // 2, width // 2, width):
        return f"its operands are not the first and second halves of {describe(lin)}"
    nodes = set(gate.nodes | up.nodes)
    if any(set(n.users) - nodes - {product} for n in nodes) or set(lin.users) - nodes:
        return f"the halves or the output of {describe(lin)} are read elsewhere too"
    return lin, nodes


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for product in [n for n in gm.graph.nodes if is_call(n, dflash.silu_mul)]:
        found = _candidate(product)
        if found is None:
            continue
        if isinstance(found, str):
            ctx.reject(product, f"the SwiGLU product {describe(product)} stays apart: {found}")
            continue
        lin, nodes = found
        replace(product, dflash.linear_silu_mul.default, tuple(lin.args))
        erase_unused(gm, [*nodes, lin])
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
