"""Step benchmark cases on OUR draft model, and the step models shared with steps_backend.py and e2e.py.

draft  — our DFlashDraft at the Qwen3-8B-DFlash-b16 shape: 5 layers, H 4096, 32/8 heads, hd 128, inter 12288,
         bf16; 1024 context tokens already cached, 16 new context tokens + a 16-token block (design.md §9: z-lab
         eager 4.66 ms, inductor 2.40 ms, floor 0.70 ms). Timed: the draft forward to hidden states (as z-lab's
         anchor does; logits excluded). steps_backend.py times z-lab's draft on the same weights and context.
Variants: eager, inductor (torch.compile), dflash (torch.compile backend="dflash"), both with static shapes;
each case once without and once with CUDA graphs, the second reusing the first's compiled modules (each variant
compiles once). Floors: weight bytes + KV bytes read / copy bandwidth. Caches hold a real prefill of random
context, not zeros.

The target's verify and AR steps are timed on transformers' Qwen3ForCausalLM (steps_backend.py: eager, inductor,
dflash) and through our runtime (e2e.py); compiling our own 36-layer target a third time would only repeat them.
`shared_draft` and `shared_target` build the big models once per run (random bf16 weights made directly in bf16
on the device) for every case that reads them; `release()` drops them when the suite is done.
"""

import functools
from dataclasses import dataclass

import torch

from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig

from .case import Case

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6)
DRAFT_B16 = dict(num_hidden_layers=5, target_layer_ids=[1, 9, 17, 25, 33], block_size=16, mask_token_id=151669)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=1e6)
TINY_DRAFT = dict(num_hidden_layers=2, target_layer_ids=[1, 2], block_size=4, mask_token_id=255)
GRAPH_NOTE = "the same compiled variants, replayed as CUDA graphs"


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
        model = cls(config).to(dtype)
    model = model.to_empty(device=device)  # allocated once, in dtype (no fp32 copy of 8B parameters first)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return _randomize(model, seed)


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def kv_bytes(cfg: dict, tokens: int, dtype: torch.dtype) -> int:
    """K and V of every layer for `tokens` positions."""
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * tokens * dtype.itemsize


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def compile_backends(model: torch.nn.Module, small: bool) -> dict:
    """The module as is ("eager") and compiled as a user would, with static shapes: "inductor" and "dflash". Each
    compiles on its first call per input shape (the check's); every case of that shape reuses it. A smoke run
    (`small`, CPU) skips Inductor's code generation, the slow part on a CPU: "inductor" runs as aot_eager and
    "dflash" as our passes and lowering without Inductor (the smoke table says so)."""
    if small:
        return {"eager": model, "inductor": torch.compile(model, backend="aot_eager", dynamic=False),
                "dflash": torch.compile(model, backend="dflash", dynamic=False, options={"inductor": False})}
    return {"eager": model, "inductor": torch.compile(model, dynamic=False),
            "dflash": torch.compile(model, backend="dflash", dynamic=False)}


def step_variants(models: dict, step) -> dict:
    """One timed callable per backend: `step(module)` under no_grad."""
    return {name: no_grad(functools.partial(step, module)) for name, module in models.items()}


def check_against_eager(variants: dict, tol: float, peers: dict | None = None):
    """Every variant, and each untimed peer (e.g. our model beside z-lab's), agrees with variants["eager"] on the
    same inputs and cache state: ‖got − eager‖ / ‖eager‖ ≤ max(tol, 2 × inductor's own distance) — in bf16 every
    implementation rounds differently, and deep random models amplify it, so Inductor's distance on the same step
    is the yardstick. Distances go in the notes."""
    others = {**{name: fn for name, fn in variants.items() if name != "eager"}, **(peers or {})}

    def check():
        want = variants["eager"]().float()
        distances = {name: ((fn().float() - want).norm() / want.norm()).item() for name, fn in others.items()}
        bound = max(tol, 2 * distances.get("inductor", 0.0))
        bad = {name: d for name, d in distances.items() if name != "inductor" and d > bound}
        assert not bad, f"differ from eager beyond {bound:.1e}: {bad}"
        return "relative distance to eager: " + ", ".join(f"{n} {d:.1e}" for n, d in distances.items())
    return check


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def with_and_without_graphs(name: str, variants: dict, check, floor: int, notes: str = "") -> list[Case]:
    """The step timed as plain launches, then the same callables replayed as CUDA graphs (a follow-up: nothing
    left to compile, so a spent budget does not drop it)."""
    return [Case("steps", name, variants, check, floor_bytes=floor, notes=notes),
            Case("steps", name + " +CUDA graph", variants, check, floor_bytes=floor, use_cuda_graph=True,
                 notes=f"{notes}; {GRAPH_NOTE}" if notes else GRAPH_NOTE, follow_up=True)]


@dataclass
class DraftSetup:
    """Our draft with `ctx_cached` context tokens in its static cache, and one step's inputs."""
    model: DFlashDraft
    cfg: dict                       # the draft's config fields + the target shape it reads
    features: torch.Tensor          # [1, new_ctx, k·H] target features of the new context tokens
    block: torch.Tensor             # [1, b, H] block embeddings
    context_positions: torch.Tensor
    block_positions: torch.Tensor
    prefill: tuple                  # (features [1, ctx_cached, k·H], block [1, 1, H]): the cached context
    ctx_cached: int

    def step(self, model=None):
        model = self.model if model is None else model
        return model(self.features, self.block, self.context_positions, self.block_positions)


@functools.cache
def shared_draft(device: str, small: bool) -> DraftSetup:
    dtype = _dtype(device)
    target_cfg, draft_extra = (TINY, TINY_DRAFT) if small else (QWEN3_8B, DRAFT_B16)
    ctx_cached, new_ctx = (8, 4) if small else (1024, 16)
    cfg = {**{k: v for k, v in target_cfg.items() if k != "vocab_size"}, **draft_extra,
           "num_target_layers": target_cfg["num_hidden_layers"]}
    draft = _build(DFlashDraft, DFlashDraftConfig(**{k: v for k, v in cfg.items()
                                                     if k in DFlashDraftConfig.__dataclass_fields__}),
                   device, dtype, seed=1)
    b, H, k = cfg["block_size"], cfg["hidden_size"], len(cfg["target_layer_ids"])
    draft.setup_cache(1, ctx_cached + new_ctx + b + 1)
    features = torch.randn(1, new_ctx, k * H, device=device, dtype=dtype)
    block = torch.randn(1, b, H, device=device, dtype=dtype)
    prefill = (torch.randn(1, ctx_cached, k * H, device=device, dtype=dtype), block[:, :1])
    with torch.no_grad():
        draft(prefill[0], prefill[1], torch.arange(ctx_cached, device=device)[None],
              torch.tensor([[ctx_cached]], device=device))
    return DraftSetup(draft, cfg, features, block, ctx_cached + torch.arange(new_ctx, device=device)[None],
                      ctx_cached + new_ctx + torch.arange(b, device=device)[None], prefill, ctx_cached)


@dataclass
class TargetSetup:
    """Our target with `ctx_cached` prefilled tokens (`prefill_ids`) in its static cache, and the new tokens and
    positions of its steps: inputs["verify"] (a block), inputs["ar"] (one token)."""
    model: DecoderLM
    cfg: dict
    prefill_ids: torch.Tensor       # [1, ctx_cached]
    ctx_cached: int
    inputs: dict                    # kind -> (ids [1, S], positions [1, S])

    def step(self, model, kind):
        ids, positions = self.inputs[kind]
        return model(ids, positions=positions).logits


@functools.cache
def shared_target(device: str, small: bool) -> TargetSetup:
    cfg, ctx_cached, block = (TINY, 8, 4) if small else (QWEN3_8B, 1024, 16)
    target = _build(DecoderLM, DecoderConfig(**cfg), device, _dtype(device), seed=2)
    target.setup_cache(1, ctx_cached + block + 1)
    ids = torch.randint(0, cfg["vocab_size"], (1, ctx_cached + block), device=device)
    with torch.no_grad():
        target(ids[:, :ctx_cached], positions=torch.arange(ctx_cached, device=device)[None],
               logits_indices=torch.tensor([ctx_cached - 1], device=device))
    positions = ctx_cached + torch.arange(block, device=device)[None]
    inputs = {"verify": (ids[:, ctx_cached:], positions), "ar": (ids[:, ctx_cached:ctx_cached + 1], positions[:, :1])}
    return TargetSetup(target, cfg, ids[:, :ctx_cached], ctx_cached, inputs)


def release() -> None:
    """Drop the shared models (called when the steps suite is done)."""
    shared_draft.cache_clear()
    shared_target.cache_clear()


def draft_cases(device="cuda", small=False) -> list[Case]:
    setup = shared_draft(device, small)
    cfg, ctx, dtype = setup.cfg, setup.ctx_cached, setup.features.dtype
    new_ctx, b = setup.features.shape[1], setup.block.shape[1]
    variants = step_variants(compile_backends(setup.model, small), setup.step)
    floor = weight_bytes(setup.model) + kv_bytes(cfg, ctx + new_ctx + b, dtype)
    return with_and_without_graphs(f"draft step (ctx {ctx}, {new_ctx}+{b} tokens)", variants,
                                   check_against_eager(variants, tolerance(dtype)), floor)
