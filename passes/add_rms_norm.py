"""add_rms_norm: a residual add and the RMSNorm that reads it become one dflash.add_rms_norm.

before:  s = add(x, residual);  y = dflash.rms_norm(s, w, eps)            (s also read further on: the residual)
after:   y, s = dflash.add_rms_norm(x, residual, w, eps)
Each decoder layer has two (attention output + residual → post-attention norm; MLP output + residual → the next
layer's input norm, or the final norm): in a graph that runs without Inductor, 2 of its ~10 kernels. Runs after
rms_norms, whose ops it extends, and is skipped before Inductor with it (pipeline.INDUCTOR_FUSES).
Guards (a refusal is recorded, the norm stays): the add is aten.add.Tensor without alpha, of two tensors of the
sum's shape and dtype (no broadcasting, no promotion); the norm's weight is defined before the add, or is a
get_attr that can move there.
Numerics: the op rounds the sum to the activation dtype as the add did and normalizes that — what the graph did.
"""

import torch
import torch.fx as fx

from .fx_utils import fuse_pair, is_call, meta_val, same_sizes
from .head_chains import describe
from .manager import GraphPass, PassContext

NAME = "add_rms_norm"
aten = torch.ops.aten


def _why_not(add: fx.Node, weight) -> str | None:
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return "the add scales an operand (alpha)"
    total = meta_val(add)
    for operand in add.args:
        value = meta_val(operand)
        if not isinstance(value, torch.Tensor) or value.dtype != total.dtype or \
                not same_sizes(value.shape, total.shape):
            return "an operand of the add is broadcast, promoted or not a tensor"
    order = {node: i for i, node in enumerate(add.graph.nodes)}
    if isinstance(weight, fx.Node) and order[weight] > order[add] and weight.op != "get_attr":
        return "the norm's weight is computed after the add"
    return None


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for norm in list(gm.graph.nodes):
        if not is_call(norm, torch.ops.dflash.rms_norm) or not is_call(norm.args[0], aten.add):
            continue
        add, (_, weight, eps) = norm.args[0], norm.args
        if why := _why_not(add, weight):
            ctx.reject(norm, f"the RMSNorm {describe(norm)} keeps its residual add {add.name}: {why}")
            continue
        fuse_pair(gm, add, torch.ops.dflash.add_rms_norm.default, (*add.args, weight, eps), (norm, add))
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
