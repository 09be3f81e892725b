"""kv_cache_writes: a fused q/k/v projection's k and v go into the KV cache from the op itself.

Each test asserts the match count (or the refusal and its reason) and the numerics: the rewritten graph's
outputs AND the caches' contents equal the unrewritten graph's, in fp32, on two input shapes.
"""

import torch
from pass_testing import assert_same_outputs, demo_verify_program, export_graph, run_passes

from torch_dflash.compiler.capture import VerifyStep
from torch_dflash.passes import kv_cache_writes

N_Q, N_KV, HD, HIDDEN, SLOTS = 4, 2, 16, 32, 24
QKV = torch.ops.dflash.qkv_norm_rope


def index_puts(gm) -> int:
    return sum(n.target is torch.ops.aten.index_put_.default for n in gm.graph.nodes)


def fused(gm) -> int:
    return sum(n.target is torch.ops.dflash.qkv_norm_rope_cache.default for n in gm.graph.nodes)


class CachedProjection(torch.nn.Module):
    """The models' cached attention prologue after qkv_norm_rope: project, write k/v at positions, read the
    cache back (plus `extra`: another read of k, or of the cache before the write — what the guards refuse)."""

    def __init__(self, extra=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn((N_Q + 2 * N_KV) * HD, HIDDEN, generator=g) * 0.2)
        self.q_norm, self.k_norm = (torch.nn.Parameter(1 + 0.1 * torch.randn(HD, generator=g)) for _ in range(2))
        self.register_buffer("k_cache", torch.zeros(2, N_KV, SLOTS, HD))
        self.register_buffer("v_cache", torch.zeros(2, N_KV, SLOTS, HD))
        self.extra = extra

    def forward(self, x, cos, sin, positions):
        old = self.k_cache[: x.shape[0]].sum() if self.extra == "old_cache" else 0
        q, k, v = QKV(x, self.w, None, self.q_norm, self.k_norm, 1e-6, cos, sin, N_Q, N_KV, HD)
        rows = torch.arange(x.shape[0])[:, None]
        self.k_cache[rows, :, positions] = k
        self.v_cache[rows, :, positions] = v
        out = q.sum(-1) + self.k_cache[: x.shape[0]].sum() + self.v_cache[: x.shape[0]].sum() + old
        return (out, k * 2) if self.extra == "k" else out


def inputs(batch, seq, start):
    g = torch.Generator().manual_seed(batch * 10 + seq)
    positions = start + torch.arange(batch)[:, None] + torch.arange(seq)
    angles = positions[..., None].float() * torch.linspace(0.1, 1.0, HD)
    return torch.randn(batch, seq, HIDDEN, generator=g), angles.cos(), angles.sin(), positions


def run_both(extra, expected):
    """Export CachedProjection (dynamic batch and sequence), run the pass, compare with the unrewritten graph on
    two shapes — outputs and caches; returns (rewritten graph, report)."""
    module = CachedProjection(extra).eval()
    args = inputs(2, 3, 5)
    batch, seq = torch.export.Dim("batch", min=1, max=2), torch.export.Dim("seq", min=2, max=8)
    dims = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
    before = export_graph(module, args, dims)
    after = export_graph(module, args, dims)
    report = run_passes(after, [kv_cache_writes.PASS])
    assert report.fusions().get(kv_cache_writes.NAME, 0) == expected
    for shape in ((2, 3, 5), (1, 6, 11)):
        results = []
        for gm in (before, after):
            for name in ("k_cache", "v_cache"):
                getattr(gm, name).zero_()
            with torch.no_grad():
                results.append((gm(*inputs(*shape)), gm.k_cache.clone(), gm.v_cache.clone()))
        assert_same_outputs(results[0], results[1])
        assert results[1][1].abs().sum() > 0   # the step wrote the cache
    return after, report


def test_writes_move_into_the_qkv_op():
    gm, report = run_both(None, expected=1)
    assert fused(gm) == 1 and index_puts(gm) == 0 and not report.rejections()
    assert not any(n.target is QKV.default for n in gm.graph.nodes)


def test_a_k_read_elsewhere_keeps_the_writes():
    gm, report = run_both("k", expected=0)
    assert index_puts(gm) == 2 and fused(gm) == 0
    assert [r.reason.split(": ", 1)[1] for r in report.rejections()] == \
        ["its k or v is read by something other than one in-place cache write (index_put_)"]


def test_a_read_of_the_old_cache_keeps_the_writes():
    gm, report = run_both("old_cache", expected=0)
    assert index_puts(gm) == 2 and fused(gm) == 0
    assert [r.reason.split(": ", 1)[1] for r in report.rejections()] == \
        ["a cache is read apart from its write (the write would move before that read)"]


def test_the_verify_step_writes_every_layers_cache_from_its_qkv_op():
    """Our demo target's verify step through the default pipeline: every layer's writes fused, no index_put_
    left, outputs and cache contents equal to the eager step at batch 1 and 2 with ragged positions."""
    target, program, report = demo_verify_program(4, "verify")
    layers = target.config.num_hidden_layers
    assert report.fusions[kv_cache_writes.NAME] == layers and fused(program) == layers and index_puts(program) == 0
    caches = [b for name, b in target.named_buffers() if name.endswith(("k_cache", "v_cache"))]
    for batch in (1, 2):
        args = (torch.randint(0, 1000, (batch, 4)), 9 + torch.arange(batch)[:, None] + torch.arange(4))
        before = [c.clone() for c in caches]
        with torch.no_grad():
            want = VerifyStep(target)(*args)
        want_caches = [c.clone() for c in caches]
        for cache, old in zip(caches, before):
            cache.copy_(old)
        with torch.no_grad():
            got = program(*args)
        assert_same_outputs(want, got)
        assert_same_outputs(want_caches, caches)
