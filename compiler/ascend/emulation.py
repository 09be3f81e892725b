"""CPU emulation of the Ascend fused ops the generated code calls, written from their documentation.

Same names and signatures as the real ops, so generated code runs against this module here and against
`torch_npu` / `sgl_kernel_npu` on hardware. Each function checks the documented constraints our lowering relies
on (layouts, lengths, masks, dtypes, contiguity) and raises `NpuOpError` where the real op would refuse, then
computes the documented math in fp32 (fp64 is not needed: outputs are fp16/bf16/fp32). Nothing here calls the
dflash reference ops, so tests that compare the two compare independent implementations.

Sources (see docs/targets.md for the full list):
- npu_fused_infer_attention_score: Ascend/op-plugin docs/context/torch_npu-npu_fused_infer_attention_score.md
  (TND layout, cumulative actual_seq_lengths, sparse_mode 0/3, page attention, GQA, outputs) and SGLang
  python/sglang/srt/hardware_backend/npu/attention/ascend_backend.py (the 2048² mask `~tril(ones)`, TND + paged KV
  with per-request actual_seq_lengths_kv for speculative verify).
- npu_rms_norm: Ascend torch_npu API reference (y = x·rsqrt(mean(x²)+eps)·gamma, rstd = the rsqrt, fp32).
- npu_add_rms_norm: Ascend/op-plugin test/test_custom_ops/test_npu_add_rms_norm.py (x = x1 + x2, then npu_rms_norm
  of x; returns (y, rstd, x)).
- npu_swiglu: Ascend/op-plugin docs, torch_npu-npu_swiglu (A, B = the halves of input along dim; A·sigmoid(A)·B;
  contiguous input, fp32/fp16/bf16).
- npu_apply_rotary_pos_emb: Ascend/op-plugin op_plugin/ops/opapi/ApplyRotaryPosEmbNpuOpApi.cpp (in place on q, k;
  layouts BSND/BSH/SBND/BNSD/TND; rotary_mode half/quarter/interleave); npu_rotary_mul doc for the half formula.
- npu_rotary_mul: Ascend/op-plugin docs/context/torch_npu-npu_rotary_mul.md (r1·x + r2·rotate_half(x), 4-D).
- split_qkv_rmsnorm_rope: sgl-project/sgl-kernel-npu python/sgl_kernel_npu/sgl_kernel_npu/norm/
  split_qkv_rmsnorm_rope.py (the Triton kernel: fp32 per-head RMSNorm, result cast to bfloat16, neox rope on the
  first sin.shape[-1] channels).
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

COMPRESSED_MASK = 2048          # sparse_mode 2/3/4 take a 2048×2048 mask, True (1) = not attended
MAX_GQA_RATIO = 64
PAGE_BLOCK_MULTIPLE, PAGE_BLOCK_MAX = 128, 512
_HALF = (torch.float16, torch.bfloat16)


class NpuOpError(InputError):
    """A call breaks a documented constraint of an emulated Ascend op (the real op would refuse it too)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NpuOpError(message)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------------------------------------- attention


def _int_list(values, name: str) -> list[int]:
    _require(values is not None, f"{name} must be given with input_layout TND.")
    return [int(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]


def _spans(cumulative: list[int], total: int, name: str) -> list[tuple[int, int]]:
    """[start, end) token rows of each sequence from TND cumulative lengths."""
    starts = [0] + cumulative[:-1]
    _require(all(e >= s for s, e in zip(starts, cumulative)),
             f"{name} must be cumulative (each entry the sum of this and all earlier sequence lengths).")
    _require(cumulative[-1] == total, f"{name} ends at {cumulative[-1]} but the tensor has {total} tokens.")
    return list(zip(starts, cumulative))


def _check_compressed_mask(mask: Tensor | None) -> None:
    _require(mask is not None, "sparse_mode 3 needs the compressed 2048x2048 atten_mask.")
    _require(mask.dtype in (torch.bool, torch.int8, torch.uint8),
             f"atten_mask dtype {mask.dtype} is not bool/int8/uint8.")
    _require(mask.dim() in (2, 3, 4) and tuple(mask.shape[-2:]) == (COMPRESSED_MASK,) * 2
             and all(d == 1 for d in mask.shape[:-2]),
             f"sparse_mode 3 needs a (2048, 2048) atten_mask, got {tuple(mask.shape)}.")
    upper = torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=mask.device).triu(1)
    _require(torch.equal(mask.reshape(COMPRESSED_MASK, COMPRESSED_MASK).bool(), upper),
             "sparse_mode 3 needs the lower-triangular compressed mask (True strictly above the diagonal).")


def _paged_rows(cache: Tensor, blocks: Tensor, length: int, kv_heads: int) -> Tensor:
    """The first `length` tokens of one sequence from a paged cache, as [length, N, D]."""
    if cache.dim() == 4:                            # (blocknum, KV_N, blocksize, D)
        cache = cache.transpose(1, 2)
    else:                                           # (blocknum, blocksize, KV_N*D)
        cache = cache.unflatten(-1, (kv_heads, -1))
    n_blocks = -(-length // cache.shape[1])
    return cache[blocks[:n_blocks].long()].flatten(0, 1)[:length]


def _kv_sequences(key, value, lengths_kv, block_table, block_size, kv_heads, batch):
    """Per-sequence (k, v) as [Lk, N, D]: TND rows by cumulative lengths, or pages by per-request lengths."""
    if block_table is None:
        _require(key.dim() == 3, f"TND key must be 3-D (T, N, D), got {tuple(key.shape)}.")
        spans = _spans(lengths_kv, key.shape[0], "actual_seq_lengths_kv")
        return [(key[s:e], value[s:e]) for s, e in spans]
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
             "block_table must be an int32 (batch, max_blocks) tensor.")
    _require(block_size % PAGE_BLOCK_MULTIPLE == 0 and PAGE_BLOCK_MULTIPLE <= block_size <= PAGE_BLOCK_MAX,
             f"page attention block_size must be a multiple of 128 in [128, 512], got {block_size}.")
    block_dim = 2 if key.dim() == 4 else 1
    _require(key.dim() in (3, 4) and key.shape[block_dim] == block_size,
             f"paged key must be (blocknum, {block_size}, H) or (blocknum, N, {block_size}, D), "
             f"got {tuple(key.shape)}.")
    _require(all(0 <= n <= block_table.shape[1] * block_size for n in lengths_kv),
             "actual_seq_lengths_kv exceeds the blocks of block_table.")
    return [(_paged_rows(key, block_table[b], n, kv_heads), _paged_rows(value, block_table[b], n, kv_heads))
            for b, n in enumerate(lengths_kv)]


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """One sequence: q [Lq, N, D], k/v [Lk, N, D] (heads already matched) → out [Lq, N, Dv], lse [Lq, N, 1]."""
    lq, lk = q.shape[0], k.shape[0]
    if lk == 0:                                     # documented: empty key/value gives a zero output
        return q.new_zeros(lq, q.shape[1], v.shape[-1], dtype=torch.float32), q.new_full(
            (lq, q.shape[1], 1), -torch.inf, dtype=torch.float32)
    scores = torch.einsum("qnd,knd->nqk", q.float(), k.float()) * scale
    if causal:                                      # rightDownCausal: query i sees keys j <= i + (Lk - Lq)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (lk - lq), -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("nqk,knd->qnd", torch.exp(scores - lse[..., None]), v.float())
    return out, lse.transpose(0, 1)[..., None]


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, num_heads=1, scale=1.0,
                                    pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    softmax_lse_flag=False):
    """Emulates the TND path: sparse_mode 0 without a mask (full attention) or 3 with the compressed mask
    (causal aligned to the bottom right), KV as TND rows (cumulative lengths) or pages (per-request lengths).
    pre_tokens/next_tokens are ignored in both modes, as documented. Returns (attention_out, softmax_lse)."""
    _require(input_layout == "TND", f"the emulation covers input_layout TND only, got {input_layout!r}.")
    _require(pse_shift is None, "pse_shift is not emulated.")
    _require(query.dim() == 3, f"TND query must be 3-D (T, N, D), got {tuple(query.shape)}.")
    _require(query.dtype in _HALF, f"query dtype {query.dtype} is not float16/bfloat16.")
    _require(key.dtype == value.dtype == query.dtype, "key and value must have the query's dtype.")
    _require(key.shape == value.shape, "key and value must have the same shape.")
    _require(all(t.is_contiguous() for t in (query, key, value)), "query, key and value must be contiguous.")
    _require(query.shape[1] == num_heads, f"num_heads {num_heads} does not match query heads {query.shape[1]}.")
    kv_heads = num_key_value_heads or num_heads
    _require(num_heads % kv_heads == 0 and num_heads // kv_heads <= MAX_GQA_RATIO,
             f"num_heads {num_heads} must be a multiple (at most 64x) of num_key_value_heads {kv_heads}.")
    _require((sparse_mode, atten_mask is None) in ((0, True), (3, False)),
             "TND supports sparse_mode 0 without atten_mask or sparse_mode 3 with it.")
    if sparse_mode == 3:
        _check_compressed_mask(atten_mask)

    q_spans = _spans(_int_list(actual_seq_lengths, "actual_seq_lengths"), query.shape[0], "actual_seq_lengths")
    lengths_kv = _int_list(actual_seq_lengths_kv, "actual_seq_lengths_kv")
    _require(len(lengths_kv) == len(q_spans), "actual_seq_lengths and actual_seq_lengths_kv differ in batch.")
    kv = _kv_sequences(key, value, lengths_kv, block_table, block_size, kv_heads, len(q_spans))
    group = num_heads // kv_heads
    outs, lses = [], []
    for (s, e), (k, v) in zip(q_spans, kv):
        _require(k.shape[1] == kv_heads, f"key has {k.shape[1]} heads, num_key_value_heads is {kv_heads}.")
        _require(sparse_mode == 0 or e - s <= k.shape[0],
                 "sparse_mode 3 needs each query length to be at most its key length.")
        out, lse = _attend(query[s:e], k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale,
                           causal=sparse_mode == 3)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs).to(query.dtype)
    lse = torch.cat(lses) if softmax_lse_flag else torch.zeros(1, dtype=torch.float32, device=query.device)
    return out, lse


# ---------------------------------------------------------------------------------------------- norm / rope


def npu_rms_norm(x: Tensor, gamma: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """y = x · rsqrt(mean(x², over gamma's dims) + eps) · gamma in fp32, stored in x.dtype; rstd in fp32."""
    _require(x.dtype in (*_HALF, torch.float32), f"npu_rms_norm: dtype {x.dtype} is not float16/bfloat16/float32.")
    _require(gamma.dtype == x.dtype, f"npu_rms_norm: gamma dtype {gamma.dtype} differs from x dtype {x.dtype}.")
    _require(tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape),
             f"npu_rms_norm: gamma {tuple(gamma.shape)} does not match the last dims of x {tuple(x.shape)}.")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_add_rms_norm(x1: Tensor, x2: Tensor, gamma: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """x = x1 + x2 (stored in x1.dtype), then npu_rms_norm(x, gamma, epsilon): (y, rstd, x)."""
    _require(x1.shape == x2.shape and x1.dtype == x2.dtype,
             f"npu_add_rms_norm: x1 {tuple(x1.shape)} {x1.dtype} and x2 {tuple(x2.shape)} {x2.dtype} differ.")
    x = (x1.float() + x2.float()).to(x1.dtype)
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


def npu_swiglu(input: Tensor, dim: int = -1) -> Tensor:
    """A·sigmoid(A)·B with A, B the first and second half of input along dim, in fp32, stored in input.dtype."""
    _require(input.dtype in (*_HALF, torch.float32),
             f"npu_swiglu: dtype {input.dtype} is not float16/bfloat16/float32.")
    _require(input.is_contiguous() and input.numel() > 0, "npu_swiglu: input must be a contiguous, non-empty tensor.")
    _require(input.shape[dim] % 2 == 0, f"npu_swiglu: dim {dim} of {tuple(input.shape)} does not split in halves.")
    a, b = input.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(input.dtype)


def _check_rope_operands(name: str, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    _require(x.dtype in (*_HALF, torch.float32), f"{name}: dtype {x.dtype} is not float16/bfloat16/float32.")
    _require(cos.dtype == sin.dtype == x.dtype, f"{name}: cos/sin must have the input dtype {x.dtype}.")
    _require(cos.shape == sin.shape and cos.dim() == x.dim(), f"{name}: cos/sin must have x's rank and one shape.")
    _require(cos.shape[-1] == x.shape[-1] and x.shape[-1] % 2 == 0,
             f"{name}: cos/sin last dim {cos.shape[-1]} must equal the (even) head dim {x.shape[-1]}.")
    _require(all(c in (1, d) for c, d in zip(cos.shape, x.shape)), f"{name}: cos/sin do not broadcast onto x.")
    _require(x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous(), f"{name}: inputs must be contiguous.")


def _neox(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    return (xf * cos.float() + _rotate_half(xf) * sin.float()).to(x.dtype)


def npu_apply_rotary_pos_emb(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor, layout: str = "BSND",
                             rotary_mode: str = "half") -> tuple[Tensor, Tensor]:
    """Neox rope of query and key IN PLACE (the op writes its inputs and returns them)."""
    _require(rotary_mode == "half", f"rotary_mode {rotary_mode!r} is not emulated (only 'half').")
    rank = {"BSND": 4, "BSH": 3, "SBND": 4, "BNSD": 4, "TND": 3}
    _require(layout in rank and query.dim() == key.dim() == rank[layout],
             f"layout {layout!r} needs {rank.get(layout)}-D query/key, got {query.dim()}-D.")
    for x in (query, key):
        _check_rope_operands("npu_apply_rotary_pos_emb", x, cos, sin)
    query.copy_(_neox(query, cos, sin))
    key.copy_(_neox(key, cos, sin))
    return query, key


def npu_rotary_mul(input: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half") -> Tensor:
    """r1 · x + r2 · rotate_half(x) for 4-D x (a new tensor)."""
    _require(rotary_mode == "half", f"rotary_mode {rotary_mode!r} is not emulated (only 'half').")
    _require(input.dim() == 4, f"npu_rotary_mul needs a 4-D input, got {input.dim()}-D.")
    _check_rope_operands("npu_rotary_mul", input, r1, r2)
    return _neox(input, r1, r2)


# ---------------------------------------------------------------------------------------------- fused qkv


def _norm_rope_heads(x: Tensor, heads: int, head_dim: int, eps, weight, bias, sin: Tensor, cos: Tensor) -> Tensor:
    """The kernel's per-head path: fp32 RMSNorm (·weight +bias) cast to bfloat16, then rope of the first
    rope_dim channels with sin/cos in their own dtype (bf16 × sin promotes as in Triton)."""
    t = x.float().unflatten(-1, (heads, head_dim))
    if eps is not None:
        t = t * (1 / torch.sqrt(t.square().mean(-1, keepdim=True) + eps)) * weight.float()
        if bias is not None:
            t = t + bias.float()
    normed = t.to(torch.bfloat16)
    rope_dim = sin.shape[-1]
    rot, rest = normed[..., :rope_dim], normed[..., rope_dim:]
    s = sin.reshape(-1, 1, rope_dim)
    c = cos.reshape(-1, 1, rope_dim)
    roped = _rotate_half(rot) * s + rot * c
    if rope_dim != head_dim:                        # DO_PARTIAL inserts the roped slice into the bf16 tile
        roped = torch.cat((roped.to(torch.bfloat16), rest), dim=-1)
    return roped.flatten(-2).to(x.dtype)


def split_qkv_rmsnorm_rope(input, sin, cos, q_hidden_size, kv_hidden_size, head_dim, eps=None, q_weight=None,
                           k_weight=None, q_bias=None, k_bias=None):
    """input [T, q_hidden + 2·kv_hidden] → q [T, q_hidden], k/v [T, kv_hidden]; RMSNorm is skipped when eps is
    None; sin/cos hold rope_dim = sin.shape[-1] values per token (each half duplicated)."""
    _require(head_dim > 0 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} is not a power of two.")
    _require(q_hidden_size % kv_hidden_size == 0 and kv_hidden_size % head_dim == 0,
             "q_hidden_size must be a multiple of kv_hidden_size, and kv_hidden_size of head_dim.")
    tokens = input.shape[0]
    _require(input.dim() == 2 and input.shape[1] == q_hidden_size + 2 * kv_hidden_size and input.is_contiguous(),
             f"input must be contiguous (T, {q_hidden_size + 2 * kv_hidden_size}), got {tuple(input.shape)}.")
    rope_dim = sin.shape[-1]
    _require(sin.shape == cos.shape and sin.numel() == tokens * rope_dim, "sin/cos need rope_dim values per token.")
    _require(sin.is_contiguous() and cos.is_contiguous(), "sin/cos must be contiguous.")
    _require(rope_dim % 2 == 0 and rope_dim <= head_dim, f"rope_dim {rope_dim} must be even and <= head_dim.")
    _require(eps is None or (q_weight is not None and k_weight is not None), "eps needs q_weight and k_weight.")
    _require((q_bias is None) == (k_bias is None), "q_bias and k_bias are given together or not at all.")
    q, k, v = input.split([q_hidden_size, kv_hidden_size, kv_hidden_size], dim=-1)
    q = _norm_rope_heads(q, q_hidden_size // head_dim, head_dim, eps, q_weight, q_bias, sin, cos)
    k = _norm_rope_heads(k, kv_hidden_size // head_dim, head_dim, eps, k_weight, k_bias, sin, cos)
    return q, k, v.contiguous()
