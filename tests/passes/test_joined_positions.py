"""joined_positions: the rope tables of cat([front, rest], -1) → dflash.joined_rope_cos_sin, its first output read
where the cat was. Counts and numerics (bit for bit against eager, dynamic batch and lengths) on a module spelling
the draft's pattern; the guards, each refusal with its reason. The draft step itself: tests/passes/test_rope_tables.py
and tests/test_capture_passes.py."""

import pytest
import torch
from pass_testing import check_pass, op_counts
from torch.export import Dim

from torch_dflash.models.layers import rope_cos_sin
from torch_dflash.passes import canonicalize, cleanup, joined_positions, rope_tables

KIND = joined_positions.NAME
PASSES = [canonicalize.PASS, rope_tables.PASS, joined_positions.PASS, cleanup.PASS]
JOINED = "dflash.joined_rope_cos_sin.default"
BATCH = Dim("batch", min=2, max=8)
DYNAMIC = ({0: BATCH, 1: Dim("ctx", min=2, max=64)}, {0: BATCH, 1: Dim("block", min=2, max=64)})
EXACT = dict(atol=0, rtol=0)


class JoinedTables(torch.nn.Module):
    """The draft's positions: cat of the context's and the block's, its rope tables, and the cat read again (as the
    cache slots are). `guard` builds a refused case: "dim0" (joined along the batch), "three" (three parts),
    "mixed" (int32 front, int64 rest)."""

    def __init__(self, guard=None):
        super().__init__()
        self.guard = guard

    def forward(self, front, rest):
        if self.guard == "mixed":
            front = front.int()
        parts = (front, rest, rest) if self.guard == "three" else (front, rest)
        positions = torch.cat(parts, 0 if self.guard == "dim0" else -1)
        cos, sin = rope_cos_sin(positions, 16, 1e4, torch.float32)
        return cos, sin, positions + 1


def positions(b, s, seed):
    return torch.randint(0, 131072, (b, s), generator=torch.Generator().manual_seed(seed))


def test_the_cat_and_its_tables_become_one_op():
    args, second = (positions(2, 5, 0), positions(2, 3, 1)), (positions(3, 7, 2), positions(3, 4, 3))
    _, gm, _ = check_pass(JoinedTables(), args, second, PASSES, {"rope_cos_sin": 1, KIND: 1}, DYNAMIC, **EXACT)
    counts = op_counts(gm)
    assert counts[JOINED] == 1 and counts["aten.cat.default"] == counts["dflash.rope_cos_sin.default"] == 0


@pytest.mark.parametrize("guard,reason", [("dim0", "it does not join along the last dim"),
                                          ("three", "it joins 3 tensors, not two"),
                                          ("mixed", "its two parts differ in dtype or rank")])
def test_guards_leave_the_cat(guard, reason):
    args = (positions(2, 5, 0), positions(2, 5 if guard == "dim0" else 3, 1))
    second = (positions(2, 5, 2), positions(2, 5 if guard == "dim0" else 3, 3))   # exported static
    _, gm, report = check_pass(JoinedTables(guard), args, second, PASSES, {"rope_cos_sin": 1, KIND: 0}, **EXACT)
    assert op_counts(gm)[JOINED] == 0 and op_counts(gm)["aten.cat.default"] == 1
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith(reason)
