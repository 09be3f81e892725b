"""KV-cache writes of a step touch only the new tokens' slots: no full-cache copy.

Exported runtime steps (capture → pass pipeline → lowering) write the cache buffers with index_put_ in place.
`torch.compile(backend="dflash")` must hand Inductor the cache writes as *kept input mutations*
(`copy_(cache, index_put(cache, …))`, the form Inductor reinplaces into an in-place write of the new rows);
when AOT instead returns the new cache as an output, its runtime wrapper copies the whole cache back after every
step and Inductor first clones it (on the H100: a Memcpy DtoD + a cache-sized copy kernel per cache per layer).
Each test also checks the outputs and the caches' contents against the eager model after the step.
"""

import os
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import torch_dflash as td
from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig

SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
MAX_SEQ, CTX, BLOCK = 16, 5, 4


def with_random_weights(model, seed):
    """Random weights (vectors around 1, matrices around 0), no grad, a zeroed cache of MAX_SEQ slots."""
    torch.manual_seed(seed)
    model = model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    model.setup_cache(1, MAX_SEQ)
    return model


def tiny_target(layers=2, feature_layer_ids=()):
    cfg = DecoderConfig(vocab_size=64, num_hidden_layers=layers, feature_layer_ids=feature_layer_ids, **SHAPE)
    model = with_random_weights(DecoderLM(cfg), seed=0)
    model(torch.randint(0, 64, (1, CTX)), positions=torch.arange(CTX)[None])     # a prefilled context
    return model


def tiny_draft():
    cfg = DFlashDraftConfig(num_hidden_layers=2, target_layer_ids=[0, 1], num_target_layers=2, block_size=BLOCK,
                            mask_token_id=63, **SHAPE)
    return with_random_weights(DFlashDraft(cfg), seed=1)


def caches(model):
    return [buf for name, buf in model.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def target_step():
    """A verify block after the prefilled context, as a function of the (eager or compiled) model."""
    ids, positions = torch.randint(0, 64, (1, BLOCK), generator=torch.Generator().manual_seed(2)), \
        CTX + torch.arange(BLOCK)[None]
    return lambda fn: fn(ids, positions=positions).logits


def draft_step():
    g = torch.Generator().manual_seed(3)
    ctx, block = torch.randn(1, 2, 2 * 32, generator=g), torch.randn(1, BLOCK, 32, generator=g)
    ctx_pos, block_pos = torch.arange(CTX, CTX + 2)[None], torch.arange(CTX + 2, CTX + 2 + BLOCK)[None]
    return lambda fn: fn(ctx, block, ctx_pos, block_pos)


def compare_with_eager(model, run_eager, run_compiled):
    """Run the step eagerly, restore the caches, run it compiled: outputs and the caches' contents must match
    (and the step must have written cache rows). run_compiled returns (output, extra); returns extra."""
    before = [c.clone() for c in caches(model)]
    with torch.no_grad():
        want = run_eager()
    want_caches = [c.clone() for c in caches(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, want_caches))
    for cache, old in zip(caches(model), before):
        cache.copy_(old)
    with torch.no_grad():
        got, extra = run_compiled()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for cache, expected in zip(caches(model), want_caches):
        torch.testing.assert_close(cache, expected, atol=1e-5, rtol=1e-5)
    return extra


def test_exported_steps_write_the_cache_buffers_in_place():
    """capture → pipeline → lowering: every cache buffer is written in place, only the new rows, by the ops that
    compute them (pass kv_cache_writes: the q/k/v op's epilogue in both steps, kv_materialize's for the draft's
    context; pass context_qkv: both of the draft's in one op per layer) —, no index_put_, nothing copies a cache,
    and the verify and draft steps match eager on outputs and cache contents."""
    target, draft = tiny_target(feature_layer_ids=(0, 1)), tiny_draft()
    ids, positions = torch.randint(0, 64, (1, BLOCK)), CTX + torch.arange(BLOCK)[None]
    g = torch.Generator().manual_seed(4)
    draft_args = (torch.randn(1, 2, 64, generator=g), torch.arange(CTX, CTX + 2)[None],
                  torch.full((1, BLOCK), 63), torch.arange(CTX + 2, CTX + 2 + BLOCK)[None])
    compile_step = pipeline_compile_step("cpu")
    steps = (("verify", target, capture_verify(target, block_size=BLOCK, max_batch=1), (ids, positions),
              lambda: VerifyStep(target)(ids, positions)),
             ("draft", draft, capture_draft(target, draft, max_batch=1), draft_args,
              lambda: DraftStep(target, draft)(*draft_args)))
    writers = {"verify": [torch.ops.dflash.qkv_norm_rope_cache.default],
               "draft": [torch.ops.dflash.context_qkv_norm_rope_cache.default]}
    for kind, model, program, args, run_eager in steps:
        gm = compile_step(program.module(), kind)
        calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        layers = len(caches(model)) // 2
        for op in writers[kind]:
            fused = [n for n in calls if n.target is op]
            written = [n.kwargs[name].target for n in fused for name in ("k_cache", "v_cache")]
            cache_names = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_cache")}
            assert len(fused) == layers and sorted(written) == sorted(cache_names), (kind, op)
        assert not [n for n in calls if n.target is torch.ops.aten.index_put_.default], kind
        assert not [n for n in calls if n.target in (torch.ops.aten.index_put.default, torch.ops.aten.copy_.default,
                                                      "copy_")], kind
        compare_with_eager(model, run_eager, lambda: (gm(*args), None))


def final_graph_code(step, model) -> str:
    """The graph our passes hand on (backend="dflash", Inductor off), as code, after checking the step."""
    torch._dynamo.reset()
    fast = torch.compile(model, backend="dflash", dynamic=False, options={"inductor": False, "snapshots": True})
    compare_with_eager(model, lambda: step(model), lambda: (step(fast), None))
    return td.last_report().snapshots["cleanup"][1]


@pytest.mark.parametrize("build,step", [(tiny_target, target_step), (tiny_draft, draft_step)],
                         ids=["verify", "draft"])
def test_compiled_step_keeps_cache_writes_as_input_mutations(build, step):
    """The rewritten AOT graph returns only the step's output and writes each cache input through
    copy_(cache, index_put(cache, …)) — what Inductor turns into an in-place write of the new rows."""
    model = build()
    code = final_graph_code(step(), model)
    returned = re.search(r"return \((.*)\)", code).group(1).rstrip(", ").split(", ")
    copies = re.findall(r"aten\.copy_\.default\((\w+), (\w+)\)", code)
    puts = dict(re.findall(r"(\w+) = torch\.ops\.aten\.index_put\.default\((\w+),", code))
    assert len(returned) == 1, returned
    assert len(copies) == len(caches(model)) and all(puts.get(src) == dst for dst, src in copies), copies


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TORCH_DFLASH_SLOW"), reason="opt in with TORCH_DFLASH_SLOW=1 (~30 s)")
def test_inductor_code_writes_only_the_new_rows():
    """Inductor's code for a compiled verify step allocates no buffer of a cache's size (no clone of the cache)
    and returns only the logits (no cache for the caller to copy back)."""
    model = tiny_target(layers=1)
    step = target_step()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="dflash", dynamic=False)
    code = compare_with_eager(model, lambda: step(model), lambda: run_and_get_code(lambda: step(fast)))[-1]
    cache_shape = ", ".join(map(str, caches(model)[0].shape))
    returned = re.search(r"return \((.*)\)", code).group(1).rstrip(", ")
    assert f"empty_strided_cpu(({cache_shape})" not in code
    assert returned.count("buf") == 1, returned
