"""embedding_rms_norm: the token embedding gather and the RMSNorm that reads it become one dflash.embedding_rms_norm.

before:  e = aten.embedding(W, ids);  y = dflash.rms_norm(e, w, eps)     (e also read further on: the residual)
after:   e, y = dflash.embedding_rms_norm(W, ids, w, eps)
The first layer's input norm of every step (our target and draft, HF Qwen3/Llama): without Inductor, ATen's gather
(indexSelectSmallIndex: ~8 µs on an H100 for 16 tokens × 4096) and the norm become one kernel. Runs after
rms_norms, whose ops it extends (add_rms_norm leaves the norms that read an embedding alone), and is skipped
before Inductor with it (pipeline.INDUCTOR_FUSES). aten.embedding's padding_idx, scale_grad_by_freq and sparse only
change the gradient: the forward is the plain gather whatever they are.
Guards (a refusal is recorded, the norm stays): the norm reads the embedding itself — a scale or a cast in between
(z-lab's input_embedding_scale ≠ 1, Gemma's √H normalizer) is not the op's; the norm's weight is defined before the
embedding, or is a get_attr that can move there.
Numerics: the op's reference is aten.embedding then rms_norm's reference — bitwise what the graph computed.
"""

import torch
import torch.fx as fx

from .fx_utils import fuse_pair, is_call
from .head_chains import describe
from .manager import GraphPass, PassContext

NAME = "embedding_rms_norm"
aten = torch.ops.aten
SCALES_AND_CASTS = (aten.mul, aten.div, aten.to)


def _embedding_behind(x) -> tuple[fx.Node, fx.Node] | None:
    """(the scale or cast, the embedding it reads) when x is a scale or cast of an embedding."""
    if not is_call(x, *SCALES_AND_CASTS):
        return None
    found = next((a for a in x.args if is_call(a, aten.embedding)), None)
    return None if found is None else (x, found)


def _weight_why_not(embedding: fx.Node, weight) -> str | None:
    order = {node: i for i, node in enumerate(embedding.graph.nodes)}
    if isinstance(weight, fx.Node) and order[weight] > order[embedding] and weight.op != "get_attr":
        return "the norm's weight is computed after the embedding"
    return None


def _fuse(gm: fx.GraphModule, norm: fx.Node, embedding: fx.Node) -> None:
    _, weight, eps = norm.args
    fuse_pair(gm, embedding, torch.ops.dflash.embedding_rms_norm.default, (*embedding.args[:2], weight, eps),
              (embedding, norm))


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    for norm in list(gm.graph.nodes):
        if not is_call(norm, torch.ops.dflash.rms_norm):
            continue
        x = norm.args[0]
        if between := _embedding_behind(x):
            ctx.reject(norm, f"the RMSNorm {describe(norm)} reads the embedding {between[1].name} through "
                             f"{describe(between[0])}: a scale or cast the fused op does not apply")
            continue
        if not is_call(x, aten.embedding):
            continue
        if why := _weight_why_not(x, norm.args[1]):
            ctx.reject(norm, f"the RMSNorm {describe(norm)} keeps its embedding {x.name}: {why}")
            continue
        _fuse(gm, norm, x)
        ctx.matched(NAME)


PASS = GraphPass(NAME, run)
