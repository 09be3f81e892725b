"""Helpers of the runtime tests: tiny random (target, draft) pairs and reference decoders."""

import copy

import torch

from torch_dflash.models import DecoderConfig, DecoderLM, DFlashDraft, DFlashDraftConfig, build_target_layer_ids


def tiny_pair(seed=0, *, vocab=64, hidden=32, layers=4, draft_layers=2, block_size=8, coin=0.0):
    """A random Qwen3-style target (2/1 heads of 16) and a DFlash draft reading it; mask token vocab - 1.
    `coin` > 0 scales channel 0 of both final norms by it and gives lm_head column 0 the values +1 / -1 for
    tokens 0 / 1: both models then mostly say 0 or 1 by the sign of that channel, agree about half the time,
    and acceptance lengths vary from step to step (a plain random draft is accepted ~never)."""
    g = torch.Generator().manual_seed(seed)
    ids = tuple(build_target_layer_ids(layers, draft_layers))
    shape = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16)
    target = DecoderLM(DecoderConfig(vocab_size=vocab, num_hidden_layers=layers, feature_layer_ids=ids, **shape))
    draft = DFlashDraft(DFlashDraftConfig(num_hidden_layers=draft_layers, target_layer_ids=ids,
                                          mask_token_id=vocab - 1, block_size=block_size, **shape))
    with torch.no_grad():
        for model in (target, draft):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
        if coin:
            target.model.norm.weight[0] = draft.norm.weight[0] = coin
            target.lm_head.weight[:, 0] = 0.0
            target.lm_head.weight[:2, 0] = torch.tensor([1.0, -1.0])
    return target.eval(), draft.eval()


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (n,), generator=g) for n in lengths]


def ar_greedy(target, prompt, max_new_tokens, stop_token_ids=()):
    """The target's own greedy decoding, one token per forward over a private copy's static cache."""
    model = copy.deepcopy(target)
    model.setup_cache(1, len(prompt) + max_new_tokens)
    device = model.lm_head.weight.device
    seq, n = list(prompt.tolist()), len(prompt)
    with torch.no_grad():
        logits = model(prompt[None].to(device), positions=torch.arange(n, device=device)[None]).logits[0, -1]
        for i in range(max_new_tokens):
            seq.append(int(logits.argmax()))
            if seq[-1] in stop_token_ids or i == max_new_tokens - 1:
                break
            ids, pos = torch.tensor([[seq[-1]]], device=device), torch.tensor([[n + i]], device=device)
            logits = model(ids, positions=pos).logits[0, -1]
    return seq


def one_thread():
    """The test machine is shared: one intra-op thread is many times faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
