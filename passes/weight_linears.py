"""weight_linears: decode-sized projections over a model's own weight become dflash.linear.

before:  y = aten.linear(x[..., K], W[N, K][, b])         W a constant (get_attr) 2-D tensor, M = Π x.shape[:-1]
after:   y = dflash.linear(x, W, b)                          when M can be ≤ 32 (static, or a symbol whose range
                                                             reaches 32)

At M ≤ 32 rows a GEMM streams its weight once and the vendor GEMM leaves a part of the bandwidth unused; the op
lets the lowering serve these with the split-K skinny GEMM (compiler/triton/linear.py; F.linear on CPU, Ascend
and wherever the provider declines, and above 32 rows at run time). It runs after the fusion passes and the
sibling merge, so it takes only the linears they leave: o_proj, the merged gate|up, down, lm_head, the draft's
fc (after cleanup, which drops the linears the fusions replaced). mm / addmm of a transposed weight arrive as
aten.linear (canonicalize). The bias stays inside the op.
Guards (each refusal recorded): the weight a constant 2-D tensor (not a graph value: activations × activations
are not weight streams), and M able to be ≤ 32 (prefill-sized graphs keep the vendor GEMM).
"""

import math

import torch
import torch.fx as fx

from .canonicalize import replace
from .fx_utils import attr_tensor, is_call, node_arg, sym_expr, tensor_meta
from .head_chains import describe
from .manager import GraphPass, PassContext

aten = torch.ops.aten
NAME = "weight_linears"
MAX_ROWS = 32


def min_rows(x: torch.Tensor) -> int | None:
    """The fewest rows M = Π x.shape[:-1] can have (its value when static), None when unknown."""
    lead = x.shape[:-1]
    if all(isinstance(d, int) for d in lead):
        return math.prod(lead)
    env = next(d.node.shape_env for d in lead if isinstance(d, torch.SymInt))
    lower = env.bound_sympy(math.prod(sym_expr(d) for d in lead)).lower
    return int(lower) if lower.is_finite else None


def refusal(gm: fx.GraphModule, lin: fx.Node) -> str | None:
    weight = attr_tensor(gm, lin.args[1])
    if weight is None:
        return (f"the weight of {describe(lin)} is a graph value, not a constant: dflash.linear streams a "
                f"model's own weights")
    if weight.dim() != 2:
        return f"the weight of {describe(lin)} is {weight.dim()}-D, not [N, K]"
    x = tensor_meta(lin.args[0])
    rows = None if x is None else min_rows(x)
    if rows is None:
        return f"the row count of {describe(lin)} is unknown (its input has no shape metadata or no lower bound)"
    if rows > MAX_ROWS:
        return f"{describe(lin)} has at least {rows} rows (> {MAX_ROWS}): a prefill-sized GEMM stays on the vendor GEMM"
    return None


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for lin in [n for n in gm.graph.nodes if is_call(n, aten.linear)]:
        reason = refusal(gm, lin)
        if reason:
            ctx.reject(lin, reason)
            continue
        replace(lin, torch.ops.dflash.linear.default, (lin.args[0], lin.args[1], node_arg(lin, 2, "bias")))
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
