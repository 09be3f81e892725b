"""Reference models vs transformers / z-lab dflash on tiny random checkpoints (fp32, CPU, atol 1e-5)."""
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from torch_dflash.models import (DecoderConfig, DFlashDraft, DFlashDraftConfig, MHCConfig, hc_head, hc_pre,
                                 load_draft, load_target)
from torch_dflash.models.mhc import MHCDecoderLayer

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TOL = dict(atol=1e-5, rtol=1e-5)


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def arange(start, stop, batch=2):
    return torch.arange(start, stop)[None].expand(batch, -1)


# --- decoder target ------------------------------------------------------------------------------------------------
def _hf(name):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    return {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[name]


DECODERS = {
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True, "rope_theta": 5000.0}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_tied_mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4, "rope_theta": 500.0}),
}


@pytest.mark.parametrize("case", DECODERS)
def test_decoder_prefill_then_step_matches_transformers(case, tmp_path, randomize):
    arch, extra = DECODERS[case]
    config_cls, model_cls = _hf(arch)
    hf = randomize(model_cls(config_cls(**{**TINY, **extra})))
    hf.save_pretrained(tmp_path)
    model = load_target(tmp_path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == bool(extra.get("tie_word_embeddings"))
    model.feature_layer_ids = [2, 0, 3]  # the last layer's HF hidden state is after the final norm
    model.setup_cache(2, 24)
    x = ids(2, 12)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        prefill = model(x[:, :8], positions=arange(0, 8), return_features=True)
        step = model(x[:, 8:], positions=arange(8, 12), logits_indices=torch.tensor([0, 3]), return_features=True)
    ref_features = torch.cat([ref.hidden_states[i + 1] for i in [2, 0, 3]], dim=-1)
    assert_close(prefill.logits, ref.logits[:, :8], **TOL)
    assert_close(prefill.features, ref_features[:, :8], **TOL)
    assert_close(step.logits, ref.logits[:, [8, 11]], **TOL)
    assert_close(step.features, ref_features[:, 8:], **TOL)


def test_decoder_ragged_rows_roll_back_by_position(tiny_qwen3_dir):
    """Row 1 rejects 3 tokens: its next step rewrites cache slots 5.. and must equal HF on the kept prefix."""
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    model = load_target(tiny_qwen3_dir)
    model.setup_cache(3, 16)
    x, new = ids(2, 8), ids(2, 3, seed=1)
    with torch.no_grad():
        model(x, positions=arange(0, 8))
        positions = torch.stack([torch.arange(8, 11), torch.arange(5, 8)])
        out = model(inputs_embeds=model.embed(new), positions=positions)
        row0 = hf(torch.cat([x[:1], new[:1]], 1)).logits[0, 8:]
        row1 = hf(torch.cat([x[1:, :5], new[1:]], 1)).logits[0, 5:]
    assert_close(out.logits[0], row0, **TOL)
    assert_close(out.logits[1], row1, **TOL)


def test_partial_rotary_matches_phi3(tmp_path, randomize):
    """Partial rotary (first rot_dim channels, neox): transformers' Llama/Qwen3 ignore partial_rotary_factor in
    5.23, Phi3 applies it; its fused qkv/gate_up weights are split into a llama checkpoint."""
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    fields = {k: v for k, v in TINY.items() if k != "head_dim"}
    hf = randomize(Phi3ForCausalLM(Phi3Config(**fields, partial_rotary_factor=0.5, pad_token_id=0)))
    tensors = {}
    for name, t in hf.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            for part, w in zip("qkv", t.split([64, 32, 32])):
                tensors[f"{stem}{part}_proj.weight"] = w.contiguous()
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            tensors[stem + "gate_proj.weight"], tensors[stem + "up_proj.weight"] = (w.contiguous() for w in t.chunk(2))
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    config = {"model_type": "llama", **fields, "rms_norm_eps": hf.config.rms_norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_target(tmp_path)
    assert model.config.rot_dim == 8
    model.setup_cache(2, 16)
    x = ids(2, 10)
    with torch.no_grad():
        assert_close(model(x, positions=arange(0, 10)).logits, hf(x).logits, **TOL)


# --- DFlash draft ---------------------------------------------------------------------------------------------------
SLIDING = {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 3, "use_sliding_window": True}
DRAFTS = {"full": {}, "sliding": SLIDING, "all_causal": {"is_causal": True},
          "sliding_bidirectional": {**SLIDING, "is_causal": False}}


def zlab_draft(tmp_path, randomize, **extra):
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config

    cfg = Qwen3Config(**{**TINY, "num_hidden_layers": 2}, num_target_layers=6,
                      dflash_config={"block_size": 4, "mask_token_id": 127}, **extra)
    zlab = randomize(DFlashDraftModel(cfg))
    zlab.save_pretrained(tmp_path)
    return zlab, load_draft(tmp_path)


def features(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 128, generator=g), torch.randn(batch, 4, 64, generator=g)


@pytest.mark.parametrize("case", DRAFTS)
def test_draft_one_step_matches_zlab(case, tmp_path, randomize):
    zlab, draft = zlab_draft(tmp_path, randomize, **DRAFTS[case])
    assert draft.target_layer_ids == zlab.target_layer_ids == [1, 3]  # z-lab's default for 6 target layers
    assert [a.self_attn.is_causal for a in draft.layers] == [a.self_attn.is_causal for a in zlab.layers]
    draft.setup_cache(2, 32)
    ctx, block = features(2, 6, seed=0)
    with torch.no_grad():
        ref = zlab(target_hidden=ctx, noise_embedding=block, position_ids=arange(0, 10))
        out = draft(ctx, block, arange(0, 6), arange(6, 10))
    assert_close(out, ref, **TOL)


@pytest.mark.parametrize("case", ["full", "sliding"])
def test_draft_two_steps_match_zlab_dynamic_cache(case, tmp_path, randomize):
    """Step 2 overwrites step 1's block slots with context k/v (rollback by position) == z-lab's cache + crop,
    == z-lab without a cache over the whole context."""
    from dflash.model import _crop_to, _make_cache

    zlab, draft = zlab_draft(tmp_path, randomize, **DRAFTS[case])
    draft.setup_cache(2, 32)
    cache = _make_cache(zlab.config)
    (ctx1, block1), (ctx2, block2) = features(2, 6, seed=0), features(2, 3, seed=1)
    with torch.no_grad():
        zlab(target_hidden=ctx1, noise_embedding=block1, position_ids=arange(0, 10), past_key_values=cache,
             use_cache=True)
        _crop_to(cache, 6)
        ref = zlab(target_hidden=ctx2, noise_embedding=block2, position_ids=arange(6, 13), past_key_values=cache,
                   use_cache=True)
        ref_full = zlab(target_hidden=torch.cat([ctx1, ctx2], 1), noise_embedding=block2, position_ids=arange(0, 13))
        draft(ctx1, block1, arange(0, 6), arange(6, 10))
        out = draft(ctx2, block2, arange(6, 9), arange(9, 13))
    assert_close(out, ref, **TOL)
    assert_close(out, ref_full, **TOL)


def test_draft_logits_and_block_embeddings_use_the_target(tiny_qwen3_dir, tiny_draft_dir):
    from dflash.model import DFlashDraftModel, _raw_input_embeddings
    from transformers import Qwen3ForCausalLM

    hf_target = Qwen3ForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    zlab = DFlashDraftModel.from_pretrained(tiny_draft_dir).eval()
    zlab.config.dflash_config.update(output_multiplier=0.5, final_logit_softcapping=3.0, input_embedding_scale=2.0)
    cfg = json.loads((tiny_draft_dir / "config.json").read_text())
    cfg["dflash_config"].update(output_multiplier=0.5, final_logit_softcapping=3.0, input_embedding_scale=2.0)
    draft, target = DFlashDraft(DFlashDraftConfig.from_hf(cfg)), load_target(tiny_qwen3_dir)
    assert (draft.block_size, draft.mask_token_id, draft.target_layer_ids) == (4, 127, [1, 2])
    hidden, block_ids = torch.randn(2, 3, 64), ids(2, 4)
    with torch.no_grad():
        assert_close(draft.compute_logits(hidden, target), zlab.compute_logits(hidden, hf_target.lm_head), **TOL)
        assert_close(draft.embed_block(block_ids, target), _raw_input_embeddings(hf_target, block_ids, 2.0), **TOL)


# --- mHC ------------------------------------------------------------------------------------------------------------
def dsv4_config():
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    return DeepseekV4Config(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, q_lora_rank=16,
                            num_experts_per_tok=1, n_routed_experts=2, o_groups=1, o_lora_rank=16, index_n_heads=1,
                            index_head_dim=16, index_topk=4, sliding_window=8, hc_mult=4, hc_sinkhorn_iters=20)


def test_hc_pre_and_hc_head_match_transformers(randomize):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    c = dsv4_config()
    hc, head = randomize(DeepseekV4HyperConnection(c)), randomize(DeepseekV4HyperHead(c), seed=1)
    x = torch.randn(2, 5, 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        post, comb, collapsed = hc_pre(x, hc.fn, hc.base, hc.scale, 4, 20, c.rms_norm_eps, c.hc_eps)
        for ours, ref in zip((post, comb, collapsed), hc(x)):
            assert_close(ours, ref, **TOL)
        assert_close(comb.sum(-2), torch.ones(2, 5, 4), atol=1e-4, rtol=0)  # Sinkhorn ends on columns
        assert_close(hc_head(x, head.hc_fn, head.hc_base, head.hc_scale, c.rms_norm_eps, c.hc_eps), head(x), **TOL)


class _Sublayer(nn.Module):
    """A deterministic stand-in for attention / MLP, shared by both layers so only the hc boundaries differ."""

    def __init__(self, seed, as_tuple=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(seed)) * 0.2)
        self.as_tuple = as_tuple

    def forward(self, x, *args, **kwargs):
        y = torch.tanh(x @ self.w)
        return (y, None) if self.as_tuple else y


def test_mhc_layer_matches_deepseek_v4_decoder_layer(randomize):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    c = dsv4_config()
    ours = randomize(MHCDecoderLayer(MHCConfig(**{**TINY, "rms_norm_eps": c.rms_norm_eps, "hc_eps": c.hc_eps})))
    theirs = DeepseekV4DecoderLayer(c, 0)
    shared = {k: v for k, v in ours.state_dict().items() if "_hc." in k or "layernorm" in k}
    assert len(shared) == 8 and not theirs.load_state_dict(shared, strict=False).unexpected_keys
    ours.self_attn, ours.mlp = _Sublayer(1), _Sublayer(2)
    theirs.self_attn, theirs.mlp = _Sublayer(1, as_tuple=True), _Sublayer(2)
    x = torch.randn(2, 5, 4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(x, None, None, None, None), theirs(x), **TOL)


def test_mhc_target_static_cache_steps_match_one_pass(tiny_mhc_dir):
    model = load_target(tiny_mhc_dir)
    model.feature_layer_ids = [0, 1]
    x = ids(2, 10)
    with torch.no_grad():
        model.setup_cache(2, 16)
        full = model(x, positions=arange(0, 10), return_features=True)
        model.setup_cache(2, 16)
        model(x[:, :6], positions=arange(0, 6))
        step = model(x[:, 6:], positions=arange(6, 10), logits_indices=torch.tensor([1, 3]), return_features=True)
    assert full.features.shape == (2, 10, 2 * 4 * 64)
    assert_close(step.logits, full.logits[:, [7, 9]], **TOL)
    assert_close(step.features, full.features[:, 6:], **TOL)


# --- capture -------------------------------------------------------------------------------------------------------
def test_export_captures_cache_writes_as_buffer_mutations(tiny_qwen3_dir, tiny_draft_dir):
    target, draft = load_target(tiny_qwen3_dir), load_draft(tiny_draft_dir)
    target.feature_layer_ids = draft.target_layer_ids

    class Verify(nn.Module):
        def __init__(self, target):
            super().__init__()
            self.target = target

        def forward(self, x, positions):
            return self.target(x, positions=positions, return_features=True)

    ctx, block = features(2, 3, seed=0)
    cases = [(Verify(target), (ids(2, 4), arange(0, 4).contiguous())),
             (draft, (ctx, block, arange(0, 3).contiguous(), arange(3, 7).contiguous()))]
    for module, args in cases:
        target.setup_cache(2, 16)
        draft.setup_cache(2, 16)
        program = torch.export.export(module, args).run_decompositions()
        mutated = set(program.graph_signature.buffers_to_mutate.values())
        assert mutated == set(program.graph_signature.buffers) and len(mutated) in (2 * 4, 2 * 2)  # k, v per layer
        with torch.no_grad():
            assert_close(program.module()(*args), module(*args), **TOL)
