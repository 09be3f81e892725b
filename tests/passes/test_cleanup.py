"""cleanup: dead code, duplicate views, no-op casts and views go; writes into buffers (a KV cache) stay."""

import copy

import torch
from pass_testing import assert_same_outputs, export_graph, op_counts, op_diff
from torch.export import Dim

from torch_dflash.passes import cleanup
from torch_dflash.passes.manager import PassManager


class Messy(torch.nn.Module):
    """What fusions leave behind, plus a cache write that must survive."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 16, 8))

    def forward(self, x, positions):
        b, s, d = x.shape
        self.cache[torch.arange(b)[:, None], positions] = x          # in-place write into a buffer: kept
        unused_mask = torch.ones(s, s, dtype=torch.bool)
        unused_mask &= torch.arange(s)[None, :] <= torch.arange(s)[:, None]   # private in-place chain: dead
        _ = x.exp() * 2                                               # dead
        a = x.view(b, s, 2, d // 2)                                   # two identical views: merged
        c = x.view(b, s, 2, d // 2)
        same = x.float().view(b, s, d)                                # no-op cast and no-op view
        return (a * c).sum(-1) + same[..., :2] + self.cache[:b, :s, :2]


def args(b, s):
    return torch.randn(b, s, 8), torch.stack([torch.randperm(16)[:s] for _ in range(b)])


def test_cleanup_counts_and_numerics():
    module = Messy()
    seq = Dim("s", min=2, max=15)
    gm = export_graph(module, args(2, 5), ({1: seq}, {1: seq}))
    before = copy.deepcopy(gm)
    fusions = PassManager([cleanup.PASS]).run(gm).fusions()
    gone, new = op_diff(before, gm)
    assert fusions["cleanup.cse"] == 1 and not new
    assert fusions["cleanup.noop_cast"] == 1 and fusions["cleanup.noop_view"] >= 1
    assert gone["aten.exp.default"] == 1 and gone["aten.__iand__.Tensor"] == 1 and gone["aten.ones.default"] == 1
    assert fusions["cleanup.dead_code"] >= 6
    kept = op_counts(gm)
    assert kept["aten.index_put_.default"] == 1, "the cache write must stay"
    for shape in ((2, 5), (2, 7)):
        x, positions = args(*shape)
        reference, rewritten = Messy(), gm
        rewritten.cache.zero_()
        want = reference(x, positions)
        assert_same_outputs(want, rewritten(x, positions))
        torch.testing.assert_close(rewritten.cache, reference.cache)


def test_cleanup_is_idempotent():
    gm = export_graph(Messy(), args(2, 5))
    PassManager([cleanup.PASS]).run(gm)
    code = gm.code
    assert PassManager([cleanup.PASS]).run(gm).fusions() == {}
    assert gm.code == code
