"""z-lab DFlash draft (dflash 0.1.0 `DFlashDraftModel`) in plain PyTorch over its own static KV cache.

Each step writes the context k/v (from the fc + hidden_norm'ed target features) AND the block k/v into the cache at
their positions, then attends over the whole cache with a mask from index arithmetic. The block's slots are
harmless: the next step writes the committed tokens' context k/v over them, so rollback is "by position" and
needs no copy (positions past the last block position are masked out).
"""
import torch
import torch.nn.functional as F
from torch import nn

from torch_dflash.errors import InputError

from .layers import MLP, RMSNorm, apply_rope, init_attention, init_kv_cache, rope_cos_sin, write_kv


def draft_mask(block_positions, max_seq_len, is_causal, window, context_window=None):
    """[B, 1, b, max_seq] bool. Non-causal: every block query sees every key up to the last block position;
    causal: keys up to its own position; a window also keeps only keys with |q - kv| < window (z-lab).
    `context_window` W (SGLang's draft window) also hides the keys before the first block position minus W."""
    kv = torch.arange(max_seq_len, device=block_positions.device)[None, None, None, :]
    q = block_positions[:, None, :, None]
    visible = kv <= (q if is_causal else block_positions[:, None, -1:, None])
    if window is not None:
        visible = visible & (q - kv < window)
        if not is_causal:
            visible = visible & (kv - q < window)
    if context_window is not None:
        visible = visible & (kv >= block_positions[:, None, :1, None] - context_window)
    return visible


class DraftAttention(nn.Module):
    """q from the block only; k, v from [context ; block]; q/k RMSNorm per head; rope; GQA over the cache."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        init_attention(self, cfg, qk_norm=True)
        sliding = cfg.layer_type(layer_idx) == "sliding_attention"
        self.is_causal = sliding if cfg.is_causal is None else bool(cfg.is_causal)
        self.sliding_window = cfg.sliding_window if sliding else None
        self.context_window = None  # set through DFlashDraft.context_window

    def forward(self, x, ctx, cos, sin, positions):
        B, b, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, b, -1, self.head_dim))
        k = torch.cat([self.k_proj(ctx), self.k_proj(x)], dim=1).view(B, positions.shape[1], -1, self.head_dim)
        v = torch.cat([self.v_proj(ctx), self.v_proj(x)], dim=1).view(B, positions.shape[1], -1, self.head_dim)
        q, k = apply_rope(q, cos[:, -b:], sin[:, -b:]), apply_rope(self.k_norm(k), cos, sin)
        k, v = write_kv(self.k_cache, self.v_cache, k, v, positions)
        mask = draft_mask(positions[:, -b:], self.k_cache.shape[2], self.is_causal, self.sliding_window,
                          self.context_window)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, b, -1))


class DraftLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = DraftAttention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, positions):
        h = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """The draft: no embedding or lm_head of its own (`embed_block` / `compute_logits` use the target's)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.target_layer_ids = list(config.target_layer_ids)
        self.block_size, self.mask_token_id = config.block_size, config.mask_token_id
        self.layers = nn.ModuleList(DraftLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc = nn.Linear(len(self.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.max_seq_len = None

    @property
    def context_window(self):
        """SGLang's draft window: the block sees only the last `context_window` context tokens (None: all)."""
        return self.layers[0].self_attn.context_window

    @context_window.setter
    def context_window(self, window):
        for layer in self.layers:
            layer.self_attn.context_window = window

    def setup_cache(self, max_batch_size, max_seq_len, dtype=None, device=None):
        """Preallocate every layer's KV cache [max_batch_size, n_kv, max_seq_len, head_dim] (zeros)."""
        for layer in self.layers:
            init_kv_cache(layer.self_attn, self.config.num_key_value_heads, max_batch_size, max_seq_len,
                          dtype or self.fc.weight.dtype, device or self.fc.weight.device)
        self.max_seq_len = max_seq_len

    def forward(self, context_features, block_embeds, context_positions, block_positions):
        """context_features [B, C, k*H] (target features of the new context tokens), block_embeds [B, b, H],
        positions [B, C] / [B, b] -> hidden [B, b, H] after the final norm."""
        if self.max_seq_len is None:
            raise InputError("Call setup_cache(max_batch_size, max_seq_len) before running the draft.")
        ctx = self.hidden_norm(self.fc(context_features))
        positions = torch.cat([context_positions, block_positions], dim=1)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, block_embeds.dtype)
        h = block_embeds
        for layer in self.layers:
            h = layer(h, ctx, cos, sin, positions)
        return self.norm(h)

    def embed_block(self, ids, target):
        """z-lab's noise embedding: the target's raw embedding times `input_embedding_scale`."""
        h = target.embed(ids)
        return h if self.config.input_embedding_scale == 1.0 else h * self.config.input_embedding_scale

    def compute_logits(self, hidden, target):
        """The target's lm_head, then z-lab's `output_multiplier` and `final_logit_softcapping`."""
        logits = target.lm_head(hidden)
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap
