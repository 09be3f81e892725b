"""rms_norms: the RMSNorms the fusions leave become one dflash.rms_norm each.

before:  y = w · (xf · rsqrt(mean(xf², -1, keepdim) + eps)).to(x.dtype),  xf = x.float()   5–8 ATen ops
after:   y = dflash.rms_norm(x, w, eps)                                                      one kernel

Any spelling `rope_patterns.match_rms_norm` knows (aten.rms_norm, HF Llama/Qwen3RMSNorm, the plain product with
or without casts). For graphs that run without Inductor — the runtime's default steps, where each op of the
spelling is a kernel of its own (a layer's two norms and the final one: ≈ 73 × 5–8 launches per Qwen3-8B step).
Inductor fuses a norm with its neighbours (the residual add before it) better than one opaque kernel can, so the
callers that hand the rewritten graph to Inductor skip this pass (pipeline.INDUCTOR_FUSES). It runs after the
fusion passes: the q/k norms (qkv_norm_rope) and mHC's next norm (mhc_post_pre) are theirs by then — and it first
erases the nodes those fusions left unused, so that a norm they replaced is not taken again.
Guard (a refusal is recorded, the norm stays): y has x's dtype — the op stores in x's dtype, so a norm whose
result is wider (e.g. an fp32 weight times bf16 activations) stays as written.
Numerics: the op keeps the statistics and the weight product in fp32 and rounds once; HF's spelling rounds the
normalized x to x's dtype before the weight product — one rounding apart in 16-bit dtypes (as qkv_norm_rope and
mhc_post_pre accept), equal up to fp32 rounding in fp32.
"""

import torch
import torch.fx as fx

from .canonicalize import replace
from .cleanup import erase_dead_code
from .head_chains import describe
from .manager import GraphPass, PassContext
from .rope_patterns import dtype, match_rms_norm

NAME = "rms_norms"


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    erase_dead_code(gm.graph)  # the norms the fusions replaced are still in the graph, unused: not ours to take
    taken: set = set()
    # outputs first: a weighted norm's inner product is itself a weightless norm, and must not be taken alone
    for node in reversed(list(gm.graph.nodes)):
        if node in taken or not node.users or node.op != "call_function":
            continue
        norm = match_rms_norm(node)
        if norm is None:
            continue
        taken |= norm.nodes
        if dtype(node) != dtype(norm.x):
            ctx.reject(node, f"the RMSNorm {describe(node)} returns {dtype(node)} from {dtype(norm.x)} input: "
                             "dflash.rms_norm stores in its input's dtype")
            continue
        replace(node, torch.ops.dflash.rms_norm.default, (norm.x, norm.weight, norm.eps))
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
