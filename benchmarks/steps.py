"""Step benchmark cases: the DFLASH draft step and the target's verify / AR steps at published shapes.

draft  — Qwen3-8B-DFlash-b16: 5 layers, H 4096, 32/8 heads, hd 128, inter 12288, bf16; 1024 context tokens
         already cached, 16 new context tokens + a 16-token block (design.md §9: eager 4.66 ms, inductor 2.40 ms,
         floor 0.70 ms). Timed: the draft forward to hidden states (as z-lab's anchor does; logits excluded).
verify — a Qwen3-8B-shape target (36 layers, vocab 151936) over a 16-token block after 1024 cached tokens
         (HF eager 35.3 ms, inductor 14.8 ms, floor 5.45 ms); ar — the same target, one token.
Variants: eager (our reference model), zlab (z-lab's DFlashDraftModel with its DynamicCache, draft only),
inductor (torch.compile), dflash (torch.compile backend="dflash"); each case once without and once with CUDA
graphs. Floors: weight bytes (+ KV bytes read) / copy bandwidth.
"""

import torch

from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig

from .case import Case

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6)
DRAFT_B16 = dict(num_hidden_layers=5, target_layer_ids=[1, 9, 17, 25, 33], block_size=16, mask_token_id=151669)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=1e6)
TINY_DRAFT = dict(num_hidden_layers=2, target_layer_ids=[1, 2], block_size=4, mask_token_id=255)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * p.shape[-1] ** -0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=p.device))
    return model.eval().requires_grad_(False)


def _build(cls, config, device, dtype, seed):
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return _randomize(model, seed)


def _weight_bytes(module: torch.nn.Module, skip=()) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if not n.startswith(skip))


def _variants(fn, with_zlab=None):
    variants = {"eager": fn, "inductor": torch.compile(fn), "dflash": torch.compile(fn, backend="dflash")}
    if with_zlab:
        variants["zlab"] = with_zlab
    return variants


def _check_against_eager(variants, tol):
    """dflash (and z-lab) agree with our eager model on the same inputs and cache state: ‖got − eager‖ / ‖eager‖
    ≤ max(tol, 2 × inductor's own distance) — in bf16 every implementation rounds differently, and deep random
    models amplify it, so Inductor's distance on the same step is the yardstick. Distances go in the notes."""
    def relative(name, want):
        return ((variants[name]().float() - want).norm() / want.norm()).item()

    def check():
        want = variants["eager"]().float()
        distances = {name: relative(name, want) for name in ("inductor", "dflash", "zlab") if name in variants}
        bound = max(tol, 2 * distances["inductor"])
        bad = {n: d for n, d in distances.items() if n != "inductor" and d > bound}
        assert not bad, f"differ from eager beyond {bound:.1e}: {bad}"
        return "relative distance to eager: " + ", ".join(f"{n} {d:.1e}" for n, d in distances.items())
    return check


def _zlab_draft(draft: DFlashDraft, cfg: dict, prefill: tuple, device, dtype):
    """z-lab's DFlashDraftModel on the same weights, its DynamicCache prefilled with the same context as ours."""
    from dflash.model import DFlashDraftModel, _crop_to, _make_cache
    from transformers import Qwen3Config

    hf_cfg = Qwen3Config(**{k: cfg[k] for k in QWEN3_8B if k in cfg}, num_target_layers=cfg["num_target_layers"],
                         dflash_config={k: cfg[k] for k in ("block_size", "mask_token_id", "target_layer_ids")})
    hf_cfg.num_hidden_layers = cfg["num_hidden_layers"]
    with torch.device(device):
        zlab = DFlashDraftModel(hf_cfg).to(dtype)
    zlab.load_state_dict(draft.state_dict(), assign=True)  # shares our draft's weight tensors
    zlab.eval()
    cache = _make_cache(zlab.config)
    features, block = prefill
    with torch.no_grad():
        zlab(target_hidden=features, noise_embedding=block, past_key_values=cache, use_cache=True,
             position_ids=torch.arange(features.shape[1] + block.shape[1], device=device)[None])
        _crop_to(cache, features.shape[1])
    return zlab, cache, _crop_to


def draft_cases(device="cuda", small=False) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target_cfg, draft_extra = (TINY, TINY_DRAFT) if small else (QWEN3_8B, DRAFT_B16)
    ctx_cached, new_ctx = (8, 4) if small else (1024, 16)
    cfg = {**{k: v for k, v in target_cfg.items() if k != "vocab_size"}, **draft_extra,
           "num_target_layers": target_cfg["num_hidden_layers"]}
    draft = _build(DFlashDraft, DFlashDraftConfig(**{k: v for k, v in cfg.items()
                                                     if k in DFlashDraftConfig.__dataclass_fields__}),
                   device, dtype, seed=1)
    b = cfg["block_size"]
    draft.setup_cache(1, ctx_cached + new_ctx + b + 1)
    H, k = cfg["hidden_size"], len(cfg["target_layer_ids"])
    features = torch.randn(1, new_ctx, k * H, device=device, dtype=dtype)
    block = torch.randn(1, b, H, device=device, dtype=dtype)
    ctx_pos = ctx_cached + torch.arange(new_ctx, device=device)[None]
    block_pos = ctx_cached + new_ctx + torch.arange(b, device=device)[None]

    def step():
        return draft(features, block, ctx_pos, block_pos)

    prefill = (torch.randn(1, ctx_cached, k * H, device=device, dtype=dtype), block[:, :1])
    with torch.no_grad():  # the same cached context for both: ours in its static cache, z-lab's DynamicCache
        draft(prefill[0], prefill[1], torch.arange(ctx_cached, device=device)[None],
              torch.tensor([[ctx_cached]], device=device))
    zlab, cache, crop = _zlab_draft(draft, cfg, prefill, device, dtype)
    positions = torch.arange(ctx_cached + new_ctx + b, device=device)[None]

    def zlab_step():
        out = zlab(target_hidden=features, noise_embedding=block, position_ids=positions[:, ctx_cached:],
                   past_key_values=cache, use_cache=True)
        crop(cache, ctx_cached)
        return out

    kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * (
        ctx_cached + new_ctx + b) * torch.finfo(dtype).bits // 8
    floor = _weight_bytes(draft) + kv_bytes
    name = f"draft step (ctx {ctx_cached}, {new_ctx}+{b} tokens)"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    variants = _variants(_no_grad(step), _no_grad(zlab_step))
    graphable = {k: v for k, v in variants.items() if k != "zlab"}
    return [Case("steps", name, variants, _check_against_eager(variants, tol), floor_bytes=floor),
            Case("steps", name + " +CUDA graph", graphable, _check_against_eager(graphable, tol), floor_bytes=floor,
                 use_cuda_graph=True, notes="the same compiled variants, replayed as CUDA graphs")]


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def target_cases(device="cuda", small=False) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = TINY if small else QWEN3_8B
    ctx_cached = 8 if small else 1024
    block = 4 if small else 16
    target = _build(DecoderLM, DecoderConfig(**cfg), device, dtype, seed=2)
    target.setup_cache(1, ctx_cached + block + 1)
    cases = []
    for name, tokens in (("verify", block), ("ar", 1)):
        ids = torch.randint(0, cfg["vocab_size"], (1, tokens), device=device)
        pos = ctx_cached + torch.arange(tokens, device=device)[None]

        def step(ids=ids, pos=pos):
            return target(ids, positions=pos).logits

        kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * (
            ctx_cached + tokens) * torch.finfo(dtype).bits // 8
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        variants, title = _variants(_no_grad(step)), f"target {name} step ({tokens} tokens, ctx {ctx_cached})"
        floor = _weight_bytes(target) + kv_bytes
        check = _check_against_eager(variants, tol)
        cases += [Case("steps", title, variants, check, floor_bytes=floor),
                  Case("steps", title + " +CUDA graph", variants, check, floor_bytes=floor, use_cuda_graph=True,
                       notes="the same compiled variants, replayed as CUDA graphs")]
    return cases


def cases(device="cuda", small=False) -> list[Case]:
    return draft_cases(device, small) + target_cases(device, small)
