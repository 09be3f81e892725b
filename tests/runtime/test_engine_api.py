"""The engine's default steps are captured, pass-optimized, lowered programs with their CompileReports; the opt-outs
(programs as captured, eager modules); `steps=` runs given steps; begin / iterate / finish is generate, and a
turn resumed from a copy of the state redoes exactly that turn."""

import pytest
import torch
from runtime_testing import ar_greedy, one_thread, prompts_of, tiny_pair

import torch_dflash as td
from torch_dflash.compiler.capture import VerifyStep
from torch_dflash.runtime import Steps
from torch_dflash.runtime.executors import build_steps

single_thread = pytest.fixture(autouse=True)(one_thread)

PROMPT_LENGTHS, MAX_NEW = [9, 2], [30, 7]


def small_pair():
    return tiny_pair(6, layers=2, draft_layers=1, block_size=4, coin=10.0)


def dflash_ops(graph_module):
    return sorted({n.target.name() for n in graph_module.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target.namespace.startswith("dflash")})


def assert_lossless(target, out, prompts, news):
    for prompt, n, got in zip(prompts, news, out.sequences):
        assert got.tolist() == ar_greedy(target, prompt, n)


def test_default_steps_are_pipeline_compiled_and_report():
    # rows of 64: the norm between the target's down GEMM and the next qkv projection is deferred too
    target, draft = tiny_pair(6, hidden=64, layers=2, draft_layers=1, block_size=4, coin=10.0)
    engine = td.DFlashEngine(target, draft, max_batch=1, max_seq_len=48)
    draft_report, verify_report = engine.reports["draft"], engine.reports["verify"]
    assert draft_report.target == verify_report.target == "cpu" and not verify_report.rejections
    assert {k: draft_report.fusions.get(k) for k in ("kv_materialize", "attention.non_causal", "kv_cache_writes")} \
        == {"kv_materialize": 1, "attention.non_causal": 1, "kv_cache_writes": 1}
    assert {k: verify_report.fusions.get(k) for k in ("qkv_norm_rope", "attention.causal")} == \
        {"qkv_norm_rope": 2, "attention.causal": 2}
    assert dflash_ops(engine.steps.draft) == ["dflash::add_rms_norm", "dflash::attention",
                                              "dflash::context_qkv_norm_rope_cache", "dflash::embedding_rms_norm",
                                              "dflash::joined_rope_cos_sin", "dflash::linear",
                                              "dflash::linear_add_norm_stats", "dflash::linear_silu_mul",
                                              "dflash::rms_norm"]
    assert dflash_ops(engine.steps.verify) == ["dflash::add_rms_norm", "dflash::attention",
                                               "dflash::embedding_rms_norm", "dflash::linear",
                                               "dflash::linear_add_norm_stats", "dflash::linear_silu_mul",
                                               "dflash::qkv_norm_rope_cache",
                                               "dflash::rope_cos_sin"]   # every norm reads an add or the embeddings
    committed = []
    for prompt, n in zip(prompts_of(PROMPT_LENGTHS, 64, seed=3), MAX_NEW):
        out = engine.generate(prompt, max_new_tokens=n)
        assert_lossless(target, out, [prompt], [n])
        committed += out.stats.acceptance_lengths
    assert max(committed) > 1  # drafts were accepted: the compiled draft step is exercised, not just verify


def test_opt_outs_run_programs_as_captured_or_eager_modules():
    target, draft = small_pair()
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=4)
    as_captured = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=48, compile_step=None)
    assert as_captured.reports == {} and dflash_ops(as_captured.steps.verify) == []
    assert_lossless(target, as_captured.generate(prompts, max_new_tokens=MAX_NEW), prompts, MAX_NEW)
    eager = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=48, executor="eager")
    assert eager.reports == {} and isinstance(eager.steps.verify, VerifyStep)
    assert_lossless(target, eager.generate(prompts, max_new_tokens=MAX_NEW), prompts, MAX_NEW)


def recorded_steps(target, draft, calls, max_seq_len):
    """Eager steps (caches of 2 rows) that append "draft" / "verify" to `calls` as they run."""
    target.setup_cache(2, max_seq_len)
    draft.setup_cache(2, max_seq_len)
    own = build_steps(target, draft, executor="eager", block_size=4, max_batch=2)

    def recorded(kind, fn):
        def run(*args):
            calls.append(kind)
            return fn(*args)
        return run

    return Steps(recorded("draft", own.draft), recorded("verify", own.verify), own.caches)


def test_given_steps_are_run_as_they_are():
    target, draft = small_pair()
    calls = []
    steps = recorded_steps(target, draft, calls, 48)
    engine = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=48, steps=steps)
    assert engine.steps is steps and engine.reports == {}
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=5)
    assert_lossless(target, engine.generate(prompts, max_new_tokens=MAX_NEW), prompts, MAX_NEW)
    assert {"draft", "verify"} == set(calls)


def test_begin_iterate_finish_is_generate_and_a_resumed_turn_is_the_same_turn():
    target, draft = small_pair()
    engine = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=64, executor="eager")
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=6)
    decode = engine.begin(prompts, max_new_tokens=MAX_NEW)
    engine.iterate(decode)
    with pytest.raises(td.InputError, match="finish"):
        engine.finish(decode)
    resumed = [decode.fork() for _ in range(2)]  # rollback is by position: both redo the second turn
    second = [engine.iterate(state) for state in resumed]
    turns = []
    while (produced := engine.iterate(decode)) is not None:
        turns.append(produced)
    assert second[0] == second[1] == turns[0] and resumed[0].start_host == resumed[1].start_host
    out = engine.finish(decode)
    assert_lossless(target, out, prompts, MAX_NEW)
    whole = engine.generate(prompts, max_new_tokens=MAX_NEW)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in whole.sequences]
    assert out.acceptance_lengths == whole.acceptance_lengths


def test_a_draft_queued_ahead_is_the_next_turns_draft():
    """draft_ahead: the turn queues the next draft (before its host sync) while no row can reach its limit, and the
    next turn drafts nothing more; near the limits it queues none; `ahead=False` and forks opt out."""
    target, draft = small_pair()
    calls = []
    engine = td.DFlashEngine(target, draft, max_batch=2, max_seq_len=64, steps=recorded_steps(target, draft, calls, 64),
                             draft_ahead=True)
    decode = engine.begin(prompts_of([9, 2], 64, seed=7), max_new_tokens=[30, 20])
    del calls[:]
    engine.iterate(decode)
    assert calls == ["draft", "verify", "draft"] and decode.ahead is not None
    assert decode.fork().ahead is None
    engine.iterate(decode)
    assert calls[3:] == ["verify", "draft"]
    engine.iterate(decode, ahead=False)
    assert calls[5:] == ["verify"] and decode.ahead is None
    while engine.iterate(decode) is not None:
        pass
    news = [decode.final_length[i] - n for i, n in enumerate([9, 2])]
    assert news == [30, 20] and decode.ahead is None
    # one draft per turn, none wasted: these rows end at their limits, which the host sees coming
    assert calls.count("draft") == calls.count("verify")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_drafting_ahead_changes_no_token(temperature):
    """Ragged prompts, length limits, stop tokens (rows finish and move: the draft queued for the old rows is
    dropped and the turn drafts again), greedy and sampled with a seed: the same tokens and acceptance lengths."""
    target, draft = small_pair()
    prompts = prompts_of([9, 2, 17], 64, seed=8)
    outs = [td.DFlashEngine(target, draft, max_batch=3, max_seq_len=80, executor="eager", draft_ahead=ahead)
            .generate(prompts, max_new_tokens=[30, 7, 25], temperature=temperature, stop_token_ids=[5, 9], seed=3)
            for ahead in (False, True)]
    assert [s.tolist() for s in outs[0].sequences] == [s.tolist() for s in outs[1].sequences]
    assert outs[0].acceptance_lengths == outs[1].acceptance_lengths
    assert outs[1].stats.steps == outs[0].stats.steps and outs[1].stats.draft_s > 0
    if temperature == 0:
        for prompt, n, got in zip(prompts, [30, 7, 25], outs[1].sequences):
            assert got.tolist() == ar_greedy(target, prompt, n, (5, 9))
