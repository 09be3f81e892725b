"""kv_cache_writes: a fused q/k/v projection's k and v go into the KV cache from the op itself.

Each test asserts the match count (or the refusal and its reason) and the numerics: the rewritten graph's
outputs AND the caches' contents equal the unrewritten graph's, in fp32, on two input shapes.
"""

import operator

import pytest
import torch
from pass_testing import assert_same_outputs, demo_verify_program, export_graph, run_passes

from torch_dflash.compiler.capture import VerifyStep
from torch_dflash.passes import context_qkv, kv_cache_writes

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


# ---- the draft's form: kv_materialize's context k/v and the block's joined by cat, written in one go ----

KVM = torch.ops.dflash.kv_materialize
CTX = 3


class DraftContextProjection(CachedProjection):
    """The draft's attention prologue after kv_materialize: k/v = cat([context, block], 1) written at
    cat([context positions, block positions], 1) — or at that cat plus 0 (`joined_positions` False: positions that
    are no cat) —; `extra`="ctx_k" also reads the context k elsewhere (what the guard refuses)."""

    def __init__(self, joined_positions, extra=None, shared_weight=False):
        super().__init__(extra)
        g = torch.Generator().manual_seed(1)
        self.w_kv = torch.nn.Parameter(torch.randn(2 * N_KV * HD, HIDDEN, generator=g) * 0.2)
        self.joined_positions, self.shared_weight = joined_positions, shared_weight

    def forward(self, x, ctx, ctx_positions, block_positions):
        c = ctx.shape[1]
        positions = torch.cat([ctx_positions, block_positions], 1)
        positions = positions if self.joined_positions else positions + 0
        angles = positions[..., None].float() * torch.linspace(0.1, 1.0, HD)
        cos, sin = angles.cos(), angles.sin()
        q, k, v = QKV(x, self.w, None, self.q_norm, self.k_norm, 1e-6, cos[:, c:], sin[:, c:], N_Q, N_KV, HD)
        w_kv = self.w[N_Q * HD:] if self.shared_weight else self.w_kv    # kv_materialize's form for z-lab's draft
        k_ctx, v_ctx = KVM(ctx, w_kv, None, self.k_norm, 1e-6, cos[:, :c], sin[:, :c], N_KV, HD)
        rows = torch.arange(x.shape[0])[:, None]
        self.k_cache[rows, :, positions] = torch.cat([k_ctx, k], 1)
        self.v_cache[rows, :, positions] = torch.cat([v_ctx, v], 1)
        out = q.sum(-1) + self.k_cache[: x.shape[0]].sum() + self.v_cache[: x.shape[0]].sum()
        return (out, k_ctx * 2) if self.extra == "ctx_k" else out


def draft_inputs(batch, seq, ctx, start, shared=False):
    """x [batch, seq, H], context [batch, ctx, H], positions: ctx then seq consecutive slots from start + row;
    `shared`: the block's last token goes to the context's first slot too (as the runtime's padded rows all write
    one scratch slot) — the block's k/v must end up there, as the cat's single write leaves it."""
    g = torch.Generator().manual_seed(batch * 10 + seq)
    positions = start + torch.arange(batch)[:, None] + torch.arange(ctx + seq)
    if shared:
        positions[:, -1] = positions[:, 0]
    return (torch.randn(batch, seq, HIDDEN, generator=g), torch.randn(batch, ctx, HIDDEN, generator=g),
            positions[:, :ctx].contiguous(), positions[:, ctx:].contiguous())


def run_draft(joined_positions, extra, expected, shared_weight=False, passes=(kv_cache_writes.PASS,)):
    """Export DraftContextProjection (dynamic batch, block and context lengths), run the passes, compare outputs
    and caches with the unrewritten graph on three shapes; returns (rewritten graph, report)."""
    module = DraftContextProjection(joined_positions, extra, shared_weight).eval()
    batch = torch.export.Dim("batch", min=1, max=2)
    seq, ctx = torch.export.Dim("seq", min=2, max=8), torch.export.Dim("ctx", min=1, max=6)
    dims = ({0: batch, 1: seq}, {0: batch, 1: ctx}, {0: batch, 1: ctx}, {0: batch, 1: seq})
    args = draft_inputs(2, 4, 3, 5)
    before, after = export_graph(module, args, dims), export_graph(module, args, dims)
    report = run_passes(after, list(passes))
    assert report.fusions().get(kv_cache_writes.NAME, 0) == expected
    for batch, seq, ctx, start, shared in ((2, 4, 3, 5, False), (1, 6, 5, 11, False), (2, 3, 2, 4, True)):
        results = []
        for gm in (before, after):
            for name in ("k_cache", "v_cache"):
                getattr(gm, name).zero_()
            with torch.no_grad():
                out = gm(*draft_inputs(batch, seq, ctx, start, shared))
            results.append((out, gm.k_cache.clone(), gm.v_cache.clone()))
        assert_same_outputs(results[0], results[1])
        slots = seq + ctx - shared
        assert (results[1][1] != 0).any(-1).sum() == N_KV * slots * batch   # every new slot written
    return after, report


def ops_in(gm, op) -> int:
    return sum(n.target is op.default for n in gm.graph.nodes)


@pytest.mark.parametrize("joined_positions", [True, False], ids=["positions_cat", "positions_input"])
def test_the_drafts_context_and_block_writes_move_into_their_ops(joined_positions):
    """Both halves of the cat go to the caches from the ops that compute them; the positions are the cat's operands
    when they were a cat, else slices of the one input."""
    gm, report = run_draft(joined_positions, None, expected=1)
    assert not report.rejections()
    assert (index_puts(gm), fused(gm), ops_in(gm, torch.ops.dflash.kv_materialize_cache), ops_in(gm, KVM)) == \
        (0, 1, 1, 0)
    assert not any(n.target is torch.ops.aten.cat.default and n.args[1] == 1 and len(n.args[0]) == 2 and
                   all(getattr(a, "op", None) == "call_function" and a.target is operator.getitem for a in n.args[0])
                   for n in gm.graph.nodes)
    writes = [n for n in gm.graph.nodes if n.target in (torch.ops.dflash.qkv_norm_rope_cache.default,
                                                         torch.ops.dflash.kv_materialize_cache.default)]
    written_at = [n.kwargs["cache_positions"] for n in writes]
    if joined_positions:
        assert sorted(p.target for p in written_at) == ["block_positions", "ctx_positions"]
    else:
        assert all(p.target is torch.ops.aten.slice.Tensor and p.args[0].target is torch.ops.aten.add.Tensor
                   for p in written_at)


def test_a_context_k_read_elsewhere_keeps_the_drafts_writes():
    gm, report = run_draft(True, "ctx_k", expected=0)
    assert index_puts(gm) == 2 and ops_in(gm, KVM) == 1
    assert [r.reason.split(": ", 1)[1] for r in report.rejections()] == \
        ["its k is not joined only as cat([context k of %kv_materialize (kv_materialize.default), block k], dim 1), "
         "read by nothing else"]


# ---- context_qkv: the pair kv_cache_writes leaves joins into one op when the context shares the k|v weight ----

JOINED = torch.ops.dflash.context_qkv_norm_rope_cache


@pytest.mark.parametrize("joined_positions", [True, False], ids=["positions_cat", "positions_input"])
def test_the_drafts_cache_writing_pair_joins_into_one_op(joined_positions):
    """z-lab's draft form (w_kv the k|v rows of w_qkv): kv_materialize_cache + qkv_norm_rope_cache → one
    context_qkv_norm_rope_cache over the whole table and positions — the draft's cat, or the tensor both halves
    slice —, outputs and caches equal (a slot both halves name included)."""
    gm, report = run_draft(joined_positions, None, expected=1, shared_weight=True,
                           passes=(kv_cache_writes.PASS, context_qkv.PASS))
    assert report.fusions().get(context_qkv.NAME) == 1 and not report.rejections()
    assert (ops_in(gm, JOINED), fused(gm), ops_in(gm, torch.ops.dflash.kv_materialize_cache), index_puts(gm)) == \
        (1, 0, 0, 0)
    joined = next(n for n in gm.graph.nodes if n.target is JOINED.default)
    positions = joined.kwargs["cache_positions"]
    assert positions.target is torch.ops.aten.cat.default if joined_positions else \
        positions.target is torch.ops.aten.add.Tensor
    assert list(gm.graph.find_nodes(op="get_attr", target="w")[0].users) == [joined]  # w_kv's slice went too


def test_a_context_with_its_own_kv_weight_keeps_two_ops():
    gm, report = run_draft(True, None, expected=1, passes=(kv_cache_writes.PASS, context_qkv.PASS))
    assert report.fusions().get(context_qkv.NAME, 0) == 0 and ops_in(gm, JOINED) == 0 and fused(gm) == 1
    assert [r.reason.split(": ", 1)[1] for r in report.rejections()] == \
        ["the context's k|v weight is not the k|v rows of the block's merged weight"]
