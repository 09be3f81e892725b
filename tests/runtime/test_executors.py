"""Executors and batching: exported programs (through the compile hook) == eager modules token for token; the
draft window; finished rows leave the batch; CUDA graphs on == off (GPU)."""

import copy
import time

import pytest
import torch
from runtime_testing import ar_greedy, one_thread, prompts_of, tiny_pair

import torch_dflash as td
from torch_dflash.models import load_draft

single_thread = pytest.fixture(autouse=True)(one_thread)

PROMPT_LENGTHS, MAX_NEW = [9, 2, 21], [30, 7, 26]


def small_pair():
    return tiny_pair(6, layers=2, draft_layers=1, block_size=4, coin=10.0)


@pytest.fixture(scope="module")
def exported_and_eager():
    """Two engines on two copies of one pair, both with a draft window of 6: exported programs through a
    recording compile hook, and the eager step modules."""
    target, draft = small_pair()
    hooked = []

    def compile_step(graph_module, kind):
        hooked.append(kind)

        def run(*args):
            hooked.append(f"run {kind}")
            return graph_module(*args)
        return run

    exported = td.DFlashEngine(target, draft, max_batch=3, max_seq_len=48, draft_window_size=6,
                               executor="exported", compile_step=compile_step)
    eager = td.DFlashEngine(copy.deepcopy(target), copy.deepcopy(draft), max_batch=3, max_seq_len=48,
                            draft_window_size=6, executor="eager")
    return exported, eager, hooked


def test_exported_programs_equal_the_eager_modules(exported_and_eager):
    exported, eager, hooked = exported_and_eager
    assert hooked[:2] == ["draft", "verify"]
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=2)
    for kwargs in (dict(), dict(temperature=0.9, top_k=20, seed=3)):
        a = exported.generate(prompts, max_new_tokens=MAX_NEW, **kwargs)
        b = eager.generate(prompts, max_new_tokens=MAX_NEW, **kwargs)
        assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
        assert a.acceptance_lengths == b.acceptance_lengths
    assert {"run draft", "run verify"} <= set(hooked)
    assert max(b.stats.acceptance_lengths) > 1


def test_a_window_covering_everything_changes_nothing_and_any_window_is_lossless():
    target, draft = small_pair()
    prompts = prompts_of(PROMPT_LENGTHS, 64, seed=4)
    full = td.generate(target, draft, prompts, max_new_tokens=MAX_NEW, executor="eager")
    wide = td.generate(target, draft, prompts, max_new_tokens=MAX_NEW, draft_window_size=64, executor="eager")
    narrow = td.generate(target, draft, prompts, max_new_tokens=MAX_NEW, draft_window_size=4, executor="eager")
    assert draft.context_window == 4
    assert wide.acceptance_lengths == full.acceptance_lengths
    for i, (prompt, n) in enumerate(zip(prompts, MAX_NEW)):
        assert wide.sequences[i].tolist() == narrow.sequences[i].tolist() == ar_greedy(target, prompt, n)
    assert narrow.acceptance_lengths != full.acceptance_lengths  # the window did change what the draft saw


def test_draft_window_matches_zlab_on_the_last_window_of_context(tiny_draft_dir):
    """SGLang's draft window: the block attends to the last W context tokens (absolute rope positions) — z-lab's
    draft given only those W context features at those positions."""
    from dflash.model import DFlashDraftModel

    zlab = DFlashDraftModel.from_pretrained(tiny_draft_dir).eval()
    draft = load_draft(tiny_draft_dir)
    draft.setup_cache(2, 32)
    draft.context_window = 4
    g = torch.Generator().manual_seed(0)
    ctx, block = torch.randn(2, 10, 128, generator=g), torch.randn(2, 4, 64, generator=g)
    positions = torch.arange(14)[None].expand(2, -1)
    with torch.no_grad():
        ref = zlab(target_hidden=ctx[:, -4:], noise_embedding=block, position_ids=positions[:, 6:])
        out = draft(ctx, block, positions[:, :10], positions[:, 10:])
        unwindowed = zlab(target_hidden=ctx, noise_embedding=block, position_ids=positions)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, unwindowed, atol=1e-3)


def test_finished_rows_leave_the_batch():
    """Rows finish at different steps; the live ones are compacted to the front, so later steps run on fewer
    rows, and every sequence still equals its own greedy decoding."""
    target, draft = small_pair()
    engine = td.DFlashEngine(target, draft, max_batch=4, max_seq_len=80, executor="eager")
    batch_sizes = []
    draft_step = engine.steps.draft

    def recording(*args):
        batch_sizes.append(args[0].shape[0])
        return draft_step(*args)
    engine.steps.draft = recording
    prompts, news = prompts_of([4, 30, 11, 2], 64, seed=8), [3, 40, 9, 25]
    out = engine.generate(prompts, max_new_tokens=news)
    for i, (prompt, n) in enumerate(zip(prompts, news)):
        assert out.sequences[i].tolist() == ar_greedy(target, prompt, n)
    decode = batch_sizes[-out.stats.steps:]
    assert decode[0] == 4 and decode[-1] == 1 and decode == sorted(decode, reverse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("executor", ["eager", "exported"])
def test_cuda_graphs_equal_no_graphs(executor):
    """Batch buckets 4 -> 2 -> 1 as rows finish (3 prompts pad to 4), greedy and seeded sampling."""
    target, draft = (m.cuda() for m in small_pair())
    prompts = prompts_of([9, 2, 21], 64, seed=2)
    news = [30, 7, 26]
    runs = {}
    for graphs in (True, False):
        t, d = copy.deepcopy(target), copy.deepcopy(draft)
        engine = td.DFlashEngine(t, d, max_batch=4, max_seq_len=64, executor=executor, cuda_graphs=graphs)
        runs[graphs] = [engine.generate(prompts, max_new_tokens=news, **kw)
                        for kw in (dict(), dict(temperature=0.8, seed=1))]
    for with_graphs, without in zip(runs[True], runs[False]):
        assert [s.tolist() for s in with_graphs.sequences] == [s.tolist() for s in without.sequences]
        assert with_graphs.acceptance_lengths == without.acceptance_lengths
    for i, (prompt, n) in enumerate(zip(prompts, news)):
        assert runs[True][0].sequences[i].tolist() == ar_greedy(target, prompt, n)


@pytest.mark.gpu
def test_cuda_phase_times_add_up_to_the_wall_time_without_syncing_between_phases(monkeypatch):
    """On CUDA the loop's phase times come from events (PhaseClock): each positive, their sum within 10 % of the
    call's wall time, and one host synchronisation per turn — the turn's own `.tolist()` — not one per phase."""
    target, draft = (m.cuda() for m in small_pair())
    engine = td.DFlashEngine(target, draft, max_batch=1, max_seq_len=96)
    prompt = prompts_of([9], 64, seed=4)[0]
    engine.generate(prompt, max_new_tokens=40)    # CUDA graphs captured
    syncs = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (syncs.append(1), real_sync(*a, **k))[1])
    real_sync()
    began = time.perf_counter()
    out = engine.generate(prompt, max_new_tokens=40)
    wall = time.perf_counter() - began
    s = out.stats
    assert min(s.prefill_s, s.draft_s, s.verify_s, s.overhead_s) > 0
    assert s.total_s == pytest.approx(wall, rel=0.1)
    assert not syncs, f"{len(syncs)} torch.cuda.synchronize calls in a generate call"
