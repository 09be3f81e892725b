"""Shared test set-up. Keep fixtures here small; a test file's own helpers live in that file."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is present. Triton reads this when a
# kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()

# The backend's compile cache goes to a fresh directory per test session, never the user's ~/.cache (tests that
# exercise the cache set their own TORCH_DFLASH_CACHE_DIR).
if "TORCH_DFLASH_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCH_DFLASH_CACHE_DIR"] = tempfile.mkdtemp(prefix="torch_dflash_cache_")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm device; run `pytest -m gpu` on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- tiny random checkpoints (models/) ----------------------------------------------------------------------------
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _randomize(module, std=0.1, seed=0):
    """Random weights for every parameter (post_init leaves zeros/ones): vectors around 1, matrices around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))
    return module.eval()


@pytest.fixture(scope="session")
def randomize():
    return _randomize


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A 4-layer Qwen3ForCausalLM saved with save_pretrained (vocab 128, hidden 64, 4/2 heads of 16)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("qwen3")
    _randomize(Qwen3ForCausalLM(Qwen3Config(**TINY))).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory):
    """A 2-layer z-lab DFlashDraftModel for tiny_qwen3_dir: target_layer_ids [1, 2], block 4, mask token 127."""
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config

    cfg = Qwen3Config(**{**TINY, "num_hidden_layers": 2}, num_target_layers=4,
                      dflash_config={"block_size": 4, "mask_token_id": 127, "target_layer_ids": [1, 2]})
    path = tmp_path_factory.mktemp("draft")
    _randomize(DFlashDraftModel(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mhc_dir(tmp_path_factory):
    """A 2-layer mHC target (model_type dflash_mhc, hc_mult 4) with random weights, saved with save_file."""
    import json

    from safetensors.torch import save_file

    from torch_dflash.models import MHCConfig, MHCDecoderLM

    fields = {**TINY, "num_hidden_layers": 2, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6}
    path = tmp_path_factory.mktemp("mhc")
    model = _randomize(MHCDecoderLM(MHCConfig(**fields)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    config = {"model_type": "dflash_mhc", "architectures": ["DFlashMHCForCausalLM"], "rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **fields}
    (path / "config.json").write_text(json.dumps(config))
    return path
