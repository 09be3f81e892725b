"""Reference models in plain PyTorch (no device branches) and their checkpoint loading."""
from .config import DecoderConfig, DFlashDraftConfig, MHCConfig, build_target_layer_ids
from .decoder import DecoderLM
from .draft import DFlashDraft
from .layers import LMOutput
from .loading import load_draft, load_target
from .mhc import MHCDecoderLM, hc_head, hc_post, hc_pre

__all__ = [
    "DecoderConfig", "DFlashDraftConfig", "MHCConfig", "build_target_layer_ids",
    "DecoderLM", "DFlashDraft", "MHCDecoderLM", "LMOutput",
    "hc_pre", "hc_post", "hc_head",
    "load_target", "load_draft",
]
