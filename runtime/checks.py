"""Validation of everything a user hands the engine, done before any compute. One sentence per error."""

import math
from collections.abc import Sequence

import torch

from torch_dflash.errors import ConfigError, InputError

EXECUTORS = ("auto", "eager", "exported")
PIPELINE = "pipeline"  # the default compile_step: pass pipeline + lowering for the models' device
INDUCTOR = "inductor"  # opt-in: the pipeline, then the rewritten step under torch.compile(backend="inductor")


def _device(module):
    return next(module.parameters()).device


def check_pair(target, draft):
    """The draft must read the target: same hidden size, feature layers inside the target, fc over exactly those
    features, mask token inside the target's vocabulary, same device and dtype."""
    tc, dc = target.config, draft.config
    if dc.hidden_size != tc.hidden_size:
        raise ConfigError(f"The draft's hidden_size {dc.hidden_size} differs from the target's {tc.hidden_size}.")
    ids, layers = list(draft.target_layer_ids), tc.num_hidden_layers
    if not ids or any(not 0 <= i < layers for i in ids):
        raise ConfigError(f"The draft's target_layer_ids {ids} are not all layers of the {layers}-layer target.")
    width = len(ids) * tc.hidden_size * getattr(tc, "hc_mult", 1)
    if draft.fc.in_features != width:
        raise ConfigError(f"The draft's fc reads {draft.fc.in_features} features but the target's layers {ids} "
                          f"give {width}.")
    if not 0 <= draft.mask_token_id < tc.vocab_size:
        raise ConfigError(f"The draft's mask_token_id {draft.mask_token_id} is outside the target's vocabulary "
                          f"of {tc.vocab_size} tokens.")
    if _device(draft) != _device(target):
        raise ConfigError(f"The draft is on {_device(draft)} but the target is on {_device(target)}.")
    if draft.fc.weight.dtype != target.model.embed_tokens.weight.dtype:
        raise ConfigError(f"The draft's dtype {draft.fc.weight.dtype} differs from the target's "
                          f"{target.model.embed_tokens.weight.dtype}.")
    return _device(target)


def check_block_size(draft, block_size):
    """The block size to run: the draft's own by default, never larger, at least 2 (last token + one draft)."""
    if block_size is None:
        return draft.block_size
    if not isinstance(block_size, int) or not 2 <= block_size <= draft.block_size:
        raise InputError(f"block_size must be an integer from 2 to {draft.block_size} (the draft's block size), "
                         f"got {block_size!r}.")
    return block_size


def check_engine(device, block_size, max_batch, max_seq_len, draft_window_size, executor, cuda_graphs, compile_step,
                 steps=None):
    """Engine settings; returns (executor, cuda_graphs) with "auto" / None resolved ("auto" is "exported")."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch must be a positive integer, got {max_batch!r}.")
    if not isinstance(max_seq_len, int) or max_seq_len < 2 * block_size + 1:
        raise InputError(f"max_seq_len must be an integer of at least 2 * block_size + 1 = {2 * block_size + 1}, "
                         f"got {max_seq_len!r}.")
    if draft_window_size is not None and (not isinstance(draft_window_size, int) or draft_window_size < block_size):
        raise InputError(f"draft_window_size must be an integer of at least the block size {block_size}, "
                         f"got {draft_window_size!r}.")
    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}.")
    if compile_step not in (PIPELINE, INDUCTOR, None) and not callable(compile_step):
        raise InputError(f"compile_step must be '{PIPELINE}', '{INDUCTOR}', None or a callable (graph_module, "
                         f"kind) -> step, got {compile_step!r}.")
    if executor == "eager" and (callable(compile_step) or compile_step == INDUCTOR):
        raise InputError("compile_step applies to exported programs; use executor='exported' or 'auto'.")
    if steps is not None and (executor != "auto" or compile_step != PIPELINE):
        raise InputError("steps= are run as given; leave executor and compile_step at their defaults.")
    cuda = torch.device(device).type == "cuda"
    if cuda_graphs and not cuda:
        raise InputError(f"cuda_graphs=True needs the models on a CUDA device, they are on {device}.")
    return ("exported" if executor == "auto" else executor), (cuda if cuda_graphs is None else bool(cuda_graphs))


def check_sampling(temperature, top_p, top_k):
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}.")
    if not isinstance(top_k, int) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0, got {top_k!r}.")


def _prompt(p, vocab, index):
    t = torch.as_tensor(p) if not isinstance(p, torch.Tensor) else p
    if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)):
        raise InputError(f"Prompt {index} must be a 1-D sequence of integer token ids, got shape {tuple(t.shape)} "
                         f"of {t.dtype}.")
    if t.numel() == 0:
        raise InputError(f"Prompt {index} is empty; every prompt needs at least one token.")
    t = t.to("cpu", torch.long)
    if t.min() < 0 or t.max() >= vocab:
        raise InputError(f"Prompt {index} has token ids outside the vocabulary [0, {vocab}).")
    return t


def read_prompts(input_ids, vocab):
    """A batch of prompts as a list of 1-D CPU LongTensors. Accepts one prompt (1-D tensor or list of ints), a
    [B, L] tensor (B prompts of length L, no padding) or a list of 1-D tensors / lists of ints (ragged)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise InputError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}.")
        rows = [input_ids] if input_ids.dim() == 1 else list(input_ids)
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(x, int) for x in input_ids):
        rows = [input_ids]
    elif isinstance(input_ids, Sequence) and input_ids:
        rows = list(input_ids)
    else:
        raise InputError("input_ids must be a non-empty tensor, list of token ids or list of prompts.")
    return [_prompt(p, vocab, i) for i, p in enumerate(rows)]


def new_token_counts(max_new_tokens, n):
    """max_new_tokens of each of n sequences (one int for all, or one per prompt), each at least 1."""
    counts = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(counts) != n or any(not isinstance(m, int) or m < 1 for m in counts):
        raise InputError(f"max_new_tokens must be a positive integer or one per prompt, got {max_new_tokens!r}.")
    return counts


def check_capacity(prompts, counts, max_batch, max_seq_len):
    """Each sequence's length limit (prompt + max_new_tokens), all within the cache less its scratch slot."""
    if len(prompts) > max_batch:
        raise InputError(f"{len(prompts)} prompts exceed the engine's max_batch of {max_batch}.")
    limits = [len(p) + m for p, m in zip(prompts, counts)]
    worst = max(range(len(limits)), key=limits.__getitem__)
    if limits[worst] > max_seq_len - 1:
        raise InputError(f"Prompt {worst} ({len(prompts[worst])} tokens) plus max_new_tokens {counts[worst]} needs "
                         f"{limits[worst]} positions but the cache holds {max_seq_len - 1} (max_seq_len "
                         f"{max_seq_len} less one scratch slot).")
    return limits


def check_stop_tokens(stop_token_ids, vocab):
    ids = list(stop_token_ids or ())
    if any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
        raise InputError(f"stop_token_ids must be token ids in [0, {vocab}), got {stop_token_ids!r}.")
    return ids
