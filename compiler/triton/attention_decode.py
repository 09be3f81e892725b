"""Split-KV decode attention: few queries (DFLASH draft / verify blocks of 16), long static KV cache.

Grid (batch × kv head, kv split). A program packs ALL the q heads of its GQA group × all Sq queries into one
tile of rows (row r = head r // Sq, query r % Sq: 4 heads × 16 queries = 64 rows), so K and V are read once per
kv head. Each split covers 1/num_splits of the visible key range (computed on the device from q_pos) and writes
its normalised partial output and log-sum-exp to a workspace; `reduce_splits_kernel` combines the splits.
With one split the decode kernel writes the output directly and no reduce is launched. Under programmatic launch
each program first asks L2 for its split's first `prefetch_keys` K/V rows, then waits for the previous kernel
(docs/kernels/attention.md, session 18).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_common import (LOG2E, attend, family, key_range, launch_params, mask_args, qpos_args, query_positions,
                               widen_dot)
from .launch import await_previous_grid, device_facts, prefetch_to_l2, programmatic_launch, wrap_triton


@triton.jit
def split_keys(QPOS, b, i, row_ok, stride_pb, stride_ps, sq, sk, window, num_splits, min_blocks_per_split, split,
               KIND: tl.constexpr, HAS_QPOS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(query positions of the tile's rows, [start, end) of the keys this split attends to): the visible blocks
    are dealt to as many splits as give each >= min_blocks_per_split; the others get an empty range."""
    qp = query_positions(QPOS, b, i, row_ok, stride_pb, stride_ps, sq, sk, HAS_QPOS)
    qp_last = query_positions(QPOS, b, sq - 1, True, stride_pb, stride_ps, sq, sk, HAS_QPOS)
    lo, hi = key_range(qp, qp_last, row_ok, window, sk, KIND)
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    used_splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(n_blocks, min_blocks_per_split)), 1)
    blocks_per_split = tl.cdiv(n_blocks, used_splits)
    start = lo + split * blocks_per_split * BLOCK_N
    return qp, start, tl.minimum(start + blocks_per_split * BLOCK_N, hi)


@triton.jit
def prefetch_keys(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end,
                  HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the K and V rows of keys [start, min(end, start + KEYS)), one request per LINE elements (128 B);
    addresses stay inside [start, end) of the cache, so any start/end reads nothing outside it."""
    if start < end:
        keys = tl.minimum(start + tl.arange(0, KEYS), end - 1)[:, None]
        cols = (tl.arange(0, HEAD_DIM // LINE) * LINE)[None, :]
        prefetch_to_l2(k_base + keys * stride_kn + cols * stride_kd)
        prefetch_to_l2(v_base + keys * stride_vn + cols * stride_vd)


@triton.jit
def attention_decode_kernel(
        Q, K, V, OUT, QPOS, MASK, WS_O, WS_LSE,
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
        stride_pb, stride_ps, stride_mb, stride_mh, stride_mq, stride_mk,
        n_kv_heads, group, sq, sk, window, num_splits, min_blocks_per_split, qk_scale,
        KIND: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_QPOS: tl.constexpr, SPLIT_KV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        WIDEN_DOT: tl.constexpr, PREFETCH_KEYS: tl.constexpr, KV_LINE: tl.constexpr, PDL: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    rows = tl.arange(0, BLOCK_M)
    n_rows = group * sq
    row_ok = rows < n_rows
    head = kvh * group + rows // sq
    i = rows % sq
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    if PDL and PREFETCH_KEYS > 0:
        # the split's first keys head for L2 while the previous kernel drains. q_pos may still be in the making
        # (this read is not ordered after the wait): a stale value only sends the prefetch to other cache rows;
        # the range that is attended to is computed again after the wait
        _, early_start, early_end = split_keys(QPOS, b, i, row_ok, stride_pb, stride_ps, sq, sk, window, num_splits,
                                               min_blocks_per_split, split, KIND, HAS_QPOS, BLOCK_N)
        prefetch_keys(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, tl.maximum(early_start, 0),
                      tl.minimum(early_end, sk), HEAD_DIM, PREFETCH_KEYS, KV_LINE)
    await_previous_grid(PDL)
    qp, start, end = split_keys(QPOS, b, i, row_ok, stride_pb, stride_ps, sq, sk, window, num_splits,
                                min_blocks_per_split, split, KIND, HAS_QPOS, BLOCK_N)

    q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    mask_rows = MASK
    if KIND == "custom":
        mask_rows = MASK + b64 * stride_mb + head * stride_mh + i * stride_mq
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend(
        acc, m_i, l_i, q, qp, row_ok, mask_rows, stride_mk,
        k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end, qk_scale, window,
        KIND, MASK_BOOL, BLOCK_N, HEAD_DIM, WIDEN_DOT)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)     # a row that sees no key: o = 0 (as SDPA's math path), lse = -inf
    o = acc / l_safe[:, None]
    if SPLIT_KV:
        ws_row = (pid_bh * num_splits + split) * n_rows + rows
        tl.store(WS_LSE + ws_row, m_i + tl.math.log2(l_safe), mask=row_ok)
        if start < end:     # an empty split's lse = -inf tells the reduce not to read its o
            tl.store(WS_O + ws_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])
    else:
        out_rows = OUT + b64 * stride_ob + head * stride_oh + i * stride_os
        tl.store(out_rows[:, None] + offs_d[None, :] * stride_od, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def reduce_splits_kernel(
        WS_O, WS_LSE, OUT, stride_ob, stride_oh, stride_os, stride_od,
        n_kv_heads, group, sq, num_splits,
        SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    """One program per (batch × kv head, packed row): out = Σ_s 2^(lse_s − M)·o_s / Σ_s 2^(lse_s − M), using
    o_s only where lse_s > -inf (a split that saw no key of the row wrote no o)."""
    await_previous_grid(PDL)
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    n_rows = group * sq
    splits = tl.arange(0, SPLITS_P2)
    split_ok = splits < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    ws_row = (pid_bh * num_splits + splits) * n_rows + row
    lse = tl.load(WS_LSE + ws_row, mask=split_ok, other=float("-inf"))
    # o of every split in the same round trip as lse (not masked by it: that would wait for lse), then dropped
    # where the split wrote none — its slot holds whatever the workspace held, NaN included
    o = tl.load(WS_O + ws_row[:, None] * HEAD_DIM + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    o = tl.where((lse > float("-inf"))[:, None], o, 0.0)
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    w_sum = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    head = (pid_bh % n_kv_heads) * group + row // sq
    tl.store(OUT + b * stride_ob + head * stride_oh + (row % sq) * stride_os + offs_d * stride_od,
             out.to(OUT.dtype.element_ty))


def multiprocessor_count(device: torch.device) -> int:
    """SMs (CUDA) or CUs (ROCm) of the device; 1 for the interpreter, whose programs run one after another."""
    return device_facts(device.index or 0)[1] if device.type == "cuda" else 1


def num_kv_splits(programs: int, cache_len: int, num_sms: int, min_keys_per_split: int, max_splits: int,
                  programs_per_sm: int = 1) -> int:
    """How many kv splits a decode launch has: enough that `programs` (batch × kv heads) × splits puts
    `programs_per_sm` programs on every SM, at most one per `min_keys_per_split` keys of the cache (a split writes
    a D-wide fp32 partial per row: at hd 128 that costs as much as reading 64 keys' K and V) and at most
    `max_splits`.

    It is chosen on the host from the static cache length, because q_pos lives on the device and a CUDA graph
    must not depend on its values. The kernel then deals the *visible* blocks to as many of these splits as
    get >= min_keys_per_split keys each; the rest write only lse = -inf, so a short prefix in a long cache costs
    few partials and no stale reads. Draft on H100 (132 SMs, 8 kv heads, cache 8192): 16 splits of 512 keys.
    """
    fill = max(num_sms * programs_per_sm // max(programs, 1), 1)
    longest = max(cache_len // min_keys_per_split, 1)
    return max(1, min(fill, longest, max_splits))


def decode_block_m(group: int, sq: int) -> int:
    """Rows of the packed tile: all q heads of a kv group × all queries, padded to a power of two ≥ 16."""
    return max(16, triton.next_power_of_2(group * sq))


@dataclass(frozen=True)
class DecodePlan:
    """What one decode call launches: the decode grid (batch × kv heads, kv splits), and the reduce grid (batch ×
    kv heads, packed rows) when there is more than one split; the tile and the launch config."""
    grid: tuple[int, int]
    num_splits: int
    min_blocks_per_split: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    reduce_grid: tuple[int, int] | None
    reduce_num_warps: int
    prefetch_keys: int


def decode_plan(batch: int, n_q_heads: int, n_kv_heads: int, sq: int, sk: int, head_dim: int, dtype: torch.dtype,
                fam: str, num_sms: int, num_splits: int | None = None) -> DecodePlan:
    """The launch of attention_decode for these shapes on a device of `num_sms` SMs/CUs (family `fam`).

    `num_splits` overrides the heuristic, and then a split may be as short as one block (tests use it to run the
    reduce on small shapes); otherwise a split gets at least min_keys_per_split of the visible keys."""
    cfg = launch_params("decode", head_dim, dtype, fam)
    min_blocks_per_split = 1
    if num_splits is None:
        num_splits = num_kv_splits(batch * n_kv_heads, sk, num_sms, cfg["min_keys_per_split"], cfg["max_splits"],
                                   cfg["programs_per_sm"])
        min_blocks_per_split = triton.cdiv(cfg["min_keys_per_split"], cfg["block_n"])
    rows = (n_q_heads // n_kv_heads) * sq
    return DecodePlan((batch * n_kv_heads, num_splits), num_splits, min_blocks_per_split,
                      decode_block_m(n_q_heads // n_kv_heads, sq), cfg["block_n"], cfg["num_warps"],
                      cfg["num_stages"], (batch * n_kv_heads, rows) if num_splits > 1 else None,
                      cfg["reduce_num_warps"], cfg["prefetch_keys"])


def attention_decode(q, k, v, kind, scale, window=0, mask=None, q_pos=None, num_splits=None, out=None):
    """dflash.attention with the split-KV decode kernel (launch: `decode_plan`); `out` is an optional
    preallocated [B, Hq, Sq, D] result (any strides; by default token-major, as the op promises); `num_splits`
    forces that many splits."""
    batch, n_q_heads, sq, head_dim = q.shape
    n_kv_heads, sk = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    plan = decode_plan(batch, n_q_heads, n_kv_heads, sq, sk, head_dim, q.dtype, family(q.device),
                       multiprocessor_count(q.device), num_splits)
    out = q.new_empty(batch, sq, n_q_heads, head_dim).transpose(1, 2) if out is None else out
    n_rows = group * sq
    split_kv = plan.reduce_grid is not None
    ws_o = ws_lse = None
    if split_kv:
        ws_o = torch.empty(batch * n_kv_heads, plan.num_splits, n_rows, head_dim, device=q.device,
                           dtype=torch.float32)
        ws_lse = torch.empty(batch * n_kv_heads, plan.num_splits, n_rows, device=q.device, dtype=torch.float32)
    mask, mask_strides, mask_bool = mask_args(mask, (batch, n_q_heads, sq, sk))
    q_pos, stride_pb, stride_ps = qpos_args(q_pos)
    wrap_triton(attention_decode_kernel)[plan.grid](
        q, k, v, out, q_pos, mask, ws_o, ws_lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_pb, stride_ps, *mask_strides, n_kv_heads, group, sq, sk, window, plan.num_splits,
        plan.min_blocks_per_split, scale * LOG2E,
        KIND=kind, MASK_BOOL=mask_bool, HAS_QPOS=q_pos is not None, SPLIT_KV=split_kv,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, HEAD_DIM=head_dim, WIDEN_DOT=widen_dot(q),
        PREFETCH_KEYS=plan.prefetch_keys, KV_LINE=128 // k.element_size(),
        num_warps=plan.num_warps, num_stages=plan.num_stages, **programmatic_launch(q.device))
    if split_kv:
        wrap_triton(reduce_splits_kernel)[plan.reduce_grid](
            ws_o, ws_lse, out, *out.stride(), n_kv_heads, group, sq, plan.num_splits,
            SPLITS_P2=triton.next_power_of_2(plan.num_splits), HEAD_DIM=head_dim, num_warps=plan.reduce_num_warps,
            **programmatic_launch(q.device))
    return out
