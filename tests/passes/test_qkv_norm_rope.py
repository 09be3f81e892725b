"""qkv_norm_rope on transformers' Qwen3 / Llama, on a hypothesis sweep of HF-spelled attention blocks, on the
cases it must refuse (graph untouched, reason recorded), and a golden printed graph."""

import os
import re

import expecttest
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_testing import (ProjectionAttention, assert_same_outputs, check_pass, export_graph, op_counts, op_diff,
                          projection_args, projection_dims, run_passes)
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from torch_dflash.passes import kv_materialize, qkv_norm_rope

PASSES = [kv_materialize.PASS, qkv_norm_rope.PASS]
EXAMPLES = int(os.environ.get("TORCH_DFLASH_HYPOTHESIS_EXAMPLES", 100))
FUSED = "dflash.qkv_norm_rope.default"


def tiny_transformers(kind: str, layers: int = 2):
    torch.manual_seed(0)
    cls, config_cls, extra = {
        "qwen3": (Qwen3ForCausalLM, Qwen3Config, {}),
        "llama": (LlamaForCausalLM, LlamaConfig, {}),
        "llama_bias": (LlamaForCausalLM, LlamaConfig, {"attention_bias": True}),
    }[kind]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, **extra)
    config._attn_implementation = "sdpa"
    return cls(config)


@pytest.mark.parametrize("kind", ["qwen3", "llama", "llama_bias"])
def test_fuses_every_layer_of_transformers_models(kind):
    layers = 2
    model = tiny_transformers(kind, layers)
    seq = torch.export.Dim("seq", min=2, max=128)

    def args(s):
        return {"input_ids": torch.randint(0, 128, (2, s)), "use_cache": False}

    before, after, report = check_pass(model, args(8), args(13), PASSES, {"qkv_norm_rope": layers},
                                       dynamic_shapes={"input_ids": {1: seq}, "use_cache": None})
    gone, new = op_diff(before, after)
    assert new[FUSED] == layers
    assert gone["aten.linear.default"] == 3 * layers
    assert op_counts(after)["aten.linear.default"] == 4 * layers + 1        # o, gate, up, down; lm_head
    assert gone["aten.rsqrt.default"] == (2 * layers if kind == "qwen3" else 0)   # q_norm, k_norm
    assert report.rejections() == []
    params = dict(after.named_parameters())
    assert not any(".q_proj." in name or ".k_proj." in name or ".v_proj." in name for name in params)
    merged = [name for name, _ in after.named_buffers() if name.startswith("dflash_qkv_")]
    assert len(merged) == layers * (2 if kind == "llama_bias" else 1)


def test_bf16_model_fuses_within_bf16_rounding():
    """In bf16 the op computes rope and the norm's weight product in fp32 where HF rounds to bf16 first."""
    model = tiny_transformers("qwen3").to(torch.bfloat16)
    args = {"input_ids": torch.randint(0, 128, (2, 8)), "use_cache": False}
    check_pass(model, args, {**args, "input_ids": torch.randint(0, 128, (2, 8))}, PASSES, {"qkv_norm_rope": 2},
               atol=2e-2, rtol=2e-2)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(head_dim=st.sampled_from([64, 128, 256]), n_kv=st.integers(1, 2), group=st.integers(1, 8),
       bias=st.booleans(), qk_norm=st.booleans(), norm_style=st.sampled_from(["hf", "functional", "plain"]),
       rot_fraction=st.sampled_from([1, 2, 4]), theta=st.sampled_from([1e4, 5e5, 1e6]),
       eps=st.sampled_from([1e-5, 1e-6]), fused=st.booleans(), layout=st.sampled_from(["bhsd", "bhsd_norm_last", "bshd"]),
       rotate=st.sampled_from(["slice", "chunk"]), batch=st.integers(1, 4), seqs=st.tuples(
           st.integers(4, 16), st.integers(4, 16)), dynamic=st.sampled_from([False] * 7 + [True]))
def test_sweep_of_attention_spellings(head_dim, n_kv, group, bias, qk_norm, norm_style, rot_fraction, theta, eps,
                                      fused, layout, rotate, batch, seqs, dynamic):
    """Count and numerics per example; one in eight exported with a dynamic sequence length and checked on a
    second length, the others on fresh inputs of the export shape (a dynamic export costs ~4× a static one)."""
    torch.manual_seed(head_dim + n_kv + group + batch)
    hidden = 32
    module = ProjectionAttention(hidden, n_kv * group, n_kv, head_dim, bias=bias, qk_norm=qk_norm,
                                 norm_style=norm_style, rot_dim=head_dim // rot_fraction, theta=theta, eps=eps,
                                 fused=fused, layout=layout, rope_style=rotate)
    first, second = seqs if dynamic else (seqs[0], seqs[0])
    check_pass(module, projection_args(module, hidden, batch, first), projection_args(module, hidden, batch, second),
               PASSES, {"qkv_norm_rope": 1}, projection_dims(module, first) if dynamic else None)


REFUSED = [
    (dict(rope_style="interleaved"), "rope is interleaved (GPT-J), not rotate-half"),
    (dict(k_eps=1e-5), "k_norm eps 1e-05 ≠ q_norm eps 1e-06"),
    (dict(k_cos_shift=1), "q and k use different cos tensors"),
    (dict(norm_dtype=torch.bfloat16), "dtype of x is torch.float32, q_norm weight torch.bfloat16"),
]


@pytest.mark.parametrize("knobs,reason", REFUSED, ids=["interleaved", "eps", "cos", "dtype"])
def test_refused_sites_are_left_alone_with_the_reason(knobs, reason):
    torch.manual_seed(0)
    module = ProjectionAttention(32, 4, 2, 16, **knobs).eval()
    args = projection_args(module, 32, 2, 6)
    gm = export_graph(module, args)
    ops = op_counts(gm)
    report = run_passes(gm, PASSES)
    assert report.fusions() == {}
    assert op_counts(gm) == ops
    assert any(reason in r.reason for r in report.rejections()), [r.reason for r in report.rejections()]
    with torch.no_grad():
        assert_same_outputs(module(*args), gm(*args))


def test_a_site_whose_inner_value_is_used_elsewhere_is_left_alone():
    module = ProjectionAttention(32, 4, 2, 16).eval()
    gm = export_graph(module, projection_args(module, 32, 2, 6))
    q_view = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.view.default)   # q's heads, first
    output = gm.graph.output_node()
    output.args = ((*output.args[0], q_view),)
    gm.recompile()
    ops = op_counts(gm)
    report = run_passes(gm, PASSES)
    assert report.fusions() == {} and op_counts(gm) == ops
    assert any(f"%{q_view.name} (view.default) inside the site is also used by %output" in r.reason
               for r in report.rejections())


def test_the_numerics_check_catches_a_wrong_rewrite():
    """The harness's comparison is not vacuous: perturb the merged weight after the pass and it fails."""
    torch.manual_seed(0)
    module = ProjectionAttention(32, 4, 2, 16).eval()
    args = projection_args(module, 32, 2, 6)
    gm = export_graph(module, args)
    assert run_passes(gm, PASSES).fusions() == {"qkv_norm_rope": 1}
    with torch.no_grad():
        gm.dflash_qkv_weight_0[0, 0] += 1e-3
        with pytest.raises(AssertionError):
            assert_same_outputs(module(*args), gm(*args))


VERSION_NOISE = re.compile(r"_guards_fn|_assert_tensor_metadata|tree_flatten_spec")


def printed(gm) -> str:
    """gm.code without blank lines and the lines torch versions print differently (guards, metadata asserts)."""
    return "\n".join(line.rstrip() for line in gm.code.strip().splitlines()
                     if line.strip() and not VERSION_NOISE.search(line))


class TestGoldenGraph(expecttest.TestCase):
    def test_tiny_qwen3_attention_after_the_passes(self):
        torch.manual_seed(0)
        module = ProjectionAttention(16, 2, 1, 8, bias=True).eval()
        gm = export_graph(module, projection_args(module, 16, 1, 4))
        run_passes(gm, PASSES)
        self.assertExpectedInline(printed(gm), """\
def forward(self, x, positions):
    o_proj_weight = self.o_proj.weight
    q_norm_weight = self.q_norm.weight
    k_norm_weight = self.k_norm.weight
    inv_freq = self.inv_freq
    unsqueeze = torch.ops.aten.unsqueeze.default(positions, 2);  positions = None
    to = torch.ops.aten.to.dtype(unsqueeze, torch.float32);  unsqueeze = None
    mul = torch.ops.aten.mul.Tensor(to, inv_freq);  to = inv_freq = None
    cat = torch.ops.aten.cat.default([mul, mul], -1);  mul = None
    cos = torch.ops.aten.cos.default(cat)
    sin = torch.ops.aten.sin.default(cat);  cat = None
    dflash_qkv_weight_0 = self.dflash_qkv_weight_0
    dflash_qkv_bias_0 = self.dflash_qkv_bias_0
    qkv_norm_rope_default = torch.ops.dflash.qkv_norm_rope.default(x, dflash_qkv_weight_0, dflash_qkv_bias_0, q_norm_weight, k_norm_weight, 1e-06, cos, sin, 2, 1, 8);  x = dflash_qkv_weight_0 = dflash_qkv_bias_0 = q_norm_weight = k_norm_weight = cos = sin = None
    getitem = qkv_norm_rope_default[0]
    getitem_1 = qkv_norm_rope_default[1]
    getitem_2 = qkv_norm_rope_default[2];  qkv_norm_rope_default = None
    transpose_int = torch.ops.aten.transpose.int(getitem, 1, 2);  getitem = None
    transpose_int_1 = torch.ops.aten.transpose.int(getitem_1, 1, 2);  getitem_1 = None
    transpose_int_2 = torch.ops.aten.transpose.int(getitem_2, 1, 2);  getitem_2 = None
    scaled_dot_product_attention = torch.ops.aten.scaled_dot_product_attention.default(transpose_int, transpose_int_1, transpose_int_2, enable_gqa = True);  transpose_int = transpose_int_1 = transpose_int_2 = None
    transpose_3 = torch.ops.aten.transpose.int(scaled_dot_product_attention, 1, 2);  scaled_dot_product_attention = None
    reshape = torch.ops.aten.reshape.default(transpose_3, [1, 4, -1]);  transpose_3 = None
    linear_3 = torch.ops.aten.linear.default(reshape, o_proj_weight);  reshape = o_proj_weight = None
    return pytree.tree_unflatten((linear_3,), self._out_spec)""")
