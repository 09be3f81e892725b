"""The default pipeline end to end: counts and numerics on a second shape, and golden graphs (expecttest).

Goldens: a tiny transformers Qwen3 forward over a block (the verify step's shape: logits for every position) and
a tiny z-lab DFlash draft forward (context features + block). When a pass changes its output on purpose,
re-accept with `EXPECTTEST_ACCEPT=1 pytest tests/passes/test_pipeline.py` and review the diff.
"""

import expecttest
import pytest
import tiny_models
import torch
from pass_testing import check_pass
from torch.export import Dim

from torch_dflash.errors import InputError
from torch_dflash.passes.pipeline import DEFAULT_PASSES, default_pass_manager


def qwen3_block():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, head_dim=16)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    block = lambda b, s: {"input_ids": torch.randint(0, 128, (b, s)), "use_cache": False}  # noqa: E731
    dims = {"input_ids": {1: Dim("block", min=2, max=16)}, "use_cache": None}
    return model, block(2, 8), block(2, 5), dims


def zlab_draft():
    model = tiny_models.zlab_draft(layers=1)

    def step(ctx, block):
        return {"position_ids": torch.arange(ctx + block)[None], "noise_embedding": torch.randn(1, block, 64),
                "target_hidden": torch.randn(1, ctx, 128)}

    dims = {"position_ids": {1: Dim("positions", min=4, max=80)}, "noise_embedding": {1: Dim("block", max=16)},
            "target_hidden": {1: Dim("ctx", min=2, max=64)}}
    return model, step(6, 4), step(9, 3), dims


def test_pass_order_and_disabling():
    assert [p.name for p in DEFAULT_PASSES] == ["canonicalize", "kv_materialize", "qkv_norm_rope", "mhc_post_pre",
                                                "merge_sibling_projections", "attention_masks", "kv_cache_writes",
                                                "context_qkv", "rms_norms", "add_rms_norm", "embedding_rms_norm",
                                                "silu_mul", "rope_cos_sin", "joined_positions", "cleanup",
                                                "weight_linears", "linear_silu_mul", "deferred_mlp_norm",
                                                "add_rms_norm_linear_silu_mul", "deferred_rms_norm"]
    assert [p.name for p in default_pass_manager(disabled=("deferred_rms_norm",)).passes][-1] == \
        "add_rms_norm_linear_silu_mul"
    with pytest.raises(InputError, match="Unknown pass"):
        default_pass_manager(disabled=("qkv_norm_rop",))


class TestGoldenGraphs(expecttest.TestCase):
    def run_pipeline(self, build, expected):
        model, args, second, dims = build()
        _, gm, _ = check_pass(model, args, second, list(DEFAULT_PASSES), expected, dims)
        return gm.code.strip()

    def test_qwen3_verify_block(self):
        code = self.run_pipeline(qwen3_block, {"qkv_norm_rope": 1, "attention.causal": 1, "weight_linears": 4})
        self.assertExpectedInline(code, """\
def forward(self, input_ids, use_cache):
    input_ids, use_cache, = fx_pytree.tree_flatten_spec(([], {'input_ids':input_ids, 'use_cache':use_cache}), self._in_spec)
    model_layers_0_self_attn_o_proj_weight = getattr(self.model.layers, "0").self_attn.o_proj.weight
    model_layers_0_self_attn_q_norm_weight = getattr(self.model.layers, "0").self_attn.q_norm.weight
    model_layers_0_self_attn_k_norm_weight = getattr(self.model.layers, "0").self_attn.k_norm.weight
    model_layers_0_mlp_down_proj_weight = getattr(self.model.layers, "0").mlp.down_proj.weight
    lm_head_weight = self.lm_head.weight
    model_rotary_emb_inv_freq = self.model.rotary_emb.inv_freq
    _guards_fn = self._guards_fn(input_ids, use_cache);  use_cache = _guards_fn = None
    sym_size_int_7 = torch.ops.aten.sym_size.int(input_ids, 1)
    model_embed_tokens_weight = self.model.embed_tokens.weight
    model_layers_0_input_layernorm_weight = getattr(self.model.layers, "0").input_layernorm.weight
    embedding_rms_norm_default = torch.ops.dflash.embedding_rms_norm.default(model_embed_tokens_weight, input_ids, model_layers_0_input_layernorm_weight, 1e-06);  model_embed_tokens_weight = input_ids = model_layers_0_input_layernorm_weight = None
    getitem_7 = embedding_rms_norm_default[0]
    getitem_8 = embedding_rms_norm_default[1];  embedding_rms_norm_default = None
    arange = torch.ops.aten.arange.default(sym_size_int_7, device = device(type='cpu'), pin_memory = False)
    add = torch.ops.aten.add.Tensor(arange, 0);  arange = None
    unsqueeze = torch.ops.aten.unsqueeze.default(add, 0);  add = None
    submod_3 = self.submod_1
    wrap_with_set_grad_enabled = torch.ops.higher_order.wrap_with_set_grad_enabled(False, submod_3, unsqueeze, model_rotary_emb_inv_freq);  submod_3 = unsqueeze = model_rotary_emb_inv_freq = None
    to_4 = wrap_with_set_grad_enabled[0]
    to_5 = wrap_with_set_grad_enabled[1];  wrap_with_set_grad_enabled = None
    dflash_qkv_weight_0 = self.dflash_qkv_weight_0
    sym_size_int = torch.ops.aten.sym_size.int(getitem_8, 1)
    expand_default = torch.ops.aten.expand.default(to_4, [2, sym_size_int, -1]);  to_4 = None
    expand_default_1 = torch.ops.aten.expand.default(to_5, [2, sym_size_int, -1]);  to_5 = sym_size_int = None
    qkv_norm_rope_default = torch.ops.dflash.qkv_norm_rope.default(getitem_8, dflash_qkv_weight_0, None, model_layers_0_self_attn_q_norm_weight, model_layers_0_self_attn_k_norm_weight, 1e-06, expand_default, expand_default_1, 4, 2, 16);  getitem_8 = dflash_qkv_weight_0 = model_layers_0_self_attn_q_norm_weight = model_layers_0_self_attn_k_norm_weight = expand_default = expand_default_1 = None
    getitem = qkv_norm_rope_default[0]
    getitem_1 = qkv_norm_rope_default[1]
    getitem_2 = qkv_norm_rope_default[2];  qkv_norm_rope_default = None
    transpose_int = torch.ops.aten.transpose.int(getitem, 1, 2);  getitem = None
    transpose_int_1 = torch.ops.aten.transpose.int(getitem_1, 1, 2);  getitem_1 = None
    transpose_int_2 = torch.ops.aten.transpose.int(getitem_2, 1, 2);  getitem_2 = None
    attention_default = torch.ops.dflash.attention.default(transpose_int, transpose_int_1, transpose_int_2, 'causal', 0.25, 0, None, None);  transpose_int = transpose_int_1 = transpose_int_2 = None
    transpose_3 = torch.ops.aten.transpose.int(attention_default, 1, 2);  attention_default = None
    reshape_3 = torch.ops.aten.reshape.default(transpose_3, [2, sym_size_int_7, -1]);  transpose_3 = sym_size_int_7 = None
    model_layers_0_post_attention_layernorm_weight = getattr(self.model.layers, "0").post_attention_layernorm.weight
    linear_add_norm_stats_default = torch.ops.dflash.linear_add_norm_stats.default(reshape_3, model_layers_0_self_attn_o_proj_weight, None, getitem_7, model_layers_0_post_attention_layernorm_weight);  reshape_3 = model_layers_0_self_attn_o_proj_weight = getitem_7 = model_layers_0_post_attention_layernorm_weight = None
    getitem_9 = linear_add_norm_stats_default[0]
    getitem_10 = linear_add_norm_stats_default[1]
    getitem_11 = linear_add_norm_stats_default[2];  linear_add_norm_stats_default = None
    dflash_sibling_weight_0 = self.dflash_sibling_weight_0
    linear_silu_mul_default = torch.ops.dflash.linear_silu_mul.default(getitem_10, dflash_sibling_weight_0, None, x_sumsq = getitem_11, x_eps = 1e-06);  getitem_10 = dflash_sibling_weight_0 = getitem_11 = None
    linear_default_3 = torch.ops.dflash.linear.default(linear_silu_mul_default, model_layers_0_mlp_down_proj_weight, None);  linear_silu_mul_default = model_layers_0_mlp_down_proj_weight = None
    model_norm_weight = self.model.norm.weight
    add_rms_norm_default_1 = torch.ops.dflash.add_rms_norm.default(getitem_9, linear_default_3, model_norm_weight, 1e-06);  getitem_9 = linear_default_3 = model_norm_weight = None
    getitem_5 = add_rms_norm_default_1[0];  add_rms_norm_default_1 = None
    linear_default_4 = torch.ops.dflash.linear.default(getitem_5, lm_head_weight, None);  getitem_5 = lm_head_weight = None
    return pytree.tree_unflatten((linear_default_4,), self._out_spec)""")

    def test_zlab_draft_step(self):
        code = self.run_pipeline(zlab_draft, {"kv_materialize": 1, "qkv_norm_rope": 1, "attention.non_causal": 1,
                                              "weight_linears": 4})
        self.assertExpectedInline(code, """\
def forward(self, position_ids, noise_embedding, target_hidden):
    position_ids, noise_embedding, target_hidden, = fx_pytree.tree_flatten_spec(([], {'position_ids':position_ids, 'noise_embedding':noise_embedding, 'target_hidden':target_hidden}), self._in_spec)
    layers_0_self_attn_o_proj_weight = getattr(self.layers, "0").self_attn.o_proj.weight
    layers_0_self_attn_q_norm_weight = getattr(self.layers, "0").self_attn.q_norm.weight
    layers_0_self_attn_k_norm_weight = getattr(self.layers, "0").self_attn.k_norm.weight
    layers_0_mlp_down_proj_weight = getattr(self.layers, "0").mlp.down_proj.weight
    layers_0_input_layernorm_weight = getattr(self.layers, "0").input_layernorm.weight
    fc_weight = self.fc.weight
    hidden_norm_weight = self.hidden_norm.weight
    rotary_emb_inv_freq = self.rotary_emb.inv_freq
    _guards_fn = self._guards_fn(position_ids, noise_embedding, target_hidden);  _guards_fn = None
    sym_size_int_4 = torch.ops.aten.sym_size.int(noise_embedding, 1)
    linear_default_1 = torch.ops.dflash.linear.default(target_hidden, fc_weight, None);  target_hidden = fc_weight = None
    rms_norm_default_3 = torch.ops.dflash.rms_norm.default(linear_default_1, hidden_norm_weight, 1e-06);  linear_default_1 = hidden_norm_weight = None
    submod_3 = self.submod_1
    wrap_with_set_grad_enabled = torch.ops.higher_order.wrap_with_set_grad_enabled(False, submod_3, position_ids, rotary_emb_inv_freq);  submod_3 = position_ids = rotary_emb_inv_freq = None
    to_4 = wrap_with_set_grad_enabled[0]
    to_5 = wrap_with_set_grad_enabled[1];  wrap_with_set_grad_enabled = None
    rms_norm_default_2 = torch.ops.dflash.rms_norm.default(noise_embedding, layers_0_input_layernorm_weight, 1e-06);  layers_0_input_layernorm_weight = None
    dflash_qkv_weight_0 = self.dflash_qkv_weight_0
    slice_tensor = torch.ops.aten.slice.Tensor(dflash_qkv_weight_0, 0, 64, 9223372036854775807)
    sym_size_int = torch.ops.aten.sym_size.int(rms_norm_default_3, 1)
    slice_tensor_1 = torch.ops.aten.slice.Tensor(to_4, 1, 0, sym_size_int)
    slice_tensor_2 = torch.ops.aten.slice.Tensor(to_5, 1, 0, sym_size_int)
    slice_tensor_3 = torch.ops.aten.slice.Tensor(to_4, 1, sym_size_int, 9223372036854775807);  to_4 = None
    slice_tensor_4 = torch.ops.aten.slice.Tensor(to_5, 1, sym_size_int, 9223372036854775807);  to_5 = sym_size_int = None
    qkv_norm_rope_default = torch.ops.dflash.qkv_norm_rope.default(rms_norm_default_2, dflash_qkv_weight_0, None, layers_0_self_attn_q_norm_weight, layers_0_self_attn_k_norm_weight, 1e-06, slice_tensor_3, slice_tensor_4, 4, 2, 16);  rms_norm_default_2 = dflash_qkv_weight_0 = layers_0_self_attn_q_norm_weight = slice_tensor_3 = slice_tensor_4 = None
    getitem = qkv_norm_rope_default[0]
    getitem_1 = qkv_norm_rope_default[1]
    getitem_2 = qkv_norm_rope_default[2];  qkv_norm_rope_default = None
    kv_materialize_default = torch.ops.dflash.kv_materialize.default(rms_norm_default_3, slice_tensor, None, layers_0_self_attn_k_norm_weight, 1e-06, slice_tensor_1, slice_tensor_2, 2, 16);  rms_norm_default_3 = slice_tensor = layers_0_self_attn_k_norm_weight = slice_tensor_1 = slice_tensor_2 = None
    getitem_3 = kv_materialize_default[0]
    getitem_4 = kv_materialize_default[1];  kv_materialize_default = None
    transpose_int = torch.ops.aten.transpose.int(getitem, 1, 2);  getitem = None
    cat_default = torch.ops.aten.cat.default([getitem_3, getitem_1], 1);  getitem_3 = getitem_1 = None
    transpose_int_1 = torch.ops.aten.transpose.int(cat_default, 1, 2);  cat_default = None
    cat_default_1 = torch.ops.aten.cat.default([getitem_4, getitem_2], 1);  getitem_4 = getitem_2 = None
    transpose_int_2 = torch.ops.aten.transpose.int(cat_default_1, 1, 2);  cat_default_1 = None
    attention_default = torch.ops.dflash.attention.default(transpose_int, transpose_int_1, transpose_int_2, 'non_causal', 0.25, 0, None, None);  transpose_int = transpose_int_1 = transpose_int_2 = None
    transpose_3 = torch.ops.aten.transpose.int(attention_default, 1, 2);  attention_default = None
    reshape_1 = torch.ops.aten.reshape.default(transpose_3, [1, sym_size_int_4, -1]);  transpose_3 = sym_size_int_4 = None
    layers_0_post_attention_layernorm_weight = getattr(self.layers, "0").post_attention_layernorm.weight
    linear_add_norm_stats_default = torch.ops.dflash.linear_add_norm_stats.default(reshape_1, layers_0_self_attn_o_proj_weight, None, noise_embedding, layers_0_post_attention_layernorm_weight);  reshape_1 = layers_0_self_attn_o_proj_weight = noise_embedding = layers_0_post_attention_layernorm_weight = None
    getitem_9 = linear_add_norm_stats_default[0]
    getitem_10 = linear_add_norm_stats_default[1]
    getitem_11 = linear_add_norm_stats_default[2];  linear_add_norm_stats_default = None
    dflash_sibling_weight_0 = self.dflash_sibling_weight_0
    linear_silu_mul_default = torch.ops.dflash.linear_silu_mul.default(getitem_10, dflash_sibling_weight_0, None, x_sumsq = getitem_11, x_eps = 1e-06);  getitem_10 = dflash_sibling_weight_0 = getitem_11 = None
    linear_default_4 = torch.ops.dflash.linear.default(linear_silu_mul_default, layers_0_mlp_down_proj_weight, None);  linear_silu_mul_default = layers_0_mlp_down_proj_weight = None
    norm_weight = self.norm.weight
    add_rms_norm_default_1 = torch.ops.dflash.add_rms_norm.default(getitem_9, linear_default_4, norm_weight, 1e-06);  getitem_9 = linear_default_4 = norm_weight = None
    getitem_7 = add_rms_norm_default_1[0];  add_rms_norm_default_1 = None
    return pytree.tree_unflatten((getitem_7,), self._out_spec)""")
