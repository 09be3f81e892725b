"""Rejection sampling keeps the target's distribution (chi-square against exact probabilities, fixed seeds);
temperature -> 0 is greedy; sampling_probs is z-lab's."""

import copy
import math

import pytest
import torch
from runtime_testing import one_thread, prompts_of, tiny_pair

import torch_dflash as td
from torch_dflash.runtime.sampling import accept_rejection, sample_probs, sampling_probs

single_thread = pytest.fixture(autouse=True)(one_thread)

# What is under test is the loop, not the compiled steps (tests/runtime/test_lossless.py runs those):
# eager modules skip the capture, which costs seconds per engine.
EAGER = "eager"


def assert_distributed_as(samples, probs, what):
    """Pearson chi-square of integer samples against probs, cells with expected count < 5 merged into one; fails
    at p < 1e-4 (Wilson–Hilferty quantile) or on any sample of probability 0."""
    n = samples.numel()
    observed = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    expected = probs.flatten().double() * n
    impossible = probs.flatten() == 0
    assert observed[impossible].sum() == 0, f"{what}: sampled a token of probability 0"
    small = (expected < 5) & ~impossible
    big = ~small & ~impossible
    observed = torch.cat([observed[big], observed[small].sum()[None]])
    expected = torch.cat([expected[big], expected[small].sum()[None]])
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.719  # upper 1e-4 quantile of the standard normal
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < limit, f"{what}: chi-square {stat:.1f} over {df} degrees of freedom exceeds {limit:.1f}"


def test_sampling_probs_is_zlabs():
    from dflash.model import _sampling_probs

    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) * 3
    for t, p, k in [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 7), (0.5, 0.6, 12), (2.0, 0.95, 40)]:
        torch.testing.assert_close(sampling_probs(logits, t, p, k), _sampling_probs(logits, t, p, k))


def test_rejection_keeps_each_committed_token_distributed_as_the_target():
    """Rows share target probs p [b, V] and draft probs q [b-1, V] (unlike each other); drafts are drawn from q.
    The first committed token follows p[0]; given the first draft was kept, the second follows p[1]; a bonus
    after all gamma drafts were kept follows p[gamma]. Half the rows count 3 drafts, half only 1."""
    g = torch.Generator().manual_seed(0)
    n, b, vocab = 60000, 4, 12
    p = torch.softmax(torch.randn(b, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(b - 1, vocab, generator=g) * 1.5, -1)
    drafts = sample_probs(q.expand(n, -1, -1), g)
    gamma = torch.where(torch.arange(n) < n // 2, 3, 1)
    accepted, bonus = accept_rejection(drafts, p.expand(n, -1, -1), q.expand(n, -1, -1), gamma, g)
    assert 0 < (accepted == 0).sum() and 0 < (accepted == gamma).sum()  # both branches taken
    first = torch.where(accepted >= 1, drafts[:, 0], bonus)
    assert_distributed_as(first, p[0], "first token")
    reached = (accepted >= 1) & (gamma >= 2)
    second = torch.where(accepted >= 2, drafts[:, 1], bonus)[reached]
    assert_distributed_as(second, p[1], "second token")
    assert_distributed_as(bonus[(accepted == 1) & (gamma == 1)], p[1], "bonus after all drafts kept")


def exact_target_distributions(target, prompt, temperature, top_p, top_k):
    """Exact joint of the first two new tokens [V, V] and marginal of the third [V], by brute force."""
    model = copy.deepcopy(target)
    vocab, n = target.config.vocab_size, len(prompt)
    model.setup_cache(vocab * vocab, n + 3)
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    seqs = torch.cat([prompt.expand(vocab * vocab, -1), pairs], dim=1)
    with torch.no_grad():
        logits = model(seqs, positions=torch.arange(n + 2).expand(len(seqs), -1)).logits
    probs = sampling_probs(logits, temperature, top_p, top_k)  # [V*V, n+2, V]
    p1 = probs[0, n - 1]
    p2 = probs[::vocab, n].view(vocab, vocab)  # row t1: next-token probs after t1
    p3 = probs[:, n + 1].view(vocab, vocab, vocab)
    joint = p1[:, None] * p2
    return joint, (joint[..., None] * p3).sum((0, 1))


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.8, 0.85, 6)])
def test_generate_samples_the_targets_distribution(temperature, top_p, top_k):
    """4096 runs of 3 new tokens (one prefill sample, then 1-2 rejection steps with 2 then 1 draft tokens)."""
    target, draft = tiny_pair(3, vocab=16, block_size=4, coin=3.0)
    prompt = prompts_of([5], 16, seed=1)[0]
    engine = td.DFlashEngine(target, draft, max_batch=256, max_seq_len=16, executor=EAGER)
    outs = [engine.generate([prompt] * 256, max_new_tokens=3, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed) for seed in range(16)]
    new = torch.stack([s[5:] for out in outs for s in out.sequences])
    lengths = [a for out in outs for a in out.stats.acceptance_lengths]
    assert 2 in lengths and 1 in lengths  # some steps kept a draft, some rejected the first
    joint, third = exact_target_distributions(target, prompt, temperature, top_p, top_k)
    assert_distributed_as(new[:, 0] * 16 + new[:, 1], joint, "first two tokens")
    assert_distributed_as(new[:, 2], third, "third token")


def test_temperature_to_zero_is_greedy():
    target, draft = tiny_pair(2, coin=10.0)
    prompts = prompts_of([7, 19], 64)
    greedy = td.generate(target, draft, prompts, max_new_tokens=30, executor=EAGER)
    cold = td.generate(target, draft, prompts, max_new_tokens=30, temperature=1e-6, seed=0,
                       executor=EAGER)
    assert [s.tolist() for s in cold.sequences] == [s.tolist() for s in greedy.sequences]
    assert cold.acceptance_lengths == greedy.acceptance_lengths
    assert max(greedy.stats.acceptance_lengths) > 1
