"""merge_sibling_projections on transformers Qwen3 / Llama (export; Llama also with q/k/v left to it), z-lab's
draft (export) and our draft step (export and the backend's AOT graph): match counts and numerics on a second
shape; the groups it must leave alone (graph untouched, reason recorded); a golden printed graph of our MLP.
(Our verify step runs the pass inside the default pipeline in tests/test_capture_passes.py.)"""

import copy
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from pass_testing import check_pass, export_graph, op_counts, run_passes
from test_qkv_norm_rope import printed
from tiny_models import hf_causal_lm, zlab_draft, zlab_step

import torch_dflash as td
from torch_dflash.compiler.capture import DraftStep, capture_draft
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.models.layers import MLP
from torch_dflash.passes import canonicalize, kv_materialize, qkv_norm_rope, sibling_projections

KIND = "merge_sibling_projections"
FUSIONS = [canonicalize.PASS, kv_materialize.PASS, qkv_norm_rope.PASS, sibling_projections.PASS]


@pytest.mark.parametrize("kind,extra,passes,groups_per_layer,linears_per_layer", [
    ("qwen3", {}, FUSIONS, 1, 3),                                     # gate | up; o, down stay (qkv: fused op)
    ("llama", {"attention_bias": True, "mlp_bias": True}, [sibling_projections.PASS], 2, 4),  # q | k | v, gate | up
])
def test_transformers_models_merge_per_layer(kind, extra, passes, groups_per_layer, linears_per_layer):
    model = hf_causal_lm(kind, **extra)
    layers = model.config.num_hidden_layers
    seq = torch.export.Dim("seq", min=2, max=64)

    def args(s):
        return {"input_ids": torch.randint(0, 128, (2, s)), "use_cache": False}

    _, after, report = check_pass(model, args(8), args(13), passes, {KIND: groups_per_layer * layers},
                                  dynamic_shapes={"input_ids": {1: seq}, "use_cache": None})
    assert op_counts(after)["aten.linear.default"] == linears_per_layer * layers + 1          # + lm_head
    pieces = [n for n in after.graph.nodes if n.target == torch.ops.aten.slice.Tensor
              and n.args[0].target == torch.ops.aten.linear.default]
    assert len(pieces) == (5 if groups_per_layer == 2 else 2) * layers
    assert report.rejections() == []
    params = dict(after.named_parameters())
    assert not any(".gate_proj." in name or ".up_proj." in name for name in params)
    buffers = [name for name, _ in after.named_buffers() if name.startswith("dflash_sibling_")]
    assert len(buffers) == groups_per_layer * layers * (2 if extra.get("mlp_bias") else 1)


def test_zlab_draft_merges_every_mlp():
    model = zlab_draft(layers=2)
    ctx = torch.export.Dim("ctx", min=2, max=32)
    dims = {"position_ids": {1: ctx + 4}, "noise_embedding": None, "target_hidden": {1: ctx}}
    check_pass(model, zlab_step(6), zlab_step(9), FUSIONS, {KIND: 2, "kv_materialize": 2}, dynamic_shapes=dims)


@pytest.fixture(scope="module")
def pair():
    return build_demo_pair(seed=5, max_batch=3, max_seq_len=48)


def test_our_draft_step_export_and_aot(pair):
    """The captured (exported) draft step through the runtime's pipeline, and the same step through the
    backend's AOT graph: one merge per draft layer, outputs as before."""
    target, draft = pair
    layers = len(draft.layers)
    program = capture_draft(target, draft, max_batch=3)
    compile_step = pipeline_compile_step("cpu")
    after = compile_step(program.module(), "draft")
    assert compile_step.reports["draft"].fusions[KIND] == layers
    assert not compile_step.reports["draft"].rejections

    torch._dynamo.reset()
    step = DraftStep(target, draft)
    fast = torch.compile(step, backend="dflash", options={"inductor": False})
    C, b = 5, draft.block_size
    args = (torch.randn(2, C, draft.fc.in_features), (4 + torch.arange(C)).expand(2, C).contiguous(),
            torch.randint(0, 1000, (2, b)), (4 + C + torch.arange(b)).expand(2, b).contiguous())
    with torch.no_grad():
        want = step(*args)
        for got in (fast(*args), after(*args)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert td.last_report().fusions[KIND] == layers


class Siblings(torch.nn.Module):
    """Two linears of x. `shared`: the second weight is also read elsewhere; `one_d`: the second weight is 1-D."""

    def __init__(self, shared=False, one_d=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(6, 8))
        self.b = torch.nn.Parameter(torch.randn(8) if one_d else torch.randn(4, 8))
        self.shared = shared

    def forward(self, x):
        a, b = F.linear(x, self.a), F.linear(x, self.b)
        out = a.sum(-1) + (b.sum(-1) if b.dim() == 3 else b)
        return out + self.b.sum() if self.shared else out


class SiblingsOfInputs(torch.nn.Module):
    def forward(self, x, wa, wb):
        return F.linear(x, wa).sum(-1) + F.linear(x, wb).sum(-1)


@pytest.mark.parametrize("module,args,reason", [
    (Siblings(shared=True), (torch.randn(2, 3, 8),), r"%b .* is also read by %sum_\d .*: the original would stay alive"),
    (Siblings(one_d=True), (torch.randn(2, 3, 8),), r"the weight of %linear_1 \(linear.default\) is 1-D"),
    (SiblingsOfInputs(), (torch.randn(2, 3, 8), torch.randn(6, 8), torch.randn(4, 8)),
     r"%wa .* is not a constant tensor: a merged weight would be concatenated on every call"),
])
def test_refusals_leave_the_graph_and_say_why(module, args, reason):
    gm = export_graph(module, args)
    before = copy.deepcopy(gm)
    report = run_passes(gm, [sibling_projections.PASS])
    assert report.fusions() == {}
    [rejection] = report.rejections()
    assert rejection.pass_name == KIND
    assert re.search(reason, rejection.reason), rejection.reason
    assert op_counts(gm) == op_counts(before) and gm.code == before.code
    torch.testing.assert_close(gm(*args), module(*args))


class TestGoldenGraph(expecttest.TestCase):
    def test_our_mlp_after_the_pass(self):
        torch.manual_seed(0)
        mlp = MLP(8, 16).eval()
        x = torch.randn(2, 3, 8)
        gm = export_graph(mlp, (x,))
        run_passes(gm, [sibling_projections.PASS])
        torch.testing.assert_close(gm(x), mlp(x), atol=1e-5, rtol=1e-5)
        self.assertExpectedInline(printed(gm), """\
def forward(self, x):
    down_proj_weight = self.down_proj.weight
    dflash_sibling_weight_0 = self.dflash_sibling_weight_0
    linear_default = torch.ops.aten.linear.default(x, dflash_sibling_weight_0);  x = dflash_sibling_weight_0 = None
    slice_tensor = torch.ops.aten.slice.Tensor(linear_default, -1, 0, 16)
    slice_tensor_1 = torch.ops.aten.slice.Tensor(linear_default, -1, 16, 32);  linear_default = None
    silu = torch.ops.aten.silu.default(slice_tensor);  slice_tensor = None
    mul = torch.ops.aten.mul.Tensor(silu, slice_tensor_1);  silu = slice_tensor_1 = None
    linear_2 = torch.ops.aten.linear.default(mul, down_proj_weight);  mul = down_proj_weight = None
    return pytree.tree_unflatten((linear_2,), self._out_spec)""")
