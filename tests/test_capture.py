"""capture_draft / capture_verify: one step each as an ExportedProgram that survives save/load, with dynamic
batch and context length, writing the static caches exactly as the eager step does."""

import torch
import pytest

from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.demo import build_demo_pair


@pytest.fixture(scope="module")
def pair():
    return build_demo_pair(seed=1, max_batch=4, max_seq_len=64)


def _caches(module):
    """{name: cache buffer} of a module (an eager step or a loaded program, which owns its own buffers)."""
    return {name: b for name, b in module.named_buffers() if name.endswith(("k_cache", "v_cache"))}


def _draft_args(draft, batch, ctx, start):
    hidden = draft.fc.in_features
    return (torch.randn(batch, ctx, hidden), (start + torch.arange(ctx)).expand(batch, ctx).contiguous(),
            torch.randint(0, 1000, (batch, draft.block_size)),
            (start + ctx + torch.arange(draft.block_size)).expand(batch, draft.block_size).contiguous())


def _run_both(eager, program, args):
    """Run the eager step and the program from zeroed caches; return both outputs and both sets of caches."""
    with torch.no_grad():
        for module in (eager, program):
            for buf in _caches(module).values():
                buf.zero_()
        expected, got = eager(*args), program(*args)
    eager_caches, program_caches = _caches(eager), _caches(program)
    assert eager_caches.keys() == program_caches.keys() and eager_caches
    assert any(b.abs().sum() > 0 for b in program_caches.values())
    return expected, got, [(eager_caches[k], program_caches[k]) for k in eager_caches]


@pytest.mark.parametrize("batch,ctx", [(1, 1), (3, 5), (4, 8)])
def test_draft_step_matches_eager_on_dynamic_shapes(pair, tmp_path, batch, ctx):
    target, draft = pair
    program = capture_draft(target, draft, max_batch=4)
    torch.export.save(program, tmp_path / "draft.pt2")
    loaded = torch.export.load(tmp_path / "draft.pt2").module()
    expected, got, caches = _run_both(DraftStep(target, draft), loaded, _draft_args(draft, batch, ctx, start=7))
    assert got.shape == (batch, draft.block_size - 1, target.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in caches:  # the program wrote the same context + block K/V
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_verify_step_matches_eager_and_returns_features(pair, tmp_path, batch):
    target, draft = pair
    program = capture_verify(target, block_size=draft.block_size, max_batch=4)
    torch.export.save(program, tmp_path / "verify.pt2")
    loaded = torch.export.load(tmp_path / "verify.pt2").module()
    ids = torch.randint(0, 1000, (batch, draft.block_size))
    positions = (torch.tensor([3, 9, 0, 1][:batch])[:, None] + torch.arange(draft.block_size)).contiguous()
    (logits_e, feats_e), (logits_p, feats_p), caches = _run_both(VerifyStep(target), loaded, (ids, positions))
    assert feats_p.shape == (batch, draft.block_size, target.config.hidden_size * len(draft.target_layer_ids))
    torch.testing.assert_close(logits_p, logits_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats_p, feats_e, atol=1e-5, rtol=1e-5)
    for a, b in caches:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batch_beyond_the_declared_bound_is_refused(pair):
    target, draft = pair
    program = capture_verify(target, block_size=draft.block_size, max_batch=2).module()
    ids = torch.zeros(3, draft.block_size, dtype=torch.long)
    with pytest.raises(Exception, match="batch|range|constraint|<= 2"):
        program(ids, torch.arange(draft.block_size).expand(3, -1).contiguous())


def test_capture_needs_a_cache():
    target, draft = build_demo_pair(seed=0)
    target.max_seq_len = None
    with pytest.raises(ValueError, match="setup_cache"):
        capture_verify(target, block_size=4, max_batch=2)
