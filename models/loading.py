"""Load the reference models from Hugging Face style directories: config.json + model.safetensors, or
model.safetensors.index.json + shards. Every problem is reported (one sentence naming the file and tensor)
before any tensor is copied into the model."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from torch_dflash.errors import CheckpointError, ConfigError

from .config import DecoderConfig, DFlashDraftConfig, MHCConfig
from .decoder import DecoderLM
from .draft import DFlashDraft
from .mhc import MHCDecoderLM

TARGETS = {"qwen3": (DecoderConfig, DecoderLM), "llama": (DecoderConfig, DecoderLM),
           "dflash_mhc": (MHCConfig, MHCDecoderLM)}


def _read_json(path, error):
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object.")
    return data


def read_config(directory):
    """(path of config.json, its dict); CheckpointError when the directory or file is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist.")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; a checkpoint directory needs a config.json.")
    return path, _read_json(path, ConfigError)


def _tensor_files(directory):
    """{tensor name: safetensors file} from model.safetensors or model.safetensors.index.json."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object.")
        for shard in set(weight_map.values()):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index} points to shard {directory / shard}, which does not exist.")
        return {name: directory / shard for name, shard in weight_map.items()}
    if not single.is_file():
        raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json.")
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except SafetensorError as e:
        raise CheckpointError(f"{single} is corrupt or truncated ({e}).") from None


def _read_tensors(files, expected, optional, keep_in_fp32, dtype, device):
    """Check names and shapes against `expected` (name -> meta tensor), then read and cast every tensor."""
    for name, file in files.items():
        if name not in expected:
            raise CheckpointError(f"{file} holds tensor {name}, which is not a parameter of this model.")
    for name in expected:
        if name not in files and name not in optional:
            raise CheckpointError(f"Tensor {name} is missing from {sorted({str(f) for f in files.values()})}.")
    tensors = {}
    for file in sorted(set(files.values())):
        names = [n for n, f in files.items() if f == file and n not in optional]
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    if name not in f.keys():
                        raise CheckpointError(f"{file} does not hold tensor {name} that its index lists.")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name].shape):
                        raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, "
                                              f"expected {list(expected[name].shape)}.")
                    t = f.get_tensor(name)
                    want = torch.float32 if any(k in name for k in keep_in_fp32) else dtype
                    tensors[name] = t.to(device=device, dtype=want if t.is_floating_point() and want else t.dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({e}).") from None
    return tensors


def _build(model_cls, config, directory, dtype, device):
    files = _tensor_files(directory)
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    keep = getattr(model_cls, "keep_in_fp32", ()) if dtype is not None else ()
    tensors = _read_tensors(files, expected, optional, keep, dtype, device or "cpu")
    for name in optional:
        tensors[name] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True)
    if optional:
        model.tie_weights()
    return model.eval().requires_grad_(False)


def load_target(directory, dtype=None, device=None):
    """A Qwen3 / Llama (`DecoderLM`) or mHC (`MHCDecoderLM`) target; dtype None keeps the stored dtypes."""
    path, cfg = read_config(directory)
    arch = cfg.get("architectures") or []
    if "dflash_config" in cfg or "DFlashDraftModel" in arch:
        raise ConfigError(f"{path} describes a DFlash draft; load it with load_draft.")
    if cfg.get("model_type") == "deepseek_v4" or "DeepseekV4ForCausalLM" in arch:
        raise ConfigError(f"{path} is a DeepSeek-V4 checkpoint, whose compressed/sparse attention and MoE this "
                          "reference model does not support (only the mHC parts are modelled, as 'dflash_mhc').")
    if cfg.get("model_type") not in TARGETS:
        raise ConfigError(f"{path} has architecture {arch or cfg.get('model_type')!r}; supported targets are "
                          f"model_type {', '.join(TARGETS)}.")
    config_cls, model_cls = TARGETS[cfg["model_type"]]
    return _build(model_cls, config_cls.from_hf(cfg, path), path.parent, dtype, device)


def load_draft(directory, dtype=None, device=None):
    """A z-lab DFlash draft (`DFlashDraft`); dtype None keeps the stored dtypes."""
    path, cfg = read_config(directory)
    arch = cfg.get("architectures") or []
    if "DFlash2DraftModel" in arch:
        raise ConfigError(f"{path} is a DFlash2 draft (dynamic convolutions, candidate selector), not supported.")
    if "dflash_config" not in cfg and "DFlashDraftModel" not in arch:
        raise ConfigError(f"{path} has architecture {arch or cfg.get('model_type')!r} and no dflash_config; "
                          "it is not a DFlash draft.")
    return _build(DFlashDraft, DFlashDraftConfig.from_hf(cfg, path), path.parent, dtype, device)
