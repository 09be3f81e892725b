"""Blocks shared by the reference models: RMSNorm, neox rope, SwiGLU MLP, static-KV-cache attention.

KV caches are buffers [max_batch, n_kv, max_seq, head_dim] (SDPA layout) written in place at explicit
per-sequence cache positions, so a step is shape-stable (torch.export sees a buffer mutation; CUDA graphs replay).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from torch_dflash.errors import InputError


class RMSNorm(nn.Module):
    """HF Llama/Qwen3 RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden, inter, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions, rot_dim, theta, dtype):
    """cos, sin [B, S, rot_dim] for positions [B, S], computed in fp32 like transformers, cast to `dtype`."""
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.float, device=positions.device) / rot_dim
    freqs = positions[..., None].float() * (1.0 / theta**exponent)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Neox (rotate-half) rope of x [B, S, heads, head_dim] on its first cos.shape[-1] channels."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def write_kv(k_cache, v_cache, k, v, cache_positions):
    """Write k, v [B, S, n_kv, hd] into the caches at cache_positions [B, S]; return the caches' first B rows."""
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, :, cache_positions] = k
    v_cache[rows, :, cache_positions] = v
    return k_cache[: k.shape[0]], v_cache[: k.shape[0]]


def causal_mask(cache_positions, max_seq_len):
    """[B, 1, S, max_seq] bool: a query at cache position p sees the keys at positions 0..p."""
    kv = torch.arange(max_seq_len, device=cache_positions.device)
    return kv[None, None, None, :] <= cache_positions[:, None, :, None]


def init_attention(module, cfg, qk_norm, norm=RMSNorm):
    """The projections (transformers' names), optional per-head q/k norms and empty cache slots of an attention."""
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    module.head_dim, module.scale = hd, hd**-0.5
    module.q_proj = nn.Linear(cfg.hidden_size, nq * hd, bias=cfg.attention_bias)
    module.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
    module.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
    module.o_proj = nn.Linear(nq * hd, cfg.hidden_size, bias=cfg.attention_bias)
    module.q_norm = norm(hd, cfg.rms_norm_eps) if qk_norm else nn.Identity()
    module.k_norm = norm(hd, cfg.rms_norm_eps) if qk_norm else nn.Identity()
    module.register_buffer("k_cache", None, persistent=False)
    module.register_buffer("v_cache", None, persistent=False)


class Attention(nn.Module):
    """GQA self-attention over a static KV cache; optional per-head q/k RMSNorm (Qwen3) and projection biases."""

    def __init__(self, cfg, norm=RMSNorm):
        super().__init__()
        init_attention(self, cfg, cfg.qk_norm, norm)

    def forward(self, x, cos, sin, cache_positions, mask):
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, S, -1, self.head_dim))
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = write_kv(self.k_cache, self.v_cache, k, v, cache_positions)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


def init_kv_cache(attn, n_kv, max_batch_size, max_seq_len, dtype, device):
    """(Re)allocate attn.k_cache / attn.v_cache as zeroed non-persistent buffers."""
    shape = (max_batch_size, n_kv, max_seq_len, attn.head_dim)
    attn.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
    attn.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class LMOutput(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor | None


class StaticCacheLM(nn.Module):
    """What the targets share: `model` (HF layout), `lm_head` (tied or not), `feature_layer_ids`, the static cache."""

    def __init__(self, config, model):
        super().__init__()
        self.config, self.model = config, model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.feature_layer_ids = list(config.feature_layer_ids)
        self.max_seq_len = None
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def setup_cache(self, max_batch_size, max_seq_len, dtype=None, device=None):
        """Preallocate every layer's KV cache [max_batch_size, n_kv, max_seq_len, head_dim] (zeros)."""
        weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            init_kv_cache(layer.self_attn, self.config.num_key_value_heads, max_batch_size, max_seq_len,
                          dtype or weight.dtype, device or weight.device)
        self.max_seq_len = max_seq_len

    def _inputs(self, input_ids, inputs_embeds, positions, cache_positions):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("Pass exactly one of input_ids and inputs_embeds.")
        if self.max_seq_len is None:
            raise InputError("Call setup_cache(max_batch_size, max_seq_len) before running the model.")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cache_positions = positions if cache_positions is None else cache_positions
        cos, sin = rope_cos_sin(positions, self.config.rot_dim, self.config.rope_theta, h.dtype)
        return h, cos, sin, cache_positions, causal_mask(cache_positions, self.max_seq_len)

    def _features(self, outputs):
        if not self.feature_layer_ids:
            raise InputError("return_features=True needs model.feature_layer_ids to be set.")
        return torch.cat([outputs[i] for i in self.feature_layer_ids], dim=-1)

    @staticmethod
    def _select(h, logits_indices):
        """Rows of h [B, S, ...] at logits_indices ([L] for every sequence, or [B, L]); all rows when None."""
        if logits_indices is None:
            return h
        return h[torch.arange(h.shape[0], device=h.device)[:, None], logits_indices]
