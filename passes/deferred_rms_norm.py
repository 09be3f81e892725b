"""deferred_rms_norm: the RMSNorm between a down GEMM and the next layer's qkv projection is finished by that
projection's epilogue (`defer_norms`, shared with deferred_mlp_norm, does the rewrite for a family of readers).

before:  y = dflash.linear(h, W, b)
         normed, s = dflash.add_rms_norm(y, residual, w_norm, eps)       (s, the residual stream, read further on)
         q = dflash.qkv_norm_rope_cache(normed, w_qkv, None, …)      (or qkv_norm_rope, context_qkv_norm_rope_cache)
after:   s, s_w, sumsq = dflash.linear_add_norm_stats(h, W, b, residual, w_norm)
         q = dflash.qkv_norm_rope_cache(s_w, w_qkv, None, …, x_sumsq=sumsq, x_eps=eps)
A norm needs whole rows, which no program of the GEMM that computes them holds; so that GEMM adds the residual
where it stores its tile and stores s, s · w_norm and the sums of squares of each 64 columns, and the qkv
epilogue — which reads every projected row anyway — applies the rows' 1/rms. The norm is no launch of its own
between the two GEMMs (with programmatic dependent launch the qkv GEMM then starts while the down GEMM drains).
Runs last (the cache-writing qkv ops and the down linear are made by earlier passes) and is skipped before Inductor.
Guards (a refusal is recorded, the graph stays), for a norm whose normed rows a reader of the family reads: one
operand of the add is a dflash.linear read by nothing else; the normed rows are read only as the x of such readers,
none with a bias (1/rms is applied after the GEMM, which adds it) and none given x_sumsq already; the row width is a
static multiple of 64.
Numerics: the projection reads s · w_norm rounded to the activation dtype and its output is rounded before 1/rms
(the pair rounded the normed row once) — within bf16 rounding; fp32 differs by reassociation only.
"""

import operator

import torch
import torch.fx as fx

from .fx_utils import infer_meta, is_call, meta_val, node_arg
from .head_chains import describe
from .manager import GraphPass, PassContext

NAME = "deferred_rms_norm"
dflash = torch.ops.dflash
aten = torch.ops.aten
READERS = (dflash.qkv_norm_rope, dflash.qkv_norm_rope_cache, dflash.context_qkv_norm_rope_cache)
X_POSITION = {  # of every op that can finish a norm from x_sumsq (deferred_mlp_norm's linear_silu_mul too)
    dflash.qkv_norm_rope.default: 0, dflash.qkv_norm_rope_cache.default: 0,
    dflash.context_qkv_norm_rope_cache.default: 1, dflash.linear_silu_mul.default: 0}
SUMSQ_POSITION = {op: len(op._schema.arguments) - 2 for op in X_POSITION}  # x_sumsq, x_eps: the last two


def _outputs(node: fx.Node) -> dict[int, fx.Node]:
    return {user.args[1]: user for user in node.users if user.target is operator.getitem}


def _projections(normed: fx.Node) -> list[fx.Node]:
    """The readers of the normed rows other than size queries (a dynamic graph asks them for sym sizes, which the
    weighted rows answer alike)."""
    return [reader for reader in normed.users if not is_call(reader, aten.sym_size)]


def _why_not(normed: fx.Node, gemm: fx.Node | None, readers: tuple, what: str) -> str | None:
    if gemm is None:
        return "neither operand of the residual add is a dflash.linear"
    if len(gemm.users) != 1:
        return f"the GEMM {gemm.name} is read by more than the add"
    for reader in _projections(normed):
        uses = [*reader.args, *reader.kwargs.values()]
        if not is_call(reader, *readers) or reader.args[X_POSITION[reader.target]] is not normed or \
                sum(use is normed for use in uses) != 1:
            return f"its normed rows are read by {reader.name}, not only as the x of {what}s"
        if reader.args[X_POSITION[reader.target] + 2] is not None:  # the bias, two after x
            return f"{reader.name} adds a bias, which 1/rms applied after its GEMM would scale"
        if node_arg(reader, SUMSQ_POSITION[reader.target], "x_sumsq") is not None:
            return f"{reader.name} finishes a norm already"
    width = meta_val(normed).shape[-1] if meta_val(normed) is not None else None
    if not isinstance(width, int) or width % 64:
        return f"the row width {width} is not a static multiple of 64"
    return None


def defer_norms(gm: fx.GraphModule, ctx: PassContext, name: str, readers: tuple, what: str) -> None:
    """Every add_rms_norm after a dflash.linear whose normed rows `readers` (ops of X_POSITION, called `what` in
    the rejections) read: the linear becomes linear_add_norm_stats, the readers get x_sumsq; `name` counts them."""
    for norm in [n for n in gm.graph.nodes if is_call(n, dflash.add_rms_norm)]:
        outputs = _outputs(norm)
        normed = outputs.get(0)
        if normed is None or not any(is_call(reader, *readers) for reader in _projections(normed)):
            continue
        x, residual, norm_w, eps = norm.args
        if not is_call(x, dflash.linear) and is_call(residual, dflash.linear):
            x, residual = residual, x   # the op rounds x + residual and residual + x alike
        gemm = x if is_call(x, dflash.linear) else None
        if why := _why_not(normed, gemm, readers, what):
            ctx.reject(norm, f"the norm {describe(norm)} stays before the {what}: {why}")
            continue
        if isinstance(norm_w, fx.Node) and norm_w.op == "get_attr":
            norm.prepend(norm_w)
        with gm.graph.inserting_before(norm):
            fused = gm.graph.call_function(dflash.linear_add_norm_stats.default, (*gemm.args, residual, norm_w))
            total, weighted, sumsq = (gm.graph.call_function(operator.getitem, (fused, i)) for i in range(3))
        for node in (fused, total, weighted, sumsq):
            infer_meta(node)
        if 1 in outputs:
            outputs[1].replace_all_uses_with(total)
        for reader in _projections(normed):  # the two given by keyword (an exported call may spell the defaults)
            reader.args = reader.args[:SUMSQ_POSITION[reader.target]]
            reader.kwargs = {**reader.kwargs, "x_sumsq": sumsq, "x_eps": eps}
        normed.replace_all_uses_with(weighted)
        for node in (outputs.get(1), normed, norm, gemm):
            if node is not None:
                gm.graph.erase_node(node)
        ctx.matched(name)


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    defer_norms(gm, ctx, NAME, READERS, "qkv projection")


PASS = GraphPass(NAME, run)
