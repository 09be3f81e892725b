"""Token choice and acceptance for a batch of blocks: greedy (DFLASH, design §6) and speculative rejection
sampling (z-lab's `_rejection_sample`, one row per sequence, each row with its own number of draft tokens).

Block tensors are in *logical* order: offset 0 is the last committed token, offsets 1..b-1 the draft tokens;
target logits/probs at offset o predict the token at offset o + 1. `gamma` [n] is how many draft tokens of each
row count (offsets past 1 + gamma lie beyond the row's length limit and are never accepted).
"""

import torch


def sampling_probs(logits, temperature, top_p=1.0, top_k=0):
    """z-lab's `_sampling_probs`: softmax(logits / T) in fp32 restricted to the top_k tokens, then to the smallest
    prefix of the sorted distribution whose mass before a token stays below top_p; renormalised."""
    scores = logits.float() / temperature
    indices = None
    if 0 < top_k < scores.shape[-1]:
        scores, indices = torch.topk(scores, top_k, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs * (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if indices is not None:
        probs = torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter(-1, indices, probs)
    return probs


def sample_probs(probs, generator=None):
    """One token per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def choose(logits, temperature, top_p, top_k, generator=None):
    """Argmax at temperature 0, else a sample of `sampling_probs`; returns (tokens, probs or None)."""
    if temperature == 0:
        return logits.argmax(-1), None
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return sample_probs(probs, generator), probs


def _accepted(accept, gamma):
    """Length of the all-true prefix of accept [n, b-1], counting only the first gamma entries of each row."""
    offsets = torch.arange(accept.shape[1], device=accept.device)
    return (accept & (offsets < gamma[:, None])).to(torch.int64).cumprod(dim=1).sum(dim=1)


def accept_greedy(draft_tokens, target_logits, gamma):
    """draft_tokens [n, b-1], target_logits [n, b, V] -> (accepted [n], bonus [n]):
    accepted = cumprod(draft == argmax(target)[:-1]).sum(), bonus = argmax(target)[accepted]."""
    posterior = target_logits.argmax(-1)
    accepted = _accepted(draft_tokens == posterior[:, :-1], gamma)
    return accepted, posterior.gather(1, accepted[:, None])[:, 0]


def accept_rejection(draft_tokens, target_probs, draft_probs, gamma, generator=None):
    """Speculative rejection sampling: draft token x_j (drawn from q_j) is kept while u_j·q_j(x_j) < p_j(x_j);
    at the first rejection the bonus is drawn from max(p - q, 0) renormalised (p where that is all zero); when all
    gamma drafts are kept, from p at offset gamma. The committed tokens are distributed exactly as the target's.
    target_probs [n, b, V], draft_probs [n, b-1, V] -> (accepted [n], bonus [n])."""
    n, gamma_max = draft_tokens.shape
    p = target_probs[:, :gamma_max].gather(-1, draft_tokens[..., None])[..., 0]
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=q.dtype)
    accepted = _accepted(u * q < p, gamma)
    rows = torch.arange(n, device=accepted.device)
    target_row = target_probs[rows, accepted]
    # The draft distribution at the rejected offset; zero when every counted draft was kept.
    padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    draft_row = padded[rows, accepted] * (accepted < gamma)[:, None]
    residual = (target_row - draft_row).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp_min(torch.finfo(residual.dtype).tiny), target_row)
    return accepted, sample_probs(residual, generator)
