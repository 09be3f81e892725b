"""compile_step="inductor": the pipeline's rewritten step modules under torch.compile(backend="inductor"). Greedy
decoding is token-identical to the eager engine and the default ("pipeline") steps, and the compiled steps keep
writing the KV-cache buffers the engine reads and compacts (same values as the default steps' after a few turns)."""

import pytest
import torch
from runtime_testing import one_thread, prompts_of, tiny_pair

import torch_dflash as td

single_thread = pytest.fixture(autouse=True)(one_thread)

PROMPT_LENGTHS, MAX_NEW = [9, 2], [14, 5]  # the second row finishes first: the batch shrinks 2 -> 1 (compaction)
TURNS = 3


def engine_of(**kwargs):
    target, draft = tiny_pair(6, layers=2, draft_layers=1, block_size=4, coin=10.0)
    return td.DFlashEngine(target, draft, max_batch=2, max_seq_len=32, **kwargs)


def caches_after_turns(engine, prompts):
    decode = engine.begin(prompts, max_new_tokens=MAX_NEW)
    for _ in range(TURNS):
        engine.iterate(decode)
    return [cache.clone() for cache in engine.steps.caches]


def test_inductor_steps_decode_like_eager_and_pipeline_and_write_the_same_caches():
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=3)
    runs = {}
    for mode, kwargs in {"eager": dict(executor="eager"), "pipeline": {}, "inductor": dict(compile_step="inductor")}.items():
        engine = engine_of(**kwargs)
        caches = caches_after_turns(engine, prompts)
        runs[mode] = engine.generate(prompts, max_new_tokens=MAX_NEW), caches, engine
    inductor = runs["inductor"][2]
    assert isinstance(inductor.steps.verify, torch._dynamo.eval_frame.OptimizedModule)
    assert set(inductor.reports) == {"draft", "verify"} and inductor.reports["verify"].fusions.get("attention.causal")
    tokens = {mode: [s.tolist() for s in out.sequences] for mode, (out, _, _) in runs.items()}
    assert tokens["inductor"] == tokens["pipeline"] == tokens["eager"]
    assert max(runs["inductor"][0].stats.acceptance_lengths) > 1  # the compiled draft step's tokens were accepted
    pipeline_caches, inductor_caches = runs["pipeline"][1], runs["inductor"][1]
    assert len(inductor_caches) == len(pipeline_caches) == 6  # k and v of 2 target layers + 1 draft layer
    assert all(c.abs().sum() > 0 for c in inductor_caches)  # the steps wrote the engine's buffers
    for got, want in zip(inductor_caches, pipeline_caches):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
