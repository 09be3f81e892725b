"""DeepSeek-V4-style mHC decoder target: the residual is `hc_mult` streams [B, S, n, D] mixed by
manifold-constrained hyper-connections around every sublayer (transformers' DeepseekV4HyperConnection /
DeepseekV4DecoderLayer / DeepseekV4HyperHead). Attention is plain GQA with a static KV cache and the MLP is
dense SwiGLU: DeepSeek-V4's compressed/sparse attention and MoE are not modelled."""
import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, Attention, LMOutput, StaticCacheLM


def hc_pre(x, fn, base, scale, hc_mult, sinkhorn_iters, rms_eps, hc_eps):
    """x [B, S, n, D] -> post [B, S, n] fp32, comb [B, S, n, n] fp32 ([source, destination]), collapsed [B, S, D]."""
    n = hc_mult
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    mixes = F.linear(flat, fn.float())
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre_scale, post_scale, comb_scale = scale.unbind(0)
    comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
    pre = torch.sigmoid(pre_w * pre_scale + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * post_scale + post_b)
    comb = torch.softmax(comb_w * comb_scale + comb_b.view(n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    collapsed = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
    return post, comb, collapsed


def hc_post(out, x, post, comb):
    """Sublayer output [B, S, D] and residual streams x [B, S, n, D] -> new streams: post * out + comb^T @ x."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def hc_head(x, hc_fn, hc_base, hc_scale, rms_eps, hc_eps):
    """Final collapse of the streams x [B, S, n, D] -> [B, S, D]."""
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    pre = torch.sigmoid(F.linear(flat, hc_fn.float()) * hc_scale.float() + hc_base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


class HCRMSNorm(nn.Module):
    """DeepseekV4RMSNorm: statistics in fp32, the weight multiplied in fp32, one cast at the end."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(x.dtype)


class HyperConnection(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, self.cfg = cfg.hc_mult, cfg
        self.fn = nn.Parameter(torch.randn((2 + n) * n, n * cfg.hidden_size) * 0.02)
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        c = self.cfg
        return hc_pre(x, self.fn, self.base, self.scale, c.hc_mult, c.hc_sinkhorn_iters, c.rms_norm_eps, c.hc_eps)


class HyperHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n, self.cfg = cfg.hc_mult, cfg
        self.hc_fn = nn.Parameter(torch.randn(n, n * cfg.hidden_size) * 0.02)
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return hc_head(x, self.hc_fn, self.hc_base, self.hc_scale, self.cfg.rms_norm_eps, self.cfg.hc_eps)


class MHCDecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg, norm=HCRMSNorm)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = HCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = HCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, x, cos, sin, cache_positions, mask):
        post, comb, collapsed = self.attn_hc(x)
        x = hc_post(self.self_attn(self.input_layernorm(collapsed), cos, sin, cache_positions, mask), x, post, comb)
        post, comb, collapsed = self.ffn_hc(x)
        return hc_post(self.mlp(self.post_attention_layernorm(collapsed)), x, post, comb)


class MHCModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MHCDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = HCRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)


class MHCDecoderLM(StaticCacheLM):
    """mHC target over a static KV cache; same forward contract as `DecoderLM`."""

    # Like transformers' DeepSeek-V4: mHC parameters and norm weights stay fp32 whatever the load dtype.
    keep_in_fp32 = ("_hc.", "hc_head.", "norm.")

    def __init__(self, config):
        super().__init__(config, MHCModel(config))

    def forward(self, input_ids=None, *, inputs_embeds=None, positions, cache_positions=None,
                logits_indices=None, return_features=False):
        """As `DecoderLM.forward`; features are the feature layers' output streams flattened: [B, S, k*n*D]."""
        h, cos, sin, cache_positions, mask = self._inputs(input_ids, inputs_embeds, positions, cache_positions)
        x = h.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        outputs = {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache_positions, mask)
            outputs[i] = x.flatten(2)
        features = self._features(outputs) if return_features else None
        h = self.model.hc_head(self._select(x, logits_indices))
        return LMOutput(self.lm_head(self.model.norm(h)), features)
