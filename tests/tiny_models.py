"""Tiny random models the pass tests and the backend tests share (imported as `tiny_models`: tests/ is on the
path through its conftest). Each builder seeds torch itself, so a model is the same wherever it is built."""

import torch

from torch_dflash.models import MHCConfig, MHCDecoderLM

# transformers Qwen3 / Llama: 2 layers, hidden 64, 4/2 heads of 16
TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)


def hf_causal_lm(kind: str, **extra):
    """transformers Qwen3ForCausalLM ("qwen3") or LlamaForCausalLM ("llama") of TINY_HF (+ extra config)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    return model_cls(config_cls(**{**TINY_HF, **extra})).eval()


def deepseek_v4(layers=2, iters=3, mlp="moe"):
    """transformers DeepseekV4ForCausalLM (mHC, n = 4 streams; heavily-compressed attention; `mlp` "moe" routes
    top-k by the activations, "hash_moe" by the token id) with every hyper-connection weight made to matter."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                           n_routed_experts=4, num_experts_per_tok=2, o_groups=2, o_lora_rank=32, index_n_heads=2,
                           index_head_dim=16, index_topk=4, hc_mult=4, hc_sinkhorn_iters=iters, sliding_window=8,
                           layer_types=["heavily_compressed_attention"] * layers, mlp_layer_types=[mlp] * layers)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():  # post_init leaves base = 0 and scale = 1: make every mixing weight matter
        for name, p in model.named_parameters():
            if "_hc." in name or "hc_head" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def mhc_decoder_lm(layers, iters, n=4):
    """Our models/mhc.py target (n streams, `iters` Sinkhorn steps), random weights, a static cache of 2 × 32."""
    cfg = MHCConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, hc_mult=n, hc_sinkhorn_iters=iters)
    torch.manual_seed(0)
    model = MHCDecoderLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.setup_cache(2, 32)
    return model.eval()


def mhc_inputs(batch, seq):
    return {"input_ids": torch.randint(0, 128, (batch, seq)), "positions": torch.arange(seq).expand(batch, seq)}


def zlab_draft(layers: int, head_dim: int = 16):
    """z-lab dflash.model.DFlashDraftModel: hidden 4·head_dim (64), 4/2 heads of head_dim, reads 2 target layers
    (features 2·hidden), block 4, SDPA attention."""
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=128,
                         max_position_embeddings=256)
    config.num_target_layers = 4
    config.dflash_config = {"block_size": 4, "mask_token_id": 0, "target_layer_ids": [1, 2]}
    config._attn_implementation = "sdpa"
    return DFlashDraftModel(config).eval()


def zlab_step(ctx: int, block: int = 4, batch: int = 2, start: int = 0, hidden: int = 64) -> dict:
    """DFlashDraftModel.forward kwargs: `ctx` new context features, then the block, at positions start…"""
    return dict(position_ids=(start + torch.arange(ctx + block)).expand(batch, -1),
                noise_embedding=torch.randn(batch, block, hidden), target_hidden=torch.randn(batch, ctx, 2 * hidden))


def run_with_random_caches(step, args):
    """`step` on args from KV caches filled with the same random values → (its outputs as a tuple, {cache name:
    the written cache}): two programs of one step compare outputs and cache writes alike."""
    caches = {name: buf for name, buf in step.named_buffers() if name.endswith(("k_cache", "v_cache"))}
    torch.manual_seed(1)
    with torch.no_grad():
        for name in sorted(caches):
            caches[name].copy_(torch.randn_like(caches[name]))
        out = step(*args)
    return out if isinstance(out, tuple) else (out,), {name: buf.clone() for name, buf in caches.items()}

