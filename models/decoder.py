"""Qwen3 / Llama decoder target in plain PyTorch, parameter names = transformers' (state dicts map 1:1)."""
from torch import nn

from .layers import MLP, Attention, LMOutput, RMSNorm, StaticCacheLM


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache_positions, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_positions, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(StaticCacheLM):
    """Qwen3ForCausalLM / LlamaForCausalLM over a static KV cache (call `setup_cache` first)."""

    def __init__(self, config):
        super().__init__(config, DecoderModel(config))

    def forward(self, input_ids=None, *, inputs_embeds=None, positions, cache_positions=None,
                logits_indices=None, return_features=False):
        """S new tokens of each sequence at `positions` [B, S] (rope), written to the KV cache at `cache_positions`
        (default `positions`); each sees the cache up to its own position. Returns LMOutput(logits [B, L or S, V],
        features [B, S, k*H] = outputs of layers `feature_layer_ids`, exactly HF hidden_states[id + 1], or None)."""
        h, cos, sin, cache_positions, mask = self._inputs(input_ids, inputs_embeds, positions, cache_positions)
        outputs = {}
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, cache_positions, mask)
            outputs[i] = h
        h = self.model.norm(h)
        outputs[len(self.model.layers) - 1] = h  # as transformers: hidden_states[-1] is after the final norm
        features = self._features(outputs) if return_features else None
        return LMOutput(self.lm_head(self._select(h, logits_indices)), features)
