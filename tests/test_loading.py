"""Checkpoint loading: every bad checkpoint raises the documented error naming the file / tensor."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close

from torch_dflash.errors import CheckpointError, ConfigError
from torch_dflash.models import DecoderConfig, DFlashDraftConfig, DecoderLM, MHCDecoderLM, load_draft, load_target


@pytest.fixture
def ckpt(tiny_qwen3_dir, tmp_path):
    """A writable copy of the tiny Qwen3 checkpoint."""
    return shutil.copytree(tiny_qwen3_dir, tmp_path / "ckpt")


def tensors(path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def logits(model, n=6):
    model.setup_cache(1, 8)
    with torch.no_grad():
        return model(torch.arange(n)[None], positions=torch.arange(n)[None]).logits


# --- directory and config ------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        load_target(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        load_target(ckpt)


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_target(ckpt)


def test_missing_required_field(ckpt):
    edit_config(ckpt, hidden_size=None)
    with pytest.raises(ConfigError, match="config.json is missing the required field 'hidden_size'"):
        load_target(ckpt)


def test_unknown_architecture(ckpt):
    edit_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"config.json has architecture \['GPT2LMHeadModel'\]"):
        load_target(ckpt)


def test_deepseek_v4_is_refused_with_the_reason(ckpt):
    edit_config(ckpt, model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"])
    with pytest.raises(ConfigError, match="compressed/sparse attention and MoE"):
        load_target(ckpt)


def test_target_and_draft_dirs_are_not_mixed_up(tiny_qwen3_dir, tiny_draft_dir):
    with pytest.raises(ConfigError, match="load_draft"):
        load_target(tiny_draft_dir)
    with pytest.raises(ConfigError, match="not a DFlash draft"):
        load_draft(tiny_qwen3_dir)


def test_draft_without_mask_token(tiny_draft_dir, tmp_path):
    path = shutil.copytree(tiny_draft_dir, tmp_path / "draft")
    edit_config(path, dflash_config={"block_size": 4, "target_layer_ids": [1, 2]})
    with pytest.raises(ConfigError, match="missing the required field 'mask_token_id'"):
        load_draft(path)


def test_rope_parameters_in_every_spelling():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert DecoderConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5
    assert DecoderConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7
    assert DecoderConfig.from_hf({**base, "partial_rotary_factor": 0.5}).rot_dim == 4
    assert DecoderConfig.from_hf(base).head_dim == 8 and DecoderConfig.from_hf(base).qk_norm is False
    assert DecoderConfig.from_hf({**base, "model_type": "qwen3"}).head_dim == 128  # Qwen3Config's default
    for scaling in ({"type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}):
        with pytest.raises(ConfigError, match="x.json uses rope type"):
            DecoderConfig.from_hf({**base, "rope_scaling": scaling}, where="x.json")


def test_draft_config_defaults_follow_zlab():
    cfg = DFlashDraftConfig.from_hf({"hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 3,
                                     "num_attention_heads": 4, "num_target_layers": 36, "block_size": 8,
                                     "dflash_config": {"mask_token_id": 5}})
    assert (cfg.target_layer_ids, cfg.block_size, cfg.head_dim) == ((1, 17, 33), 8, 128)


# --- tensors -------------------------------------------------------------------------------------------------------
def test_missing_tensor(ckpt):
    t = tensors(ckpt)
    del t["model.layers.1.self_attn.k_norm.weight"]
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_norm.weight is missing from"):
        load_target(ckpt)


def test_unexpected_tensor(ckpt):
    save_file({**tensors(ckpt), "model.layers.0.mlp.extra": torch.zeros(2)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors holds tensor model.layers.0.mlp.extra"):
        load_target(ckpt)


def test_wrong_shape(ckpt):
    save_file({**tensors(ckpt), "model.norm.weight": torch.ones(63)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight has shape \[63\], expected \[64\]"):
        load_target(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(ckpt, damage):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_target(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_target(ckpt)


def shard(path, names_per_shard):
    t = tensors(path)
    (path / "model.safetensors").unlink()
    weight_map = {}
    for i, names in enumerate(names_per_shard):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: t[n] for n in names}, path / file)
        weight_map.update(dict.fromkeys(names, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads(ckpt, tiny_qwen3_dir):
    names = sorted(tensors(ckpt))
    shard(ckpt, [names[: len(names) // 2], names[len(names) // 2 :]])
    assert_close(logits(load_target(ckpt)), logits(load_target(tiny_qwen3_dir)), atol=0, rtol=0)


def test_index_pointing_to_a_missing_shard(ckpt):
    names = sorted(tensors(ckpt))
    shard(ckpt, [names[:3], names[3:]])
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="points to shard .*model-00002-of-00002.safetensors"):
        load_target(ckpt)


def test_index_listing_a_tensor_its_shard_lacks(ckpt):
    names = sorted(tensors(ckpt))
    weight_map = shard(ckpt, [names[:3], names[3:]])
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors does not hold tensor model.norm"):
        load_target(ckpt)


# --- dtype, tying, models -------------------------------------------------------------------------------------------
def test_bf16_load(tiny_qwen3_dir):
    model = load_target(tiny_qwen3_dir, dtype=torch.bfloat16)
    assert isinstance(model, DecoderLM)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model)
    assert model.model.layers[0].self_attn.k_cache.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert_close(out.float(), logits(load_target(tiny_qwen3_dir)), atol=0.15, rtol=0.05)


def test_mhc_bf16_load_keeps_hc_params_and_norms_fp32(tiny_mhc_dir):
    model = load_target(tiny_mhc_dir, dtype=torch.bfloat16)
    assert isinstance(model, MHCDecoderLM)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert "model.layers.1.ffn_hc.fn" in fp32 and "model.hc_head.hc_scale" in fp32 and "model.norm.weight" in fp32
    assert "model.layers.0.self_attn.q_norm.weight" in fp32 and "model.layers.0.mlp.up_proj.weight" not in fp32
    assert_close(logits(model).float(), logits(load_target(tiny_mhc_dir)), atol=0.15, rtol=0.05)


def test_tied_checkpoint_without_lm_head(ckpt):
    edit_config(ckpt, tie_word_embeddings=True)
    t = tensors(ckpt)
    del t["lm_head.weight"]
    save_file(t, ckpt / "model.safetensors")
    model = load_target(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict() and "k_cache" not in str(list(model.state_dict()))


def test_draft_loads_with_zlab_parameter_names(tiny_draft_dir):
    draft = load_draft(tiny_draft_dir, dtype=torch.bfloat16)
    assert set(draft.state_dict()) == set(tensors(tiny_draft_dir))
    assert draft.fc.weight.dtype == torch.bfloat16 and draft.fc.weight.shape == (64, 128)
