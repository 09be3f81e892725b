"""Kernel benchmark cases: dflash.attention at the Qwen3-8B-DFlash-b16 shapes over a static KV cache.

Draft: 16 block queries see the whole visible prefix (non_causal). Verify: 16 queries see the prefix and the
block causally. Every case's static cache has one size, the largest prefix + `STALE` slots; the slots past a
case's visible prefix hold finite garbage, as a static cache does. q and the cache rotate (harness.py): every
timed call reads a cache that is not in L2.
Variants: 'sdpa' (F.scaled_dot_product_attention on the valid prefix with enable_gqa, as SGLang's fallback
would: the host knows the prefix length), 'inductor' (torch.compile of an eager attention over the whole cache
with the index mask), 'dflash' (the Triton provider). Anchors on H100 (docs §9): draft SDPA 20.9 µs at cache
1024, 112 µs at 8192; floor 1.4 / 11 µs.
"""

import torch

from .case import KERNEL_GRAPH_CALLS, Case, Rotation
from torch_dflash.compiler.ops.attention import attention_reference, visibility
from torch_dflash.compiler.triton.attention import attention_triton

QWEN3_8B = dict(n_q=32, n_kv=8, head_dim=128, queries=16, prefixes=(1024, 8192))
TINY = dict(n_q=4, n_kv=2, head_dim=64, queries=4, prefixes=(24, 70))
STALE = 64


def index_mask_attention(q, k, v, key_limit, scale: float):
    """Eager attention over the whole static cache; query i sees the keys at index <= key_limit[:, i]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = torch.arange(k.shape[2], device=q.device) <= key_limit[:, None, :, None]
    scores = (q @ k.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs.to(v.dtype) @ v


def _case(kind: str, prefix: int, cache: int, n_q: int, n_kv: int, head_dim: int, queries: int, device,
          compiled) -> Case:
    dtype = torch.bfloat16
    g = torch.Generator(device).manual_seed(prefix)
    causal = kind == "causal"
    visible = prefix + queries if causal else prefix        # draft: the block's keys are inside the prefix

    def make_inputs():
        """q, the static cache k, v, and their valid prefixes (views) for SDPA: one input set."""
        q = torch.randn(1, n_q, queries, head_dim, generator=g, device=device).to(dtype)
        k, v = (torch.randn(1, n_kv, cache, head_dim, generator=g, device=device).to(dtype) for _ in range(2))
        return q, k, v, k[:, :, :visible], v[:, :, :visible]

    inputs = Rotation(make_inputs)
    q_pos = torch.arange(visible - queries, visible, device=device)[None]
    key_limit = q_pos if causal else q_pos[:, -1:].expand(-1, queries)
    scale = head_dim ** -0.5
    sdpa_mask = visibility(kind, 0, q_pos, queries, visible, device) if causal else None

    def sdpa():
        q, _, _, k_valid, v_valid = inputs.current
        return torch.nn.functional.scaled_dot_product_attention(q, k_valid, v_valid, attn_mask=sdpa_mask,
                                                                scale=scale, enable_gqa=True)

    def check():
        q, k, v = inputs.current[:3]
        want = attention_reference(q, k, v, kind, scale, q_pos=q_pos).float()
        got = attention_triton(q, k, v, kind, scale, q_pos=q_pos).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    step = "verify" if causal else "draft"
    return Case(
        suite="kernels", name=f"attention {step} {kind} prefix={prefix}",
        variants={"sdpa": sdpa, "inductor": lambda: compiled(*inputs.current[:3], key_limit, scale),
                  "dflash": lambda: attention_triton(*inputs.current[:3], kind, scale, q_pos=q_pos)},
        check=check,
        floor_bytes=(2 * visible * n_kv + 2 * queries * n_q) * head_dim * dtype.itemsize,
        floor_flops=4 * n_q * queries * visible * head_dim,
        use_cuda_graph=True,
        graph_calls=KERNEL_GRAPH_CALLS,
        notes=f"{n_q}/{n_kv} heads, hd {head_dim}, {queries} queries, bf16, {visible} visible keys in a static "
              f"cache of {cache}",
        extra={"kind": kind, "visible_keys": visible, "cache": cache},
        rotation=inputs)


def cases(device="cuda", small: bool = False) -> list[Case]:
    """Draft (non_causal) and verify (causal) attention at two prefix lengths over one static cache (the
    largest prefix + the block + STALE slots); `small` gives tiny shapes that run on CPU."""
    shape = dict(TINY if small else QWEN3_8B)
    prefixes = shape.pop("prefixes")
    cache = max(prefixes) + shape["queries"] + STALE
    compiled = torch.compile(index_mask_attention, dynamic=False)     # one graph: every case has the same shapes
    return [_case(kind, p, cache, **shape, device=device, compiled=compiled)
            for kind in ("non_causal", "causal") for p in prefixes]
