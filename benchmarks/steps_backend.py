"""Step benchmark cases on other people's models under each backend (issue #5), on the weights of steps.py's
models (state dicts assigned: no copies, no second set of random weights):

zlab    — z-lab's `dflash.model.DFlashDraftModel` at the Qwen3-8B-DFlash-b16 shape (bf16, 1024 context tokens in
          its DynamicCache, 16 new context + 16 block tokens), called as `dflash_generate` calls it (anchors,
          design.md §9: eager 4.66 ms, inductor 2.40 ms, floor 0.70 ms).
verify  — transformers' `Qwen3ForCausalLM` at the Qwen3-8B shape with a StaticCache: a 16-token step after 1024
          cached tokens (anchors: eager 35.3 ms, inductor 14.8 ms, floor 5.45 ms); ar — the same, one token.
Variants: eager, torch.compile(backend="inductor"), torch.compile(backend="dflash"), static shapes; each case
without and with CUDA graphs. Graphs: the harness captures each variant's callable with torch.cuda.graph (eager
and both compiled modules alike; the backends' own cudagraph modes cannot capture eager). Each case is checked
against its eager model and against ours on the same weights and context ("ours" in the notes).

Before each call the step puts the cache back at the context, inside the timed (and captured) call: z-lab — each
layer's keys/values set back to the prefill's tensors (what `_crop_to` does after each draft call of
dflash_generate; a host-side assignment); transformers — each StaticCache layer's length reset to 1024 in place
(one `_foreach_copy_`), so every call, and every replay, writes the same positions.
"""

import functools

import torch

from .case import Case
from .steps import (QWEN3_8B, DraftSetup, TargetSetup, check_against_eager, compile_backends, kv_bytes, no_grad,
                    shared_draft, shared_target, step_variants, tolerance, weight_bytes, with_and_without_graphs)
from .steps import release  # noqa: F401 — run.py calls it after the suite: drops the shared models


def _on_meta_with_weights(build, weights: dict, device):
    """A transformers module built on the meta device, given `weights` by assignment, its rotary tables (the one
    non-persistent buffer) made on `device`."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    with torch.device("meta"):
        model = build()
    model.load_state_dict(weights, assign=True)
    owner = model.model if hasattr(model, "model") else model
    with torch.device(device):
        owner.rotary_emb = Qwen3RotaryEmbedding(model.config)
    return model.eval().requires_grad_(False)


def _zlab(setup: DraftSetup, device):
    """z-lab's draft on our draft's weights; its DynamicCache prefilled with the same context as ours; a step that
    restores the cache to that context and runs one draft call."""
    from dflash.model import DFlashDraftModel, _crop_to, _make_cache
    from transformers import Qwen3Config

    cfg = setup.cfg
    config = Qwen3Config(**{k: cfg[k] for k in QWEN3_8B if k in cfg}, num_target_layers=cfg["num_target_layers"],
                         dflash_config={k: cfg[k] for k in ("block_size", "mask_token_id", "target_layer_ids")})
    config.num_hidden_layers = cfg["num_hidden_layers"]
    zlab = _on_meta_with_weights(lambda: DFlashDraftModel(config), setup.model.state_dict(), device)
    ctx, (features, block) = setup.ctx_cached, setup.prefill
    cache = _make_cache(zlab.config)
    with torch.no_grad():
        zlab(target_hidden=features, noise_embedding=block, past_key_values=cache, use_cache=True,
             position_ids=torch.arange(ctx + block.shape[1], device=device)[None])
    _crop_to(cache, ctx)
    context = [(layer.keys, layer.values) for layer in cache.layers]
    positions = torch.cat([setup.context_positions, setup.block_positions], dim=1)

    def step(model):
        for layer, (keys, values) in zip(cache.layers, context):
            layer.keys, layer.values = keys, values
        return model(target_hidden=setup.features, noise_embedding=setup.block, position_ids=positions,
                     past_key_values=cache, use_cache=True)
    return zlab, step


def _hf(setup: TargetSetup, device, kind: str):
    """transformers' Qwen3ForCausalLM on our target's weights, its StaticCache prefilled with the same tokens; a
    step that resets the cache length to the context and runs one `kind` step (verify: 16 tokens, ar: 1)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, StaticCache

    config = Qwen3Config(**setup.cfg, tie_word_embeddings=False)
    hf = _on_meta_with_weights(lambda: Qwen3ForCausalLM(config), setup.model.state_dict(), device)
    ctx, (ids, positions) = setup.ctx_cached, setup.inputs[kind]
    cache = StaticCache(config=hf.config, max_cache_len=ctx + setup.inputs["verify"][0].shape[1])
    with torch.no_grad():
        hf(setup.prefill_ids, position_ids=torch.arange(ctx, device=device)[None], past_key_values=cache,
           use_cache=True, logits_to_keep=1)
    lengths = [layer.cumulative_length for layer in cache.layers]
    context = [torch.full_like(lengths[0], ctx)] * len(lengths)

    def step(model):
        torch._foreach_copy_(lengths, context)
        return model(ids, position_ids=positions, past_key_values=cache, use_cache=True).logits
    return hf, step


def _target_cases(device, small, kind: str) -> list[Case]:
    setup = shared_target(device, small)
    hf, step = _hf(setup, device, kind)
    variants = step_variants(compile_backends(hf, small), step)
    tokens, dtype = setup.inputs[kind][0].shape[1], setup.model.lm_head.weight.dtype
    ours = no_grad(functools.partial(setup.step, setup.model, kind))
    check = check_against_eager(variants, tolerance(dtype), peers={"ours": ours})
    floor = weight_bytes(hf) + kv_bytes(setup.cfg, setup.ctx_cached + tokens, dtype)
    return with_and_without_graphs(
        f"transformers Qwen3ForCausalLM {kind} step ({tokens} token{'s' * (tokens > 1)}, ctx {setup.ctx_cached})",
        variants, check, floor, notes="StaticCache")


def draft_cases(device="cuda", small=False) -> list[Case]:
    setup = shared_draft(device, small)
    zlab, step = _zlab(setup, device)
    variants = step_variants(compile_backends(zlab, small), step)
    new_ctx, b, dtype = setup.features.shape[1], setup.block.shape[1], setup.features.dtype
    check = check_against_eager(variants, tolerance(dtype), peers={"ours": no_grad(setup.step)})
    floor = weight_bytes(zlab) + kv_bytes(setup.cfg, setup.ctx_cached + new_ctx + b, dtype)
    return with_and_without_graphs(f"z-lab DFlashDraftModel step (ctx {setup.ctx_cached}, {new_ctx}+{b} tokens)",
                                   variants, check, floor, notes="DynamicCache, as dflash_generate")


def verify_cases(device="cuda", small=False) -> list[Case]:
    return _target_cases(device, small, "verify")


def ar_cases(device="cuda", small=False) -> list[Case]:
    """The one-token step: Inductor's AR step is the baseline a speculative loop's speedup is measured against."""
    return _target_cases(device, small, "ar")
