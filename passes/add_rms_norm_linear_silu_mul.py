"""add_rms_norm_linear_silu_mul: a residual add + RMSNorm and the gate|up GEMM with SwiGLU that reads the norm become
one op.

before:  y, s = dflash.add_rms_norm(x, residual, w_norm, eps)      (s, the residual stream, read further on)
         h = dflash.linear_silu_mul(y, W, b)
after:   h, s = dflash.add_rms_norm_linear_silu_mul(x, residual, None, eps, W·diag(w_norm), b)
         (w_norm and W constants: the norm's weight folded into W's columns, a new constant; else w_norm stays)
A decoder layer's post-attention norm and its MLP's first GEMM: the Triton provider normalizes the rows inside the
skinny GEMM as it streams W (compiler/triton/linear.py), so the norm is no launch of its own between two GEMMs — with
programmatic dependent launch the GEMM then starts while the o projection drains. Runs last, after linear_silu_mul
(whose ops it extends), and is skipped before Inductor with it.
Guards (a refusal is recorded, the pair stays): the norm's output y is read by the GEMM only. A linear_silu_mul of
anything but an add_rms_norm's output is not a candidate (no record).
Numerics: the op's reference is the pair; the folded weight rounds W·w_norm to W's dtype once, and the GEMM
provider applies the row's 1/rms after the product of the unrounded x + residual (the pair rounds s and the normed
row first) — within bf16 rounding, exact up to reassociation in fp32.
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import add_constant, attr_tensor, fuse_pair, is_call, recipe_of, scale_columns
from .head_chains import describe
from .manager import GraphPass, PassContext
from .projection_rewrite import erase_unused

NAME = "add_rms_norm_linear_silu_mul"
dflash = torch.ops.dflash


def _constant(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _outputs(node: fx.Node) -> dict[int, fx.Node]:
    return {user.args[1]: user for user in node.users if user.target is operator.getitem}


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for gemm in [n for n in gm.graph.nodes if is_call(n, dflash.linear_silu_mul)]:
        normed = gemm.args[0]
        if not (isinstance(normed, fx.Node) and normed.target is operator.getitem and normed.args[1] == 0
                and is_call(normed.args[0], dflash.add_rms_norm)):
            continue
        norm = normed.args[0]
        outputs = _outputs(norm)
        if set(normed.users) != {gemm} or 1 not in outputs or len(norm.users) != len(outputs):
            ctx.reject(gemm, f"the norm {describe(norm)} stays apart from {describe(gemm)}: its normed output is "
                             "read elsewhere too")
            continue
        x, residual, norm_w, eps = norm.args
        w, bias = gemm.args[1:]
        if _constant(norm_w) and _constant(w):  # w·diag(norm_w): the GEMM then normalizes without a weight
            recipe = ("scale_columns", recipe_of(gm, w), recipe_of(gm, norm_w))
            w = add_constant(gm, norm, "dflash_norm_folded_w", recipe,
                             scale_columns(attr_tensor(gm, w), attr_tensor(gm, norm_w)), like=w)
            old, norm_w = (gemm.args[1], norm.args[2]), None
        else:
            old = ()
        fuse_pair(gm, norm, dflash.add_rms_norm_linear_silu_mul.default, (x, residual, norm_w, eps, w, bias),
                  (gemm, outputs[1]))
        erase_unused(gm, [normed, norm, *old])
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
