"""Capture ONE DFLASH draft step and ONE verify step with torch.export, over the models' static KV caches.

The step modules take any target/draft with the reference models' interface (duck-typed, so compiler/ does
not import models/): target(input_ids, positions=, cache_positions=, return_features=) -> (logits, features),
target.embed / target.lm_head, draft(context_features, block_embeds, context_positions, block_positions),
draft.embed_block / draft.compute_logits. Batch and the number of new context tokens are dynamic (Dim with
honest bounds); the block size is static. The cache writes are buffer mutations in the exported program.
"""

import torch
from torch import nn
from torch.export import Dim, ExportedProgram


def one_batch_symbol(like: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` expanded to the batch (dim 0) of `like`, so that every tensor of a captured step has ONE batch symbol.

    torch.export traces a dynamic dim over [max(2, min), max]; with max_batch 2 that is the single value 2, so every
    relation between the inputs' batch sizes holds without a guard and each input keeps a symbol of its own: the
    draft's k = cat(context, block) viewed to heads gets (2·s0)//s1 heads, the positions another batch than the
    queries, and the passes' shape guards refuse the sites (docs/passes.md). An expand gives its output `like`'s
    symbol. With max_batch ≥ 3 the symbols are one anyway and the expands are no-ops (cleanup removes them).
    A step takes inputs of one batch; here a batch-1 input would be broadcast, any other mismatch fails."""
    return tuple(t.expand(like.shape[0], *t.shape[1:]) for t in tensors)


class TargetIO(nn.Module):
    """Only the target's embedding and lm_head — what the draft borrows — so a draft program does not carry
    the whole target. Expects the HF layout `target.model.embed_tokens`."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.embed_tokens, self.lm_head = target.model.embed_tokens, target.lm_head

    def embed(self, ids):
        return self.embed_tokens(ids)


class DraftStep(nn.Module):
    """block ids [B, b] = [last committed token, MASK × (b−1)] + target features of the C new context tokens
    → draft logits [B, b−1, V] for block positions 1..b−1 (`logits=False`: their hidden states [B, b−1, H],
    before the target's lm_head); writes the context (and block) K/V to the draft cache."""

    def __init__(self, target: nn.Module, draft: nn.Module, logits: bool = True):
        super().__init__()
        self.target, self.draft, self.logits = TargetIO(target), draft, logits

    def forward(self, context_features, context_positions, block_ids, block_positions):
        context_features, context_positions, block_positions = one_batch_symbol(
            block_ids, context_features, context_positions, block_positions)
        embeds = self.draft.embed_block(block_ids, self.target)
        hidden = self.draft(context_features, embeds, context_positions, block_positions)
        return self.draft.compute_logits(hidden[:, 1:], self.target) if self.logits else hidden[:, 1:]


class VerifyStep(nn.Module):
    """The target over the block at its positions (causal with the cached prefix)
    → (logits [B, b, V], context features [B, b, k·H] for the next draft step)."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = target

    def forward(self, block_ids, positions):
        (positions,) = one_batch_symbol(block_ids, positions)
        out = self.target(block_ids, positions=positions, return_features=True)
        return out.logits, out.features


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_cache(module: nn.Module, what: str) -> int:
    if getattr(module, "max_seq_len", None) is None:
        raise ValueError(f"{what}: call setup_cache(max_batch_size, max_seq_len) before capturing")
    return module.max_seq_len


def _batch_dim(max_batch: int):
    """Dynamic batch 1..max_batch; a batch of exactly 1 stays static (a Dim needs min < max)."""
    return Dim("batch", min=1, max=max_batch) if max_batch > 1 else Dim.STATIC


def capture_draft(target: nn.Module, draft: nn.Module, *, max_batch: int, block_size: int | None = None,
                  max_context: int | None = None, example_batch: int = 2, example_context: int = 3,
                  logits: bool = True) -> ExportedProgram:
    """Export one draft step (`logits=False`: to the hidden states, without the lm_head). Dynamic: batch
    (1..max_batch), context tokens (1..max_context, default the block size — DFLASH commits at most a block per
    step; prefill passes the prompt in chunks of that size)."""
    max_seq = _check_cache(draft, "capture_draft")
    block = block_size or draft.block_size
    max_context = max_context or block
    device, hidden = _device(draft), draft.fc.in_features
    B, C = min(example_batch, max_batch), min(example_context, max_context)
    args = (
        torch.randn(B, C, hidden, device=device, dtype=draft.fc.weight.dtype),
        torch.arange(C, device=device).expand(B, C).contiguous(),
        torch.full((B, block), draft.mask_token_id, device=device),
        (C + torch.arange(block, device=device)).expand(B, block).contiguous(),
    )
    assert C + block <= max_seq, "example step does not fit the draft cache"
    batch, ctx = _batch_dim(max_batch), Dim("context", min=1, max=max_context)
    shapes = ({0: batch, 1: ctx}, {0: batch, 1: ctx}, {0: batch}, {0: batch})
    with torch.no_grad():
        return torch.export.export(DraftStep(target, draft, logits), args, dynamic_shapes=shapes, strict=False)


def capture_verify(target: nn.Module, *, block_size: int, max_batch: int, example_batch: int = 2) -> ExportedProgram:
    """Export one verify step over a static block of `block_size` tokens. Dynamic: batch (1..max_batch)."""
    _check_cache(target, "capture_verify")
    device = _device(target)
    B = min(example_batch, max_batch)
    args = (torch.zeros(B, block_size, dtype=torch.long, device=device),
            torch.arange(block_size, device=device).expand(B, block_size).contiguous())
    shapes = ({0: _batch_dim(max_batch)}, {0: _batch_dim(max_batch)})
    with torch.no_grad():
        return torch.export.export(VerifyStep(target), args, dynamic_shapes=shapes, strict=False)
