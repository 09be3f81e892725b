"""Where each row's block entries go: cache positions and column order of one step.

A row whose length limit is near has only v = min(b, limit - start) real entries (z-lab then verifies a shorter
block). Shapes stay [n, b]: the b - v surplus entries are sent to the scratch slot, and the columns are permuted
so the last column still holds the last real entry — the draft's non-causal mask reads its upper bound from the
last column, so the real entries see exactly what z-lab's shorter block sees. `col[i, o]` is the column of
logical offset o (offset 0 = the last committed token, always column 0).
"""

import torch


def block_layout(start, limit, block_size, scratch):
    """start, limit [n] -> (col [n, b] logical offset -> column, positions [n, b] in column order, real [n])."""
    offsets = torch.arange(block_size, device=start.device)
    real = (limit - start).clamp(max=block_size)
    last = (real - 1)[:, None]
    col = torch.where(offsets < last, offsets, torch.where(offsets == last, block_size - 1, offsets - 1))
    logical = torch.where(offsets < real[:, None], start[:, None] + offsets, scratch)
    return col, torch.empty_like(logical).scatter_(1, col, logical), real


def to_logical(x, col):
    """x [n, b, ...] in column order -> logical order."""
    index = col.view(*col.shape, *([1] * (x.dim() - 2))).expand(*col.shape, *x.shape[2:])
    return x.gather(1, index)
