"""canonicalize: AOT-autograd inference graphs (torch.compile's spelling) → the export spelling the fusion passes match.

The graphs come from a torch.compile backend that runs `aot_module_simplified` under no_grad and rewrites the
forward graph in its fw_compiler, so the compiled model RUNS the canonicalized graph: numerics are checked
against eager on the capture shape and on a second shape (dynamic=True reuses the one graph).
"""

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from pass_testing import op_diff
from torch._functorch.aot_autograd import aot_module_simplified

from torch_dflash.passes import attention_masks, canonicalize
from torch_dflash.passes.manager import PassManager

aten = torch.ops.aten


class Capture:
    """A torch.compile backend: AOT inference graph → run `passes` on it → run the rewritten graph."""

    def __init__(self, passes):
        self.passes, self.before, self.after, self.reports = passes, [], [], []

    def __call__(self, gm, example_inputs):
        def compile_forward(graph, inputs):
            self.before.append(copy.deepcopy(graph))
            self.reports.append(PassManager(self.passes).run(graph))
            self.after.append(graph)
            return graph.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=compile_forward)


def compile_and_compare(model, inputs, second_inputs, passes):
    model = model.eval()
    capture = Capture(passes)
    compiled = torch.compile(model, backend=capture, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for args in (inputs, second_inputs):
            want, got = model(**args), compiled(**args)
            want, got = (getattr(o, "logits", o) for o in (want, got))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(capture.after) == 1, "the second shape should reuse the dynamic graph"
    return capture.before[0], capture.after[0], capture.reports[0].fusions()


def qwen3(layers=2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, head_dim=16)
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg)


def ids(batch, seq):
    return {"input_ids": torch.randint(0, 128, (batch, seq)), "use_cache": False}


def test_qwen3_aot_graph_gets_linear_and_sdpa():
    before, after, fusions = compile_and_compare(qwen3(), ids(2, 8), ids(3, 5), [canonicalize.PASS])
    gone, new = op_diff(before, after)
    linears = 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    assert fusions["canonicalize.linear"] == linears and fusions["canonicalize.linear_views"] == linears
    assert new["aten.linear.default"] == linears and new["aten.scaled_dot_product_attention.default"] == 2
    assert gone["aten.mm.default"] == linears and gone["aten.t.default"] == linears
    assert gone["aten._scaled_dot_product_flash_attention_for_cpu.default"] == 2
    assert fusions["canonicalize.sdpa"] == 2 and fusions["canonicalize.cast"] >= 1
    assert "prims.convert_element_type.default" not in {str(n.target) for n in after.graph.nodes}


def test_canonical_aot_graph_is_matched_by_attention_masks():
    """The AOT graph's float mask where(causal, 0, -inf) is proven causal once the SDPA spelling is canonical."""
    _, after, fusions = compile_and_compare(qwen3(), ids(2, 8), ids(3, 5), [canonicalize.PASS, attention_masks.PASS])
    assert fusions["attention.causal"] == 2


class Block(torch.nn.Module):
    """A linear with bias on a 3-D input (addmm + views), GQA SDPA, a float cast."""

    def __init__(self, causal):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 64 + 2 * 32)
        self.causal = causal

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([64, 32, 32], dim=-1)
        q, k, v = (t.view(b, s, -1, 16).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        return o.to(torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_block_with_bias_and_gqa(causal):
    before, after, fusions = compile_and_compare(Block(causal), {"x": torch.randn(2, 6, 32)},
                                                 {"x": torch.randn(3, 9, 32)}, [canonicalize.PASS])
    assert fusions["canonicalize.linear"] == 1 and fusions["canonicalize.linear_views"] == 1
    assert fusions["canonicalize.sdpa"] == 1
    [sdpa] = [n for n in after.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert sdpa.args[5] is causal
    gone, _ = op_diff(before, after)
    assert gone["aten.addmm.default"] == 1


class Mixes(torch.nn.Module):
    """Batched matmuls as mHC and eager attention write them: combᵀ @ res over [B, S] (transformers' hc_post) and
    a [B, 1, n, k] @ [B, H, k, m] product that broadcasts a batch dim; then a bmm of two flattened [B, H] batches
    whose result is viewed as [H, B, …] — not matmul(a, b), so it stays a bmm."""

    def forward(self, comb, res, a, b):
        mixed = torch.matmul(comb.transpose(-1, -2), res)
        broadcast = torch.matmul(a, b)
        gram = torch.bmm(b.flatten(0, 1), b.transpose(-1, -2).flatten(0, 1))
        return mixed, broadcast, gram.view(b.shape[1], b.shape[0], 7, 7)


def mixes_inputs(batch, seq):  # sizes all distinct, so Dynamo's duck sizing ties no two of them together
    return {"comb": torch.randn(batch, seq, 4, 4), "res": torch.randn(batch, seq, 4, 8),
            "a": torch.randn(batch, 1, 5, 7), "b": torch.randn(batch, 11, 7, 12)}


def test_aot_batched_matmul_is_matmul_again():
    before, after, fusions = compile_and_compare(Mixes(), mixes_inputs(2, 6), mixes_inputs(3, 9), [canonicalize.PASS])
    assert fusions["canonicalize.matmul"] == 2
    gone, new = op_diff(before, after)
    assert new["aten.matmul.default"] == 2 and gone["aten.bmm.default"] == 2
    assert [str(n.target) for n in after.graph.nodes].count("aten.bmm.default") == 1
    comb_t = next(n for n in after.graph.nodes if n.target is aten.matmul.default).args[0]
    assert comb_t.target is aten.transpose.int, "mhc_post_pre matches combᵀ @ res: the transpose must be kept"


# ---- the fused SDPA kernels that only exist on GPUs, as graphs built by hand (they are rewritten, never run here)
VARIANTS = [(aten._scaled_dot_product_efficient_attention.default, True),
            (aten._scaled_dot_product_cudnn_attention.default, True),
            (aten._scaled_dot_product_flash_attention.default, False),
            (aten._scaled_dot_product_flash_attention_for_cpu.default, True)]


def variant_graph(op, with_mask, is_causal, scale):
    graph = fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in ("q", "k", "v", "mask"))
    kwargs = {"scale": scale}
    if op is aten._scaled_dot_product_flash_attention_for_cpu.default:
        args = (q, k, v, 0.0, is_causal)
        kwargs["attn_mask"] = mask if with_mask else None
    elif op is aten._scaled_dot_product_flash_attention.default:
        args = (q, k, v, 0.0, is_causal, False)
    else:
        args = (q, k, v, mask if with_mask else None, False, 0.0, is_causal)
    fused = graph.call_function(op, args, kwargs)
    graph.output(graph.call_function(operator.getitem, (fused, 0)))
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("op, takes_mask", VARIANTS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_sdpa_variants(op, takes_mask, is_causal):
    with_mask = takes_mask and not is_causal
    gm = variant_graph(op, with_mask, is_causal, scale=0.3)
    fusions = PassManager([canonicalize.PASS]).run(gm).fusions()
    assert fusions == {"canonicalize.sdpa": 1}
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if with_mask else None, is_causal=is_causal,
                                          scale=0.3)
    torch.testing.assert_close(gm(q, k, v, mask), want)


def test_casts_are_unified_and_device_moves_left_alone():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float64})
    b = graph.call_function(torch.ops.prims.convert_element_type.default, (a, torch.float16))
    c = graph.call_function(aten._to_copy.default, (b,), {"device": torch.device("cpu")})
    graph.output(c)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert PassManager([canonicalize.PASS]).run(gm).fusions() == {"canonicalize.cast": 2}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [aten.to.dtype, aten.to.dtype, aten._to_copy.default]
    x = torch.randn(4)
    assert gm(x).dtype == torch.float16 and torch.equal(gm(x), x.double().half())
