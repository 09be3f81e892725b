"""Acceptance counting: a draft that always agrees commits whole blocks; a random draft ~1 token per step."""

import pytest
import torch
from runtime_testing import one_thread, prompts_of, tiny_pair

import torch_dflash as td

single_thread = pytest.fixture(autouse=True)(one_thread)

# What is under test is the loop, not the compiled steps (tests/runtime/test_lossless.py runs those):
# eager modules skip the capture, which costs seconds per engine.
EAGER = "eager"


def agreeing_pair(block_size):
    """Zero final-norm weights: every target logit and every draft logit is 0, so both argmaxes are token 0 at
    every position and every draft token is accepted."""
    target, draft = tiny_pair(0, block_size=block_size)
    with torch.no_grad():
        target.model.norm.weight.zero_()
        draft.norm.weight.zero_()
    return target, draft


@pytest.mark.parametrize("block", [2, 4, 7])
def test_an_agreeing_draft_commits_whole_blocks(block):
    target, draft = agreeing_pair(block)
    prompts = prompts_of([3, 20, 9], target.config.vocab_size)
    # 1 token from the prefill, then 5 full blocks; then 5 blocks and a cut one of 2; then a cut block only.
    news = [1 + 5 * block, 1 + 5 * block + 2, 1 + (block - 1)]
    out = td.generate(target, draft, prompts, max_new_tokens=news, executor=EAGER)
    expected = [[block] * 5, [block] * 5 + [2], [block - 1]]
    assert out.acceptance_lengths == expected
    for prompt, n, seq in zip(prompts, news, out.sequences):
        assert seq[: len(prompt)].tolist() == prompt.tolist() and seq[len(prompt):].tolist() == [0] * n
    stats = out.stats
    assert stats.steps == 6 and stats.new_tokens == sum(news)
    flat = sum(expected, [])
    assert stats.histogram == [flat.count(k) for k in range(block + 1)]
    assert stats.mean_acceptance == pytest.approx((10 * block + 2 + block - 1) / 12)


def test_a_random_draft_is_accepted_about_never():
    target, draft = tiny_pair(5, vocab=64, block_size=8)
    out = td.generate(target, draft, prompts_of([12, 30], 64), max_new_tokens=60, executor=EAGER)
    assert out.stats.mean_acceptance < 1.2
    assert out.stats.histogram[1] >= 0.85 * len(out.stats.acceptance_lengths)


def test_stats_add_up():
    target, draft = tiny_pair(1, coin=10.0)
    prompts = prompts_of([5, 9], 64)
    out = td.generate(target, draft, prompts, max_new_tokens=[20, 33], executor=EAGER)
    s = out.stats
    assert s.new_tokens == sum(len(q) - len(p) for p, q in zip(prompts, out.sequences)) == 20 + 33
    assert s.acceptance_lengths == out.acceptance_lengths[0] + out.acceptance_lengths[1]
    assert s.histogram == [s.acceptance_lengths.count(k) for k in range(draft.block_size + 1)]
    assert s.steps == max(len(a) for a in out.acceptance_lengths)
    assert min(s.prefill_s, s.draft_s, s.verify_s, s.overhead_s) > 0
    assert s.tokens_per_s == pytest.approx(s.new_tokens / s.total_s)
