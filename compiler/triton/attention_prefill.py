"""Flash attention for long query blocks (prefill, large verify blocks).

Grid (query blocks, q heads, batch). A program owns BLOCK_M consecutive queries of one head and loops over
the keys its rows may see: for causal and sliding the range comes from the block's smallest and largest query
positions, so fully masked KV blocks (the future, and keys older than the window) are skipped, not loaded.
"""

import triton
import triton.language as tl

from .attention_common import (LOG2E, attend, family, key_range, launch_params, mask_args, qpos_args, query_positions,
                               widen_dot)
from .launch import await_previous_grid, programmatic_launch, wrap_triton


@triton.jit
def attention_prefill_kernel(
        Q, K, V, OUT, QPOS, MASK,
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
        stride_pb, stride_ps, stride_mb, stride_mh, stride_mq, stride_mk,
        group, sq, sk, window, qk_scale,
        KIND: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_QPOS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        WIDEN_DOT: tl.constexpr, PDL: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    await_previous_grid(PDL)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kvh = head // group
    row_ok = i < sq
    offs_d = tl.arange(0, HEAD_DIM)

    qp = query_positions(QPOS, b, i, row_ok, stride_pb, stride_ps, sq, sk, HAS_QPOS)
    qp_last = query_positions(QPOS, b, sq - 1, True, stride_pb, stride_ps, sq, sk, HAS_QPOS)
    lo, hi = key_range(qp, qp_last, row_ok, window, sk, KIND)

    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + head * stride_qh + i[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    mask_rows = MASK
    if KIND == "custom":
        mask_rows = MASK + b64 * stride_mb + head * stride_mh + i * stride_mq
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend(
        acc, m_i, l_i, q, qp, row_ok, mask_rows, stride_mk,
        K + b64 * stride_kb + kvh * stride_kh, V + b64 * stride_vb + kvh * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, lo, hi, qk_scale, window,
        KIND, MASK_BOOL, BLOCK_N, HEAD_DIM, WIDEN_DOT)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]    # a row that sees no key gets 0, as SDPA's math path does
    tl.store(OUT + b64 * stride_ob + head * stride_oh + i[:, None] * stride_os + offs_d[None, :] * stride_od,
             o.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def attention_prefill(q, k, v, kind, scale, window=0, mask=None, q_pos=None, out=None):
    """dflash.attention with the flash kernel, one program per (query block, q head, batch row); `out` is an
    optional preallocated [B, Hq, Sq, D] result."""
    batch, n_q_heads, sq, head_dim = q.shape
    n_kv_heads, sk = k.shape[1], k.shape[2]
    cfg = launch_params("prefill", head_dim, q.dtype, family(q.device))
    out = q.new_empty(batch, sq, n_q_heads, head_dim).transpose(1, 2) if out is None else out
    mask, mask_strides, mask_bool = mask_args(mask, (batch, n_q_heads, sq, sk))
    q_pos, stride_pb, stride_ps = qpos_args(q_pos)
    grid = (triton.cdiv(sq, cfg["block_m"]), n_q_heads, batch)
    wrap_triton(attention_prefill_kernel)[grid](
        q, k, v, out, q_pos, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_pb, stride_ps, *mask_strides, n_q_heads // n_kv_heads, sq, sk, window, scale * LOG2E,
        KIND=kind, MASK_BOOL=mask_bool, HAS_QPOS=q_pos is not None,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], HEAD_DIM=head_dim, WIDEN_DOT=widen_dot(q),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **programmatic_launch(q.device))
    return out
