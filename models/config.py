"""Configs of the reference models, read from a Hugging Face style config.json dict.

`where` (the file a dict came from) is only used in error messages.
"""
from dataclasses import dataclass

from torch_dflash.errors import ConfigError

_MISSING = object()


def _field(d, key, where, default=_MISSING):
    value = d.get(key, default)
    if value is _MISSING or (value is None and default is _MISSING):
        raise ConfigError(f"{where} is missing the required field '{key}'.")
    return value


def _rope(d, where):
    """(rope_theta, partial_rotary_factor) from `rope_parameters` / `rope_scaling` (transformers 5) or the top level."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where} has per-layer-type rope_parameters, which the reference models do not support.")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{where} uses rope type '{kind}'; only the default (unscaled) rope is supported.")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta), float(params.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0))


def build_target_layer_ids(num_target_layers, num_draft_layers):
    """z-lab's default target layers: one layer -> [T // 2]; else round(1 + i * (T - 4) / (N - 1))."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass
class DecoderConfig:
    """A Qwen3 (`qk_norm`) or Llama decoder; also the base of `MHCConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "qwen3"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    qk_norm: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    feature_layer_ids: tuple = ()

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}.")
        if self.rot_dim % 2 or not 0 < self.rot_dim <= self.head_dim:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dim {self.rot_dim}; "
                              f"it must be even and in (0, head_dim={self.head_dim}].")

    @property
    def rot_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def _hf_fields(cls, d, where):
        model_type = d.get("model_type", "")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where} uses hidden_act '{d['hidden_act']}'; only silu (SwiGLU) is supported.")
        if d.get("sliding_window") and "sliding_attention" in (d.get("layer_types") or ()):
            raise ConfigError(f"{where} has sliding-window layers, which the reference target does not support.")
        hidden, heads = _field(d, "hidden_size", where), _field(d, "num_attention_heads", where)
        theta, partial = _rope(d, where)
        return dict(
            model_type=model_type,
            vocab_size=_field(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_field(d, "intermediate_size", where),
            num_hidden_layers=_field(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            # transformers' Qwen3Config defaults head_dim to 128, LlamaConfig to hidden // heads.
            head_dim=d.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            partial_rotary_factor=partial,
            qk_norm=bool(d.get("qk_norm", model_type != "llama")),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_hf(cls, d, where="config.json"):
        return cls(**cls._hf_fields(d, where))


@dataclass
class MHCConfig(DecoderConfig):
    """`DecoderConfig` plus DeepSeek-V4 manifold-constrained hyper-connections (`hc_mult` residual streams)."""

    model_type: str = "dflash_mhc"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6

    @classmethod
    def _hf_fields(cls, d, where):
        return dict(super()._hf_fields(d, where), hc_mult=_field(d, "hc_mult", where),
                    hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20), hc_eps=d.get("hc_eps", 1e-6))


@dataclass
class DFlashDraftConfig:
    """z-lab DFlash draft (a Qwen3Config with `num_target_layers` and `dflash_config`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    target_layer_ids: tuple
    mask_token_id: int
    block_size: int = 16
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    layer_types: tuple | None = None      # None: all "full_attention"
    sliding_window: int | None = None     # applies to "sliding_attention" layers only
    is_causal: bool | None = None         # None: causal exactly on sliding layers (z-lab)
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    input_embedding_scale: float = 1.0

    def layer_type(self, i):
        return self.layer_types[i] if self.layer_types else "full_attention"

    @classmethod
    def from_hf(cls, d, where="config.json"):
        dflash = d.get("dflash_config") or {}

        def value(key, default=_MISSING):  # z-lab `_draft_value`: dflash_config first, then the top level
            return _field(dflash, key, where, default) if key in dflash else _field(d, key, where, default)

        layers, heads = _field(d, "num_hidden_layers", where), _field(d, "num_attention_heads", where)
        num_target_layers = d.get("num_target_layers")
        ids = value("target_layer_ids", None)
        if ids is None:
            ids = build_target_layer_ids(_field(d, "num_target_layers", where), layers)
        theta, _ = _rope(d, where)  # z-lab's draft (Qwen3RotaryEmbedding) rotates the whole head
        softcap = value("final_logit_softcapping", None)
        return cls(
            hidden_size=_field(d, "hidden_size", where),
            intermediate_size=_field(d, "intermediate_size", where),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or 128,  # transformers' Qwen3Config default
            target_layer_ids=tuple(ids),
            mask_token_id=int(value("mask_token_id")),
            block_size=int(value("block_size", 16)),
            num_target_layers=num_target_layers,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            attention_bias=bool(d.get("attention_bias", False)),
            layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
            sliding_window=d.get("sliding_window"),
            is_causal=d.get("is_causal"),
            output_multiplier=float(value("output_multiplier", 1.0)),
            final_logit_softcapping=float(softcap) if softcap else None,
            input_embedding_scale=float(value("input_embedding_scale", 1.0)),
        )
