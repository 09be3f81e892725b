"""What the decode and prefill attention kernels share: the visible key range of a tile of query rows, the
online-softmax loop over that range, and the host-side argument packing.

The mask kind is a `tl.constexpr` string ("non_causal" | "causal" | "sliding" | "custom"): a kernel compiled
for an index kind has no code that touches the mask pointer (it is passed as None), so a CUDA graph captured
for one kind never reads a missing mask. Keys outside [lo, hi) are never loaded: for the index kinds hi is one
past the largest query position of the tile (non_causal: the last query's), so stale slots of a static cache
beyond it are never read and the loop length follows q_pos, not the cache length.
"""

import math

import torch
import triton
import triton.language as tl

from .configs import launch_config

LOG2E = math.log2(math.e)


@triton.jit
def query_positions(QPOS, b, i, ok, stride_pb, stride_ps, sq, sk, HAS_QPOS: tl.constexpr):
    """Key-axis index of query i of batch row b (None q_pos: the last sq keys, bottom-right aligned)."""
    if HAS_QPOS:
        return tl.load(QPOS + b * stride_pb + i * stride_ps, mask=ok, other=0).to(tl.int32)
    return sk - sq + i


@triton.jit
def key_range(qp, qp_last, row_ok, window, sk, KIND: tl.constexpr):
    """[lo, hi): the keys any row of the tile may see; nothing outside it is read."""
    hi = sk
    lo = 0
    if KIND == "non_causal":
        hi = tl.minimum(qp_last + 1, sk)
    elif KIND != "custom":
        hi = tl.minimum(tl.max(tl.where(row_ok, qp, -1), 0) + 1, sk)
        if KIND == "sliding":
            lo = tl.maximum(tl.min(tl.where(row_ok, qp, sk), 0) - window + 1, 0)
    return lo, hi


@triton.jit
def attend(acc, m_i, l_i, q, qp, row_ok, mask_rows, stride_mk, k_base, v_base, stride_kn, stride_kd,
           stride_vn, stride_vd, lo, hi, qk_scale, window,
           KIND: tl.constexpr, MASK_BOOL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
           WIDEN_DOT: tl.constexpr):
    """Online softmax (base 2, fp32) of the tile's rows over keys [lo, hi) in BLOCK_N chunks.

    acc [M, D] is the unnormalised output, m_i the running row max (log2 domain), l_i the running row sum.
    P is rounded to the dtype of V before P @ V, as flash attention does on tensor cores.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    if WIDEN_DOT:
        q = q.to(tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)
        if WIDEN_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        visible = key_ok[None, :] & row_ok[:, None]
        if KIND == "causal" or KIND == "sliding":
            visible = visible & (offs_n[None, :] <= qp[:, None])
        if KIND == "sliding":
            visible = visible & (qp[:, None] - offs_n[None, :] < window)
        if KIND == "custom":
            mval = tl.load(mask_rows[:, None] + offs_n[None, :] * stride_mk, mask=visible, other=0)
            if MASK_BOOL:
                visible = visible & (mval != 0)
            else:
                s = s + mval.to(tl.float32) * 1.4426950408889634
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet stays at 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)
        p = p.to(v.dtype)
        if WIDEN_DOT:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


def family(device: torch.device) -> str:
    """Launch-config family of a device: 'rocm' for GPUs of a HIP build of torch, else 'cuda' (the interpreter too)."""
    return "rocm" if device.type == "cuda" and torch.version.hip else "cuda"


def widen_dot(q: torch.Tensor) -> bool:
    """True for bf16 under the interpreter: it stores bf16 as uint16 and its tl.dot multiplies those raw bits
    (triton 3.6-3.9), so the kernels widen the dot operands to fp32 first — exact for bf16 values."""
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"


def launch_params(path: str, head_dim: int, dtype: torch.dtype, fam: str) -> dict[str, int]:
    """The configs.TABLE row of attention_{path}_hd{head_dim} for 16-bit inputs; fp32 tiles hold twice the bytes,
    so they get half the rows (block_m, max_rows) and keys (block_n) and at most 2 stages of shared memory."""
    cfg = dict(launch_config(f"attention_{path}_hd{head_dim}", fam))
    if dtype == torch.float32:
        for key in ("block_m", "max_rows", "block_n"):
            if key in cfg:
                cfg[key] = max(16, cfg[key] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    return cfg


def mask_args(mask, shape):
    """(tensor or None, 4 strides, is_bool) of a custom mask broadcast to `shape` (stride 0 on broadcast dims)."""
    if mask is None:
        return None, (0, 0, 0, 0), False
    mask = mask.expand(shape)
    is_bool = mask.dtype == torch.bool
    return (mask.view(torch.uint8) if is_bool else mask), mask.stride(), is_bool


def qpos_args(q_pos):
    """(tensor or None, batch stride, query stride); a [1, Sq] q_pos is broadcast over the batch."""
    if q_pos is None:
        return None, 0, 0
    return q_pos, (0 if q_pos.shape[0] == 1 else q_pos.stride(0)), q_pos.stride(1)
