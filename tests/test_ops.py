"""torch.ops.dflash.* against formulas written independently of compiler/ops (transformers modules, complex
rotation, explicit loops), in fp32 and bf16, and through the machinery that traces them: torch.library.opcheck,
torch.export with dynamic dims, torch.compile(dynamic=True). Property tests are deterministic (hypothesis
`derandomize=True`); TORCH_DFLASH_HYPOTHESIS_EXAMPLES raises the example count (default 25).
"""

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

import torch_dflash  # noqa: F401  (registers torch.ops.dflash)
from torch_dflash.errors import InputError

ops = torch.ops.dflash
EXAMPLES = int(os.environ.get("TORCH_DFLASH_HYPOTHESIS_EXAMPLES", "25"))
property_test = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16_REL = 2e-2
EPS = 1e-6
seeds = st.integers(0, 2**31 - 1)


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def rope_angles(positions: torch.Tensor, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ[..., rot_dim/2] = position · base^(-2i/rot_dim), the HF default rope frequencies."""
    inv_freq = base ** -(torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    return positions[..., None].double() * inv_freq


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos/sin [..., rot_dim]: each half holds the same angles."""
    doubled = torch.cat((angles, angles), -1)
    return doubled.cos().float(), doubled.sin().float()


def random_positions(g: torch.Generator, b: int, s: int, high: int = 4096) -> torch.Tensor:
    return torch.randint(0, high, (b, s), generator=g)


# --------------------------------------------------------------------------------------------------------
# fp32: each op against an independent spelling
# --------------------------------------------------------------------------------------------------------

@property_test
@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), d=st.integers(1, 64),
       with_weight=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]), magnitude=st.sampled_from([1e-3, 1.0, 1e2]))
def test_rms_norm_matches_functional_rms_norm(seed, lead, d, with_weight, eps, magnitude):
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, *lead, d, scale=magnitude), randn(g, d) if with_weight else None
    expected = F.rms_norm(x.double(), (d,), None if w is None else w.double(), eps)
    torch.testing.assert_close(ops.rms_norm(x, w, eps), expected.float(), **FP32)


@property_test
@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), vocab=st.integers(1, 40),
       d=st.integers(1, 64), with_weight=st.booleans(), int32=st.booleans())
def test_embedding_rms_norm_matches_indexing_then_functional_rms_norm(seed, lead, vocab, d, with_weight, int32):
    g = torch.Generator().manual_seed(seed)
    table, w = randn(g, vocab, d), randn(g, d) if with_weight else None
    ids = torch.randint(0, vocab, lead, generator=g, dtype=torch.int32 if int32 else torch.int64)
    embeds, normed = ops.embedding_rms_norm(table, ids, w, EPS)
    assert torch.equal(embeds, table[ids.long()])
    expected = F.rms_norm(table[ids.long()].double(), (d,), None if w is None else w.double(), EPS)
    torch.testing.assert_close(normed, expected.float(), **FP32)


@property_test
@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), k=st.integers(1, 32),
       inter=st.integers(1, 16), bias=st.booleans())
def test_linear_silu_mul_matches_a_swiglu_front_of_two_linears(seed, lead, k, inter, bias):
    """silu(gate_proj(x)) · up_proj(x) (Llama / Qwen3 MLP) with gate_proj and up_proj stacked into one weight."""
    g = torch.Generator().manual_seed(seed)
    x, w_gate, w_up = randn(g, *lead, k), randn(g, inter, k), randn(g, inter, k)
    b_gate, b_up = (randn(g, inter), randn(g, inter)) if bias else (None, None)
    expected = F.silu(F.linear(x.double(), w_gate.double(), None if b_gate is None else b_gate.double())) * \
        F.linear(x.double(), w_up.double(), None if b_up is None else b_up.double())
    got = ops.linear_silu_mul(x, torch.cat([w_gate, w_up]), None if b_gate is None else torch.cat([b_gate, b_up]))
    torch.testing.assert_close(got, expected.float(), **FP32)


@property_test
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), k=st.integers(1, 32),
       groups=st.integers(1, 3), bias=st.booleans(), magnitude=st.sampled_from([1e-2, 1.0, 1e2]))
def test_linear_add_norm_stats_is_the_residual_sum_and_its_rms_norm_in_parts(seed, lead, k, groups, bias,
                                                                             magnitude):
    """s = down(x) + residual; s · w and s's sums of squares per 64 columns (a loop), and the norm they finish —
    s_w · rsqrt(Σ sumsq / N + eps) — is Qwen3RMSNorm(s)."""
    g = torch.Generator().manual_seed(seed)
    n = 64 * groups
    x, w, residual = randn(g, *lead, k), randn(g, n, k, scale=k ** -0.5), randn(g, *lead, n, scale=magnitude)
    b = randn(g, n) if bias else None
    norm = qwen3_norm(g, n)
    total, weighted, sumsq = ops.linear_add_norm_stats(x, w, b, residual, norm.weight.detach())
    want = F.linear(x.double(), w.double(), None if b is None else b.double()) + residual.double()
    torch.testing.assert_close(total, want.float(), **FP32)
    torch.testing.assert_close(weighted, (want * norm.weight.detach().double()).float(), **FP32)
    loops = torch.stack([want[..., 64 * i:64 * (i + 1)].pow(2).sum(-1) for i in range(groups)], -1)
    torch.testing.assert_close(sumsq, loops.float(), rtol=1e-5, atol=1e-5 * magnitude ** 2)
    finished = weighted * torch.rsqrt(sumsq.sum(-1, keepdim=True) / n + EPS)
    with torch.no_grad():
        torch.testing.assert_close(finished, norm(total), **FP32)


@property_test
@given(seed=seeds, b=st.integers(1, 3), s=st.integers(1, 6), half=st.integers(1, 64), bf16=st.booleans(),
       theta=st.sampled_from([1e4, 1e6]))
def test_rope_cos_sin_equals_transformers_rotary_embedding(seed, b, s, half, bf16, theta):
    """Qwen3RotaryEmbedding's cos/sin at positions up to 131072, bit for bit: the same fp32 steps, one cast."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    rotary = Qwen3RotaryEmbedding(Qwen3Config(head_dim=2 * half, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": theta}))
    dtype = torch.bfloat16 if bf16 else torch.float32
    positions = torch.randint(0, 131072, (b, s), generator=torch.Generator().manual_seed(seed))
    expected = rotary(torch.zeros(1, dtype=dtype), positions)
    got = ops.rope_cos_sin(positions, rotary.inv_freq, rotary.attention_scaling, dtype)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@property_test
@given(seed=seeds, b=st.integers(1, 3), s=st.integers(1, 5), h=st.integers(1, 4), half=st.integers(1, 8),
       unrotated=st.integers(0, 6))
def test_rope_matches_complex_rotation(seed, b, s, h, half, unrotated):
    """Neox pairs (x_i, x_{i+rot/2}) rotate as the complex number x_i + j·x_{i+rot/2} times e^{jθ_i};
    channels past rot_dim pass through (partial rotary)."""
    g = torch.Generator().manual_seed(seed)
    x = randn(g, b, s, h, 2 * half + unrotated)
    angles = rope_angles(random_positions(g, b, s), 2 * half)
    pairs = torch.complex(x[..., :half].double(), x[..., half:2 * half].double())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles).unsqueeze(-2)
    expected = torch.cat((rotated.real, rotated.imag, x[..., 2 * half:].double()), -1)
    torch.testing.assert_close(ops.rope(x, *rope_tables(angles)), expected.float(), **FP32)


def linear(g: torch.Generator, n_in: int, n_out: int, bias: bool) -> torch.nn.Linear:
    layer = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(randn(g, n_out, n_in, scale=n_in ** -0.5))
        if bias:
            layer.bias.copy_(randn(g, n_out))
    return layer


def qwen3_norm(g: torch.Generator, head_dim: int) -> Qwen3RMSNorm:
    norm = Qwen3RMSNorm(head_dim, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(g, head_dim))
    return norm


@property_test
@given(seed=seeds, b=st.integers(1, 2), s=st.integers(1, 5), hidden=st.integers(1, 24), n_kv=st.integers(1, 3),
       group=st.integers(1, 3), half=st.integers(1, 8), bias=st.booleans(), with_norm=st.booleans())
def test_qkv_norm_rope_matches_hf_qwen3_attention_prologue(seed, b, s, hidden, n_kv, group, half, bias, with_norm):
    """transformers Qwen3Attention: three linears, q_norm/k_norm per head, apply_rotary_pos_emb (Llama: no norms)."""
    g = torch.Generator().manual_seed(seed)
    hd, n_q = 2 * half, n_kv * group
    x = randn(g, b, s, hidden)
    q_proj, k_proj, v_proj = (linear(g, hidden, n * hd, bias) for n in (n_q, n_kv, n_kv))
    q_norm, k_norm = (qwen3_norm(g, hd), qwen3_norm(g, hd)) if with_norm else (torch.nn.Identity(),) * 2
    cos, sin = rope_tables(rope_angles(random_positions(g, b, s), hd))

    q = q_norm(q_proj(x).view(b, s, -1, hd)).transpose(1, 2)
    k = k_norm(k_proj(x).view(b, s, -1, hd)).transpose(1, 2)
    v = v_proj(x).view(b, s, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)

    w_qkv = torch.cat([p.weight for p in (q_proj, k_proj, v_proj)])
    b_qkv = torch.cat([p.bias for p in (q_proj, k_proj, v_proj)]) if bias else None
    norm_ws = (q_norm.weight, k_norm.weight) if with_norm else (None, None)
    with torch.no_grad():
        got = ops.qkv_norm_rope(x, w_qkv, b_qkv, *norm_ws, EPS, cos, sin, n_q, n_kv, hd)
        for out, ref in zip(got, (q, k, v)):
            torch.testing.assert_close(out, ref.transpose(1, 2), **FP32)


@property_test
@given(seed=seeds, b=st.integers(1, 2), c=st.integers(1, 6), hidden=st.integers(1, 24), n_kv=st.integers(1, 3),
       half=st.integers(1, 8), bias=st.booleans(), with_norm=st.booleans())
def test_kv_materialize_matches_zlab_context_path(seed, b, c, hidden, n_kv, half, bias, with_norm):
    """z-lab Qwen3DFlashAttention on the context features: k_proj/v_proj, k_norm, rope of k only."""
    g = torch.Generator().manual_seed(seed)
    hd = 2 * half
    ctx = randn(g, b, c, hidden)
    k_proj, v_proj = linear(g, hidden, n_kv * hd, bias), linear(g, hidden, n_kv * hd, bias)
    k_norm = qwen3_norm(g, hd) if with_norm else torch.nn.Identity()
    cos, sin = rope_tables(rope_angles(random_positions(g, b, c), hd))

    k = k_norm(k_proj(ctx).view(b, c, -1, hd)).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    v = v_proj(ctx).view(b, c, -1, hd)

    w_kv = torch.cat([k_proj.weight, v_proj.weight])
    b_kv = torch.cat([k_proj.bias, v_proj.bias]) if bias else None
    with torch.no_grad():
        got_k, got_v = ops.kv_materialize(ctx, w_kv, b_kv, k_norm.weight if with_norm else None, EPS, cos, sin,
                                          n_kv, hd)
        torch.testing.assert_close(got_k, k.transpose(1, 2), **FP32)
        torch.testing.assert_close(got_v, v, **FP32)


def hyper_connection(g: torch.Generator, n: int, d: int, iters: int, hc_eps: float) -> DeepseekV4HyperConnection:
    config = DeepseekV4Config(hidden_size=d, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=hc_eps, rms_norm_eps=EPS)
    hc = DeepseekV4HyperConnection(config)
    with torch.no_grad():
        hc.fn.copy_(randn(g, *hc.fn.shape, scale=(n * d) ** -0.5))
        hc.base.copy_(randn(g, *hc.base.shape))
        hc.scale.copy_(1 + randn(g, 3, scale=0.5))
    return hc


def random_mix(g: torch.Generator, lead: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """post [..., n] in (0, 2) and a positive comb [..., n, n] with rows and columns near 1, like mhc_pre's."""
    post = 2 * torch.rand(*lead, n, generator=g)
    comb = torch.softmax(randn(g, *lead, n, n), -1)
    return post, comb / comb.sum(-2, keepdim=True)


def hf_post_mix(x, res, post, comb):
    """DeepseekV4DecoderLayer's spelling of hc_post."""
    return post.unsqueeze(-1) * x.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), res)


# Sinkhorn needs no looser tolerance: the op runs the same fp32 operations in the same order as transformers
# (unweighted norm, projection, sigmoid/softmax, 1..20 Sinkhorn rounds), bit-identical on this CPU; 1e-5 holds.
@property_test
@given(seed=seeds, b=st.integers(1, 2), s=st.integers(1, 4), n=st.integers(1, 4), d=st.integers(1, 16),
       iters=st.integers(1, 20), hc_eps=st.sampled_from([1e-6, 1e-3]))
def test_mhc_pre_matches_transformers_hyper_connection(seed, b, s, n, d, iters, hc_eps):
    g = torch.Generator().manual_seed(seed)
    hc = hyper_connection(g, n, d, iters, hc_eps)
    res = randn(g, b, s, n, d)
    with torch.no_grad():
        post, comb, collapsed = hc(res)
        got = ops.mhc_pre(res, hc.fn, hc.base, hc.scale, EPS, hc_eps, iters)
    for out, ref in zip(got, (collapsed, post, comb)):
        torch.testing.assert_close(out, ref, **FP32)


@property_test
@given(seed=seeds, t=st.integers(1, 4), n=st.integers(1, 4), d=st.integers(1, 8))
def test_mhc_post_matches_loops_and_transformers_spelling(seed, t, n, d):
    """new_res[j] = post_j·x + Σ_i comb[i, j]·res[i]: comb is [source, destination]."""
    g = torch.Generator().manual_seed(seed)
    x, res = randn(g, t, d), randn(g, t, n, d)
    post, comb = random_mix(g, (t,), n)
    looped = torch.zeros(t, n, d, dtype=torch.float64)
    for token in range(t):
        for j in range(n):
            looped[token, j] = post[token, j].double() * x[token].double()
            for i in range(n):
                looped[token, j] += comb[token, i, j].double() * res[token, i].double()
    got = ops.mhc_post(x, res, post, comb)
    torch.testing.assert_close(got, looped.float(), **FP32)
    torch.testing.assert_close(got, hf_post_mix(x, res, post, comb), **FP32)


@property_test
@given(seed=seeds, b=st.integers(1, 2), s=st.integers(1, 4), n=st.integers(1, 4), d=st.integers(1, 16),
       iters=st.integers(1, 20))
def test_mhc_post_pre_matches_transformers_composition(seed, b, s, n, d, iters):
    """hc_post of sublayer L (decoder-layer spelling) → the next DeepseekV4HyperConnection → DeepseekV4RMSNorm."""
    g = torch.Generator().manual_seed(seed)
    hc = hyper_connection(g, n, d, iters, 1e-6)
    norm = DeepseekV4RMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(g, d))
    x, res = randn(g, b, s, d), randn(g, b, s, n, d)
    post, comb = random_mix(g, (b, s), n)
    with torch.no_grad():
        new_res = hf_post_mix(x, res, post, comb)
        post_next, comb_next, collapsed = hc(new_res)
        expected = (new_res, norm(collapsed), post_next, comb_next)
        got = ops.mhc_post_pre(x, res, post, comb, hc.fn, hc.base, hc.scale, norm.weight, EPS, 1e-6, iters, 1e-5)
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out, ref, **FP32)


def visibility_by_loops(kind: str, window: int, q_pos: torch.Tensor, sk: int) -> torch.Tensor:
    """[B, Sq, Sk] bool, one key at a time, from the definitions in compiler/ops/attention.py's docstring."""
    b, sq = q_pos.shape
    visible = torch.zeros(b, sq, sk, dtype=torch.bool)
    for row in range(b):
        last = int(q_pos[row, -1])
        for i in range(sq):
            p = int(q_pos[row, i])
            for key in range(sk):
                if kind == "non_causal":
                    visible[row, i, key] = key <= last
                elif kind == "causal":
                    visible[row, i, key] = key <= p
                else:
                    visible[row, i, key] = key <= p and p - key < window
    return visible


def softmax_attention(q, k, v, scale, additive):
    """softmax(Q·Kᵀ·scale + mask)·V in float64, kv heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale + additive.double()
    return torch.softmax(scores, -1) @ v


def additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))


@property_test
@given(seed=seeds, kind=st.sampled_from(["non_causal", "causal", "sliding", "custom_bool", "custom_additive"]),
       b=st.integers(1, 3), n_kv=st.integers(1, 2), group=st.integers(1, 3), sq=st.integers(1, 5),
       extra_keys=st.integers(0, 6), d=st.integers(1, 16), ragged=st.booleans(), window=st.integers(1, 6),
       scale=st.floats(0.05, 1.0))
def test_attention_matches_explicit_softmax(seed, kind, b, n_kv, group, sq, extra_keys, d, ragged, window, scale):
    """Ragged q_pos: each batch row's block starts at its own offset in a cache of Sk keys (the rest is padding);
    otherwise q_pos is None and the queries are the last Sq keys."""
    g = torch.Generator().manual_seed(seed)
    sk = sq + extra_keys
    q, k, v = randn(g, b, n_kv * group, sq, d), randn(g, b, n_kv, sk, d), randn(g, b, n_kv, sk, d)
    offsets = torch.randint(0, extra_keys + 1, (b, 1), generator=g) if ragged else torch.full((b, 1), extra_keys)
    positions = offsets + torch.arange(sq)
    q_pos = positions if ragged else None

    if kind.startswith("custom"):
        visible = torch.rand(b, sq, sk, generator=g) < 0.6
        visible[torch.arange(b)[:, None], torch.arange(sq), positions] = True  # every query sees some key
        bias = additive(visible) + (randn(g, b, sq, sk).double() if kind == "custom_additive" else 0)
        mask = (visible if kind == "custom_bool" else bias.float())[:, None]
        got = ops.attention(q, k, v, "custom", scale, mask=mask, q_pos=q_pos)
    else:
        bias = additive(visibility_by_loops(kind, window, positions, sk))
        got = ops.attention(q, k, v, kind, scale, window=window if kind == "sliding" else 0, q_pos=q_pos)
    expected = softmax_attention(q, k, v, scale, bias[:, None])
    torch.testing.assert_close(got, expected.float(), **FP32)


# --------------------------------------------------------------------------------------------------------
# One sample per op (and per attention kind), shared by the bf16, opcheck, export and compile tests.
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    op: Callable                      # torch.ops.dflash.<name>
    make: Callable[..., tuple]        # (generator, batch, seq, keys) -> the op's full argument tuple
    dynamic: Callable[..., tuple]     # (B, S, K) Dims -> the dynamic_shapes entry of each tensor argument
    fp32_outputs: tuple[int, ...] = ()  # outputs that are fp32 by contract whatever the activation dtype
    mutated: tuple[int, ...] = ()       # arguments the op writes (KV caches): compared like outputs


def _tables(g, b, s, rot_dim):
    return rope_tables(rope_angles(random_positions(g, b, s), rot_dim))


def _mhc_weights(g, n, d):
    return randn(g, (2 + n) * n, n * d, scale=(n * d) ** -0.5), randn(g, (2 + n) * n), 1 + randn(g, 3, scale=0.5)


def _attention(kind, window=0):
    def make(g, b, s, k):
        q_pos = torch.randint(0, k - s + 1, (b, 1), generator=g) + torch.arange(s)
        mask = (torch.rand(b, 1, s, k, generator=g) < 0.7) | (torch.arange(k) == q_pos[:, None, :, None])
        return (randn(g, b, 4, s, 8), randn(g, b, 2, k, 8), randn(g, b, 2, k, 8), kind, 0.35, window,
                mask if kind == "custom" else None, q_pos)

    def dynamic(B, S, K):
        mask = ({0: B, 2: S, 3: K},) if kind == "custom" else ()
        return ({0: B, 2: S}, {0: B, 2: K}, {0: B, 2: K}, *mask, {0: B, 1: S})
    return Sample(ops.attention, make, dynamic)


SAMPLES = {
    "rms_norm": Sample(
        ops.rms_norm, lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 16), EPS),
        lambda B, S, K: ({0: B, 1: S}, None)),
    "add_rms_norm": Sample(
        ops.add_rms_norm, lambda g, b, s, k: (randn(g, b, s, 16), randn(g, b, s, 16), randn(g, 16), EPS),
        lambda B, S, K: ({0: B, 1: S}, {0: B, 1: S}, None)),
    "embedding_rms_norm": Sample(
        ops.embedding_rms_norm, lambda g, b, s, k: (randn(g, 32, 16), torch.randint(0, 32, (b, s), generator=g),
                                                     randn(g, 16), EPS),
        lambda B, S, K: (None, {0: B, 1: S}, None)),
    "silu_mul": Sample(
        ops.silu_mul, lambda g, b, s, k: (randn(g, b, s, 24), randn(g, b, s, 24)),
        lambda B, S, K: ({0: B, 1: S}, {0: B, 1: S})),
    "rope_cos_sin": Sample(  # the tables' dtype is an argument (fp32 here), whatever inv_freq's
        ops.rope_cos_sin, lambda g, b, s, k: (random_positions(g, b, s), 1e4 ** -(torch.arange(0, 8, 2) / 8), 1.0,
                                              torch.float32),
        lambda B, S, K: ({0: B, 1: S}, None), fp32_outputs=(0, 1)),
    "joined_rope_cos_sin": Sample(  # the keys' dim stands for the front's length
        ops.joined_rope_cos_sin, lambda g, b, s, k: (random_positions(g, b, k), random_positions(g, b, s),
                                                     1e4 ** -(torch.arange(0, 8, 2) / 8), 1.0, torch.float32),
        lambda B, S, K: ({0: B, 1: K}, {0: B, 1: S}, None), fp32_outputs=(1, 2)),
    "rope": Sample(  # partial rotary: 6 of 8 channels
        ops.rope, lambda g, b, s, k: (randn(g, b, s, 2, 8), *_tables(g, b, s, 6)),
        lambda B, S, K: ({0: B, 1: S},) * 3),
    "qkv_norm_rope": Sample(
        ops.qkv_norm_rope,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 64, 16, scale=0.25), randn(g, 64), 1 + randn(g, 8),
                            1 + randn(g, 8), EPS, *_tables(g, b, s, 8), 4, 2, 8),
        lambda B, S, K: ({0: B, 1: S}, None, None, None, None, {0: B, 1: S}, {0: B, 1: S})),
    "qkv_norm_rope_cache": Sample(  # k/v into caches of `keys` slots at distinct positions per row
        ops.qkv_norm_rope_cache,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 64, 16, scale=0.25), randn(g, 64), 1 + randn(g, 8),
                            1 + randn(g, 8), EPS, *_tables(g, b, s, 8), 4, 2, 8, randn(g, b, 2, k, 8),
                            randn(g, b, 2, k, 8), torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(b)])),
        lambda B, S, K: ({0: B, 1: S}, None, None, None, None, {0: B, 1: S}, {0: B, 1: S}, {0: B, 2: K},
                         {0: B, 2: K}, {0: B, 1: S}), mutated=(11, 12)),
    "kv_materialize": Sample(
        ops.kv_materialize,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 32, 16, scale=0.25), None, 1 + randn(g, 8), EPS,
                            *_tables(g, b, s, 8), 2, 8),
        lambda B, S, K: ({0: B, 1: S}, None, None, {0: B, 1: S}, {0: B, 1: S})),
    "kv_materialize_cache": Sample(  # the context's k/v into caches of `keys` slots, distinct positions per row
        ops.kv_materialize_cache,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 32, 16, scale=0.25), None, 1 + randn(g, 8), EPS,
                            *_tables(g, b, s, 8), 2, 8, randn(g, b, 2, k, 8), randn(g, b, 2, k, 8),
                            torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(b)])),
        lambda B, S, K: ({0: B, 1: S}, None, None, {0: B, 1: S}, {0: B, 1: S}, {0: B, 2: K}, {0: B, 2: K},
                         {0: B, 1: S}), mutated=(9, 10)),
    "context_qkv_norm_rope_cache": Sample(  # a 3-row context in front of the block; positions repeat when k < s + 3
        ops.context_qkv_norm_rope_cache,
        lambda g, b, s, k: (randn(g, b, 3, 16), randn(g, b, s, 16), randn(g, 64, 16, scale=0.25), randn(g, 64),
                            1 + randn(g, 8), 1 + randn(g, 8), EPS, *_tables(g, b, s + 3, 8), 4, 2, 8,
                            randn(g, b, 2, k, 8), randn(g, b, 2, k, 8),
                            torch.stack([torch.randperm(max(k, s + 3), generator=g)[:s + 3] % k for _ in range(b)])),
        lambda B, S, K: ({0: B}, {0: B, 1: S}, None, None, None, None, {0: B, 1: S + 3}, {0: B, 1: S + 3},
                         {0: B, 2: K}, {0: B, 2: K}, {0: B, 1: S + 3}), mutated=(12, 13)),
    "mhc_pre": Sample(
        ops.mhc_pre, lambda g, b, s, k: (randn(g, b, s, 4, 8), *_mhc_weights(g, 4, 8), EPS, EPS, 20),
        lambda B, S, K: ({0: B, 1: S}, None, None, None), fp32_outputs=(1, 2)),
    "mhc_post": Sample(
        ops.mhc_post, lambda g, b, s, k: (randn(g, b, s, 8), randn(g, b, s, 4, 8), *random_mix(g, (b, s), 4)),
        lambda B, S, K: ({0: B, 1: S},) * 4),
    "mhc_post_pre": Sample(
        ops.mhc_post_pre,
        lambda g, b, s, k: (randn(g, b, s, 8), randn(g, b, s, 4, 8), *random_mix(g, (b, s), 4),
                            *_mhc_weights(g, 4, 8), 1 + randn(g, 8), EPS, EPS, 20, 1e-5),
        lambda B, S, K: ({0: B, 1: S},) * 4 + (None,) * 4, fp32_outputs=(2, 3)),
    "attention.non_causal": _attention("non_causal"),
    "attention.causal": _attention("causal"),
    "attention.sliding": _attention("sliding", window=3),
    "attention.custom": _attention("custom"),
    "linear": Sample(
        ops.linear, lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 24, 16, scale=0.25), randn(g, 24)),
        lambda B, S, K: ({0: B, 1: S}, None, None)),
    "linear_silu_mul": Sample(
        ops.linear_silu_mul, lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 48, 16, scale=0.25), randn(g, 48)),
        lambda B, S, K: ({0: B, 1: S}, None, None)),
    "add_rms_norm_linear_silu_mul": Sample(
        ops.add_rms_norm_linear_silu_mul,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, b, s, 16), 1 + randn(g, 16, scale=0.1), EPS,
                            randn(g, 48, 16, scale=0.25), randn(g, 48)),
        lambda B, S, K: ({0: B, 1: S}, {0: B, 1: S}, None, None, None)),
    "linear_add_norm_stats": Sample(  # 128 columns: two groups of 64 per row
        ops.linear_add_norm_stats,
        lambda g, b, s, k: (randn(g, b, s, 16), randn(g, 128, 16, scale=0.25), randn(g, 128), randn(g, b, s, 128),
                            1 + randn(g, 128, scale=0.1)),
        lambda B, S, K: ({0: B, 1: S}, None, None, {0: B, 1: S}, None), fp32_outputs=(2,)),
    "qkv_norm_rope_cache.x_sumsq": Sample(  # x: weighted rows of width 64, their norm finished from x_sumsq
        ops.qkv_norm_rope_cache,
        lambda g, b, s, k: (randn(g, b, s, 64), randn(g, 64, 64, scale=0.125), None, 1 + randn(g, 8),
                            1 + randn(g, 8), EPS, *_tables(g, b, s, 8), 4, 2, 8, randn(g, b, 2, k, 8),
                            randn(g, b, 2, k, 8), torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(b)]),
                            1 + 64 * randn(g, b, s, 1).abs(), EPS),
        lambda B, S, K: ({0: B, 1: S}, None, None, None, {0: B, 1: S}, {0: B, 1: S}, {0: B, 2: K}, {0: B, 2: K},
                         {0: B, 1: S}, {0: B, 1: S}), mutated=(11, 12)),
}
# Tracing tests need one attention kind without a mask and `custom` (the other kinds share the same fake).
TRACED = [name for name in SAMPLES if name not in ("attention.non_causal", "attention.sliding")]
FIRST, SECOND, SMALLEST = (5, 7, 9), (3, 6, 11), (1, 1, 1)  # (batch, seq, keys); FIRST avoids static sizes


def sample_args(name: str, shape: tuple[int, int, int], seed: int = 0) -> tuple:
    return SAMPLES[name].make(torch.Generator().manual_seed(seed), *shape)


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def results(sample: Sample, args: tuple) -> tuple:
    """What sample's op computes: its outputs, then the arguments it writes."""
    out = sample.op(*args)
    return (*(o for o in as_tuple(out) if o is not None), *(args[i] for i in sample.mutated))


def clones(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def floats_as(dtype: torch.dtype, args: tuple) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def assert_relative(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """max |out - ref| <= tol · max |ref| (relative to the tensor's scale, not per element)."""
    err, size = (out.double() - ref.double()).abs().max(), ref.double().abs().max()
    assert err <= tol * size, f"error {err:.3g} exceeds {tol} of the reference scale {size:.3g}"


@pytest.mark.parametrize("name", SAMPLES)
def test_bf16_stores_activation_dtype_within_tolerance_of_fp32(name):
    """bf16 inputs vs the fp32 op on the same (bf16-representable) values: the op's own rounding only."""
    sample = SAMPLES[name]
    args16 = floats_as(torch.bfloat16, sample_args(name, SECOND))
    ref, got = results(sample, floats_as(torch.float32, args16)), results(sample, args16)
    for i, (out, expected) in enumerate(zip(got, ref, strict=True)):
        if not out.is_floating_point():  # integer outputs (joined positions) are exact
            assert torch.equal(out, expected)
            continue
        assert out.dtype == (torch.float32 if i in sample.fp32_outputs else torch.bfloat16), (i, out.dtype)
        assert_relative(out, expected, BF16_REL)


def non_contiguous(a):
    """The same values in a transposed layout (dims 0 and 1) where that changes the strides."""
    if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[0] > 1 and a.shape[1] > 1:
        return a.transpose(0, 1).contiguous().transpose(0, 1)
    return a


@pytest.mark.parametrize("name", TRACED)
def test_opcheck(name):
    """Schema, fake vs real metadata (shapes, dtypes, strides, offsets), AOT dispatch with dynamic shapes; on
    non-contiguous inputs and on size-1 dims, where a fake's layout most easily disagrees with the real one."""
    op = SAMPLES[name].op.default
    torch.library.opcheck(op, tuple(map(non_contiguous, sample_args(name, FIRST))))
    torch.library.opcheck(op, sample_args(name, SMALLEST, seed=1), test_utils=("test_schema", "test_faketensor"))


class OpCall(torch.nn.Module):
    """Calls sample's op with the tensors given to forward in the tensor slots of `template`; the rest stay fixed.
    Returns `results`: the outputs, then the arguments the op writes."""

    def __init__(self, sample: Sample, template: tuple):
        super().__init__()
        self.sample = sample
        self.slots = [i for i, a in enumerate(template) if isinstance(a, torch.Tensor)]
        self.template = [None if isinstance(a, torch.Tensor) else a for a in template]

    def forward(self, *tensors):
        args = list(self.template)
        for slot, t in zip(self.slots, tensors):
            args[slot] = t
        return results(self.sample, tuple(args))


def tensors_of(args: tuple) -> tuple:
    return tuple(a for a in args if isinstance(a, torch.Tensor))


def assert_same(got, expected) -> None:
    for out, ref in zip(as_tuple(got), as_tuple(expected), strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", TRACED)
def test_export_with_dynamic_batch_and_sequence(name):
    """Exported once at FIRST; runs at other batch/seq/key counts, down to 1, equal to eager."""
    sample, first = SAMPLES[name], sample_args(name, FIRST)
    dims = Dim("batch", min=1, max=8), Dim("seq", min=1, max=64), Dim("keys", min=1, max=256)
    module = OpCall(sample, first)
    program = torch.export.export(module, clones(tensors_of(first)), dynamic_shapes=(sample.dynamic(*dims),))
    for shape in (SECOND, SMALLEST):
        args = tensors_of(sample_args(name, shape, seed=3))
        assert_same(program.module()(*clones(args)), module(*clones(args)))


@pytest.mark.parametrize("name", TRACED)
def test_compile_dynamic_traces_once_through_fake(name):
    """aot_eager with dynamic=True, one graph and no recompile for a second shape: the fake ran symbolically."""
    torch._dynamo.reset()
    sample = SAMPLES[name]
    module = OpCall(sample, sample_args(name, FIRST))
    compiled = torch.compile(module, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in (FIRST, SECOND):
        args = tensors_of(sample_args(name, shape, seed=4))
        with torch._dynamo.config.patch(error_on_recompile=shape != FIRST):
            assert_same(compiled(*clones(args)), module(*clones(args)))


# --------------------------------------------------------------------------------------------------------
# Errors a caller can make: InputError with one sentence, in eager and under fake tensors (export/compile).
# --------------------------------------------------------------------------------------------------------

def _qkv_args_with_wrong_width() -> tuple:
    args = list(sample_args("qkv_norm_rope", FIRST))
    args[1] = args[1][:-8]  # one head short
    return tuple(args)


def _qkv_args_with_sumsq(shape: tuple[int, ...]) -> tuple:
    args = list(sample_args("qkv_norm_rope_cache.x_sumsq", FIRST))
    args[-2] = torch.ones(shape)
    return tuple(args)


def _attention_args(kind: str, window: int = 0) -> tuple:
    q, k, v = (randn(torch.Generator().manual_seed(i), 1, 2, 3, 4) for i in range(3))
    return q, k, v, kind, 0.5, window


ERRORS = {  # case -> (op, args, message)
    "unknown kind": (ops.attention, _attention_args("bidirectional"), r"kind 'bidirectional' is not one of"),
    "custom without mask": (ops.attention, _attention_args("custom"), r"a mask is given iff kind is custom"),
    "sliding window 0": (ops.attention, _attention_args("sliding", 0), r"sliding needs window > 0, got 0"),
    "qkv weight width": (ops.qkv_norm_rope, _qkv_args_with_wrong_width(),
                         r"qkv_norm_rope: weight has 56 rows, expected 8×8"),
    "embedding ids dtype": (ops.embedding_rms_norm, (torch.zeros(10, 8), torch.zeros(2, 3), None, EPS),
                            r"embedding_rms_norm: ids must be int32 or int64, got torch.float32"),
    "embedding norm width": (ops.embedding_rms_norm, (torch.zeros(10, 8), torch.zeros(2, 3, dtype=torch.long),
                                                      torch.ones(6), EPS),
                             r"embedding_rms_norm: norm_weight must be \[8\], got \(6,\)"),
    "rope positions": (ops.rope_cos_sin, (torch.zeros(2, 3), torch.ones(4), 1.0, torch.float32),
                       r"rope_cos_sin: positions must be an integer tensor, got torch.float32"),
    "joined positions": (ops.joined_rope_cos_sin, (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4,
                         dtype=torch.int64), torch.ones(4), 1.0, torch.float32),
                         r"joined_rope_cos_sin: front and positions must share dtype and leading dims"),
    "linear width": (ops.linear, (torch.zeros(2, 3, 8), torch.zeros(4, 6), None),
                     r"linear: x has 8 features but w \(4, 6\) takes 6"),
    "gate|up rows": (ops.linear_silu_mul, (torch.zeros(2, 3, 8), torch.zeros(5, 8), None),
                     r"linear_silu_mul: w must be \[gate; up\] \[2·I, K\], got \(5, 8\)"),
    "norm stats width": (ops.linear_add_norm_stats, (torch.zeros(2, 3, 8), torch.zeros(96, 8), None,
                                                     torch.zeros(2, 3, 96), None),
                         r"linear_add_norm_stats: w has 96 rows, not a multiple of 64"),
    "x_sumsq shape": (ops.qkv_norm_rope_cache, _qkv_args_with_sumsq((2, 3, 2)),
                      r"x_sumsq must be \(5, 7, 1\) for x \(5, 7, 64\) \(one sum per 64 columns\), got \(2, 3, 2\)"),
    "mhc fn rows": (ops.mhc_pre, (torch.zeros(2, 4, 8), torch.zeros(20, 32), torch.zeros(24), torch.ones(3),
                                  EPS, EPS, 20), r"mhc: fn has 20 rows, expected \(2\+n\)·n = 24 for n = 4"),
}


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("case", ERRORS)
def test_invalid_arguments_raise_input_error(case, fake):
    op, args, message = ERRORS[case]
    with pytest.raises(InputError, match=message):
        if fake:
            with FakeTensorMode() as mode:
                op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        else:
            op(*args)
