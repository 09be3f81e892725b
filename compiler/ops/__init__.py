"""The op library: `torch.ops.dflash.*`, each with a schema, a reference in plain torch, a fake
implementation for symbolic shapes, and provider slots per target (see compiler/providers.py)."""

from . import attention, embedding, linear, mhc, mlp, norm_rope, projections, rope_tables
from .attention import attention_reference
from .embedding import embedding_rms_norm_reference
from .linear import (add_rms_norm_linear_silu_mul_reference, linear_add_norm_stats_reference, linear_reference,
                     linear_silu_mul_reference)
from .mhc import mhc_post_pre_reference, mhc_post_reference, mhc_pre_reference
from .mlp import silu_mul_reference
from .norm_rope import add_rms_norm_reference, rms_norm_reference, rope_reference, rotate_half
from .projections import (context_qkv_norm_rope_cache_reference, kv_materialize_cache_reference,
                          kv_materialize_reference, qkv_norm_rope_cache_reference, qkv_norm_rope_reference)
from .rope_tables import joined_rope_cos_sin_reference, rope_cos_sin_reference

REFERENCES = {
    "rms_norm": rms_norm_reference,
    "add_rms_norm": add_rms_norm_reference,
    "embedding_rms_norm": embedding_rms_norm_reference,
    "silu_mul": silu_mul_reference,
    "rope": rope_reference,
    "rope_cos_sin": rope_cos_sin_reference,
    "joined_rope_cos_sin": joined_rope_cos_sin_reference,
    "qkv_norm_rope": qkv_norm_rope_reference,
    "qkv_norm_rope_cache": qkv_norm_rope_cache_reference,
    "kv_materialize": kv_materialize_reference,
    "kv_materialize_cache": kv_materialize_cache_reference,
    "context_qkv_norm_rope_cache": context_qkv_norm_rope_cache_reference,
    "mhc_pre": mhc_pre_reference,
    "mhc_post": mhc_post_reference,
    "mhc_post_pre": mhc_post_pre_reference,
    "attention": attention_reference,
    "linear": linear_reference,
    "linear_silu_mul": linear_silu_mul_reference,
    "add_rms_norm_linear_silu_mul": add_rms_norm_linear_silu_mul_reference,
    "linear_add_norm_stats": linear_add_norm_stats_reference,
}
OP_NAMES = tuple(REFERENCES)

__all__ = ["OP_NAMES", "REFERENCES", "rotate_half", *(f"{name}_reference" for name in REFERENCES)]
