"""Layout helpers the generated Ascend code calls: dflash's BHSD attention operands ↔ the TND / paged-KV forms
of npu_fused_infer_attention_score, the lengths it takes as host lists, and its compressed causal mask.

Plain torch, no NPU op: the same helpers serve real hardware and the CPU emulation.
"""

import functools

import torch
from torch import Tensor

from torch_dflash.errors import InputError

BLOCK_SIZE = 128        # KV page size; page attention takes multiples of 128 in [128, 512]
MASK_SIZE = 2048        # sparse_mode 3 takes a 2048×2048 mask


def to_tnd(x: Tensor) -> Tensor:
    """[B, N, S, D] → [B·S, N, D] (TND: each sequence's tokens consecutive), contiguous."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).contiguous()


def from_tnd(out: Tensor, batch: int) -> Tensor:
    """[B·S, N, D] → [B, N, S, D] laid out as [B, S, N, D] (what dflash.attention returns): a view."""
    return out.view(batch, -1, *out.shape[1:]).transpose(1, 2)


def cumulative_lengths(batch: int, seq: int) -> list[int]:
    """TND actual_seq_lengths: entry b is the token count of sequences 0..b (every sequence has `seq`)."""
    return [seq * (b + 1) for b in range(batch)]


def to_pages(x: Tensor) -> Tensor:
    """[B, N, S, D] → (B·⌈S/128⌉, 128, N·D) pages; sequence b owns pages b·⌈S/128⌉ … (see block_table).
    S is zero-padded to whole pages; the padding is never read (it lies past actual_seq_lengths_kv)."""
    b, n, s, d = x.shape
    pages = -(-s // BLOCK_SIZE)
    rows = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, pages * BLOCK_SIZE - s))
    return rows.reshape(b * pages, BLOCK_SIZE, n * d)


def block_table(batch: int, seq: int, device) -> Tensor:
    """The int32 [B, ⌈S/128⌉] page ids of `to_pages`."""
    pages = -(-seq // BLOCK_SIZE)
    return torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)


def kv_lengths(q_pos: Tensor, seq_kv: int, causal: bool) -> list[int]:
    """Per-sequence visible key count for dflash.attention with q_pos: keys 0 … q_pos[b, -1].

    Causal maps onto sparse_mode 3 (query i sees keys ≤ i + L − Sq) only when each row of q_pos is a run of
    consecutive positions ending at L − 1 < seq_kv: prefix + block, as in DFLASH verify. Reads q_pos on the host.
    """
    last = q_pos[:, -1]
    if causal:
        consecutive = bool((q_pos.diff(dim=-1) == 1).all()) and bool((q_pos[:, 0] >= 0).all())
        if not (consecutive and bool((last < seq_kv).all())):
            raise InputError("Ascend causal attention needs each q_pos row to be consecutive positions below the "
                             f"key length {seq_kv} (prefix + block); got {q_pos.tolist()}.")
    return (last + 1).clamp(0, seq_kv).tolist()


@functools.lru_cache(maxsize=None)
def causal_mask(device) -> Tensor:
    """The compressed mask of sparse_mode 3: bool 2048×2048, True strictly above the diagonal (not attended)."""
    return torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device).triu(1)
