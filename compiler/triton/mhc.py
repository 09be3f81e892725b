"""Triton kernels for dflash.mhc_post_pre, dflash.mhc_pre and dflash.mhc_post (CUDA sm_80+, ROCm gfx942/gfx950).

`_mhc_kernel`'s constexpr flags make it the fused boundary (post → pre → RMSNorm), the first sublayer's pre
alone or the last sublayer's post alone. Grid (split, token blocks): a program owns BLOCK_T tokens and one of
`split` contiguous slices of D, and the slices of a block are adjacent in launch order, so they run together:
  phase 1, per slice:  new_res = post·x + combᵀ·res (stored once, in the activation dtype), Σ new_res², the
                       (2+n)·n mixes (the un-normalized rounded row against fn) and, for the norm, the Gram
                       matrix of the inputs (x, res_i) → fp32 partials in a workspace;
  finish, per token block, by the slice that arrives last (an atomic ticket; split = 1 needs none): r, pre,
                       post, softmax + Sinkhorn on [BLOCK_T] vectors (a token's n×n matrix in one thread), and
                       r_in = rsqrt(wᵀ·G·w / D + eps), the norm's statistic from the Gram matrix;
  phase 2:             layer_in = Σ_k pre_k·new_res_k → its RMSNorm in ONE pass over new_res — either by the
                       finishing program right after the block's phase 1 (new_res still in L2: large T), or by
                       `_mhc_apply_kernel`, a second launch spread over (D chunks × token blocks) (small T);
                       with that launch and config `comb_launch` 1, the finish leaves the comb's mixes·r and one
                       more program of the apply launch per token block runs softmax + Sinkhorn beside phase 2
                       (the apply waits for the whole main grid; the Sinkhorn chain ended it: ≈ 3 µs at T 16).
This Gram design serves mhc_post alone and the rocm rows (untuned). Rows with apply_launch 3 — every cuda row of
mhc_post_pre / mhc_pre since session 12 (T 16: 16.8 → 11.2 µs on the H100) — go to mhc_rows.py instead: phase 1
without the Gram matrix, the finish by the last slice, the norm over whole rows in the second launch.
docs/kernels/mhc.md explains the grid, the memory traffic, the numerics and the configs.
"""

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...errors import InputError
from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, programmatic_launch, traced, wrap_triton
from . import mhc_rows
from .mhc_math import comb_from_logits, comb_logits, comb_or_its_mixes, layer_in, mix_partial, pre_post, slice_sum

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_MAX_STREAMS = 8


# ----------------------------------------------------------------------------------------------- the kernels

@triton.jit
def _apply_chunk(src_ptr, out_ptr, norm_w_ptr, pre, r_in, tt, t_ok, d, D,
                 N: tl.constexpr, HAS_NORM: tl.constexpr):
    """Phase 2 for one [BLOCK_T, width] chunk: layer_in = Σ_k pre_k·src_k, rounded to the activation dtype as the
    reference rounds it, then (HAS_NORM) `(layer_in · r_in) · w` rounded once; stored to out."""
    td_ok = t_ok[:, None] & (d[None, :] < D)
    li = layer_in(src_ptr, out_ptr, pre, tt, td_ok, d, D, N)
    if HAS_NORM:
        w = tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        li = ((li.to(tl.float32) * r_in[:, None]) * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tt[:, None] * D + d[None, :], li, mask=td_ok)


@triton.jit
def _finish_block(src_ptr, post_ptr, comb_ptr, base_ptr, scale_ptr, norm_w_ptr, out_ptr, post_out_ptr, comb_out_ptr,
                  ws_ptr, coef_ptr, tt, t_ok, D, split, iters, rms_eps, hc_eps, norm_eps,
                  N: tl.constexpr, SPLIT_P2: tl.constexpr, APPLY_D: tl.constexpr,
                  HAS_NORM: tl.constexpr, FINISH_INLINE: tl.constexpr, COMB_IN_APPLY: tl.constexpr):
    """The token block's scalars from the slices' partials: r, pre, post, comb (softmax + Sinkhorn), and for the
    norm r_in = rsqrt(Σ layer_in² / D + eps) with Σ layer_in² = wᵀ·H·w, H the Gram matrix of the inputs
    u = (x, res_0, …) and w their weights in layer_in = Σ_k pre_k·new_res_k = Σ_a w_a·u_a. Then phase 2 over the
    whole row (FINISH_INLINE), or pre and r_in to `coef` for the apply launch. The comb (softmax + Sinkhorn) here,
    or (COMB_IN_APPLY) its mixes·r to `comb_out` for a program of the apply launch, beside phase 2."""
    NMIX: tl.constexpr = (2 + N) * N
    # fp32 as eager Triton types Python floats (Inductor passes them as fp64)
    rms_eps = tl.cast(rms_eps, tl.float32)
    hc_eps = tl.cast(hc_eps, tl.float32)
    norm_eps = tl.cast(norm_eps, tl.float32)
    tl.debug_barrier()
    block = tt.shape[0]
    m = ()
    for q in tl.static_range(NMIX):
        m = m + (slice_sum(ws_ptr, tt, t_ok, q, block, split, SPLIT_P2),)
    r = tl.math.rsqrt(slice_sum(ws_ptr, tt, t_ok, NMIX, block, split, SPLIT_P2) / (N * D) + rms_eps)
    pre = pre_post(m, r, base_ptr, scale_ptr, hc_eps, post_out_ptr, tt, t_ok, N)

    r_in = r
    if HAS_NORM:  # w_0 = Σ_k pre_k·post_k (the weight of x), w_1+i = Σ_k pre_k·comb[i, k] (of res_i)
        w = ()
        for a in tl.static_range(N + 1):
            acc = tl.zeros(tt.shape, tl.float32)
            for k in tl.static_range(N):
                if a == 0:
                    mixer = tl.load(post_ptr + tt * N + k, mask=t_ok, other=0.0)
                else:
                    mixer = tl.load(comb_ptr + tt * (N * N) + (a - 1) * N + k, mask=t_ok, other=0.0)
                acc += pre[k] * mixer.to(tl.float32)
            w = w + (acc,)
        quad = tl.zeros(tt.shape, tl.float32)
        for a in tl.static_range(N + 1):  # Gram pair (a, b), b <= a, sits at column NMIX + 1 + a(a+1)/2 + b
            for b in tl.static_range(a + 1):
                g = slice_sum(ws_ptr, tt, t_ok, NMIX + 1 + a * (a + 1) // 2 + b, block, split, SPLIT_P2)
                quad += (1.0 if a == b else 2.0) * (w[a] * w[b]) * g
        r_in = tl.math.rsqrt(quad / D + norm_eps)
    if FINISH_INLINE:
        for c0 in range(0, D, APPLY_D):
            _apply_chunk(src_ptr, out_ptr, norm_w_ptr, pre, r_in, tt, t_ok, c0 + tl.arange(0, APPLY_D), D,
                         N, HAS_NORM)
    else:
        for k in tl.static_range(N):
            tl.store(coef_ptr + tt * (N + 1) + k, pre[k])
        tl.store(coef_ptr + tt * (N + 1) + N, r_in)
    comb_or_its_mixes(m, r, base_ptr, scale_ptr, hc_eps, iters, comb_out_ptr, tt, t_ok, N, COMB_IN_APPLY)


@triton.jit
def _chunk_x(x_ptr, tt, d, td_ok, D, HAS_POST: tl.constexpr):
    """x's [BLOCK_T, BLOCK_D] chunk in fp32 (HAS_POST); a placeholder 0.0 for mhc_pre, which has no x."""
    x = 0.0
    if HAS_POST:
        x = tl.load(x_ptr + tt[:, None] * D + d[None, :], mask=td_ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _stream_step(x, j, d, d_ok, td_ok, rows, tt, t_ok, res_ptr, comb_ptr, post_ptr, new_res_ptr, fn_ptr, D,
                 mixes, ssq, gram, pairs, N: tl.constexpr, NM: tl.constexpr, FN_PARTS: tl.constexpr,
                 FN_PRESPLIT: tl.constexpr, INTERPRETED: tl.constexpr, HAS_POST: tl.constexpr,
                 HAS_PRE: tl.constexpr, HAS_NORM: tl.constexpr):
    """Phase 1 for destination stream j of one chunk (x: the chunk of x) → (mixes, ssq, gram) updated: new_res[j]
    stored (HAS_POST), the Gram pairs of res_j (HAS_NORM), Σ f² and the mixes of the rounded row f (HAS_PRE)."""
    if HAS_POST:  # new_res[j] = post_j·x + Σ_i comb[i, j]·res[i]; res[i] is re-read from L1 per j
        if HAS_NORM:
            res_j = tl.load(res_ptr + rows + j * D, mask=td_ok, other=0.0).to(tl.float32)
            gram += tl.where(pairs == (j + 1) * (j + 2) // 2, tl.sum(res_j * x, axis=1)[:, None], 0.0)
        mix = tl.zeros(td_ok.shape, tl.float32)
        for i in tl.static_range(N):
            comb_ij = tl.load(comb_ptr + tt * (N * N) + i * N + j, mask=t_ok, other=0.0).to(tl.float32)
            res_i = tl.load(res_ptr + rows + i * D, mask=td_ok, other=0.0).to(tl.float32)
            mix += comb_ij[:, None] * res_i
            if HAS_NORM:
                at = (pairs == (j + 1) * (j + 2) // 2 + 1 + i) & (i <= j)
                gram += tl.where(at, tl.sum(res_j * res_i, axis=1)[:, None], 0.0)
        post_j = tl.load(post_ptr + tt * N + j, mask=t_ok, other=0.0).to(tl.float32)
        new_j = (post_j[:, None] * x + mix).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + rows + j * D, new_j, mask=td_ok)
        f = new_j.to(tl.float32)
    else:
        f = tl.load(res_ptr + rows + j * D, mask=td_ok, other=0.0).to(tl.float32)
    if HAS_PRE:  # the rounded row, as the reference's mhc_pre sees it
        ssq += tl.sum(f * f, axis=1)
        mixes = mix_partial(f, fn_ptr + j * D, d, d_ok, D, mixes, N, NM, FN_PARTS, FN_PRESPLIT, INTERPRETED)
    return mixes, ssq, gram


@triton.jit
def _mhc_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, fn_ptr, base_ptr, scale_ptr, norm_w_ptr,
                new_res_ptr, out_ptr, post_out_ptr, comb_out_ptr, ws_ptr, coef_ptr, count_ptr,
                T, D, split, iters, rms_eps, hc_eps, norm_eps,
                N: tl.constexpr, NM: tl.constexpr, NH: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, APPLY_D: tl.constexpr, SPLIT_P2: tl.constexpr, FN_PARTS: tl.constexpr,
                FN_PRESPLIT: tl.constexpr, FLAT_LOOP: tl.constexpr,
                INTERPRETED: tl.constexpr, HAS_POST: tl.constexpr, HAS_PRE: tl.constexpr, HAS_NORM: tl.constexpr,
                FINISH_INLINE: tl.constexpr, FINISH_HERE: tl.constexpr, COMB_IN_APPLY: tl.constexpr,
                PDL: tl.constexpr):
    await_previous_grid(PDL)
    NMIX: tl.constexpr = (2 + N) * N
    NPAIR: tl.constexpr = (N + 1) * (N + 2) // 2
    WSC: tl.constexpr = NMIX + 1 + NPAIR
    sl = tl.program_id(0)  # the slices of a token block are adjacent in launch order: they run together
    tb = tl.program_id(1)
    # Pointers start at this block's first token (64-bit, once); offsets inside the block stay 32-bit.
    t0 = tb.to(tl.int64) * BLOCK_T
    x_ptr += t0 * D
    res_ptr += t0 * (N * D)
    new_res_ptr += t0 * (N * D)
    out_ptr += t0 * D
    post_ptr += t0 * N
    post_out_ptr += t0 * N
    comb_ptr += t0 * (N * N)
    comb_out_ptr += t0 * (N * N)
    ws_ptr += t0 * (split * WSC)
    coef_ptr += t0 * (N + 1)
    tt = tl.arange(0, BLOCK_T)
    t_ok = tt < T - t0

    mixes = tl.zeros((BLOCK_T, NM), tl.float32)
    ssq = tl.zeros((BLOCK_T,), tl.float32)
    gram = tl.zeros((BLOCK_T, NH), tl.float32)  # the inputs' Gram pairs, for the norm's statistic
    pairs = tl.arange(0, NH)[None, :]
    chunks = tl.cdiv(D, BLOCK_D)
    per_slice = tl.cdiv(chunks, split)
    first = sl * per_slice
    last = tl.minimum(first + per_slice, chunks)
    if FLAT_LOOP:  # one loop over (chunk, stream j) steps: the software pipeline also spans chunk boundaries
        for step in range(first * N, last * N):
            j = step % N
            d = (step // N) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = d < D
            td_ok = t_ok[:, None] & d_ok[None, :]
            rows = tt[:, None] * (N * D) + d[None, :]
            x = _chunk_x(x_ptr, tt, d, td_ok, D, HAS_POST)  # re-read (from L1) per j
            if HAS_NORM:  # inputs u = (x, res_0, …): Σ_d u_a·u_b for b <= a, at column a(a+1)/2 + b
                gram += tl.where((pairs == 0) & (j == 0), tl.sum(x * x, axis=1)[:, None], 0.0)
            mixes, ssq, gram = _stream_step(x, j, d, d_ok, td_ok, rows, tt, t_ok, res_ptr, comb_ptr, post_ptr,
                                            new_res_ptr, fn_ptr, D, mixes, ssq, gram, pairs, N, NM, FN_PARTS,
                                            FN_PRESPLIT, INTERPRETED, HAS_POST, HAS_PRE, HAS_NORM)
    else:  # round 1's nested loops: chunks, then a runtime loop over j (x loaded once per chunk)
        for c in range(first, last):
            d = c * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = d < D
            td_ok = t_ok[:, None] & d_ok[None, :]
            rows = tt[:, None] * (N * D) + d[None, :]
            x = _chunk_x(x_ptr, tt, d, td_ok, D, HAS_POST)
            if HAS_NORM:
                gram += tl.where(pairs == 0, tl.sum(x * x, axis=1)[:, None], 0.0)
            # Destination stream j (a runtime loop: unrolled, the streams' tiles would all be live at once).
            for j in range(N):
                mixes, ssq, gram = _stream_step(x, j, d, d_ok, td_ok, rows, tt, t_ok, res_ptr, comb_ptr, post_ptr,
                                                new_res_ptr, fn_ptr, D, mixes, ssq, gram, pairs, N, NM, FN_PARTS,
                                                FN_PRESPLIT, INTERPRETED, HAS_POST, HAS_PRE, HAS_NORM)

    if HAS_PRE:  # partials to the block's workspace [column, token, slice]
        cols = tl.arange(0, NM)[None, :]
        tl.store(ws_ptr + (cols * BLOCK_T + tt[:, None]) * split + sl, mixes, mask=cols < NMIX)
        tl.store(ws_ptr + (NMIX * BLOCK_T + tt) * split + sl, ssq)
        tl.store(ws_ptr + ((NMIX + 1 + pairs) * BLOCK_T + tt[:, None]) * split + sl, gram, mask=pairs < NPAIR)
        # With split > 1 the last slice of this token block to arrive finishes it: the ticket's acq_rel orders the
        # partials and new_res stores of the other slices (each made before a CTA barrier) before our loads.
        ticket = split - 1
        if FINISH_HERE and split > 1:
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + tb, 1, sem="acq_rel", scope="gpu")
        if FINISH_HERE and ticket == split - 1:
            src_ptr = new_res_ptr if HAS_POST else res_ptr
            _finish_block(src_ptr, post_ptr, comb_ptr, base_ptr, scale_ptr, norm_w_ptr, out_ptr, post_out_ptr,
                          comb_out_ptr, ws_ptr, coef_ptr, tt, t_ok, D, split, iters, rms_eps, hc_eps, norm_eps,
                          N, SPLIT_P2, APPLY_D, HAS_NORM, FINISH_INLINE, COMB_IN_APPLY)
            if split > 1:
                tl.store(count_ptr + tb, 0)  # leave the ticket ready for the next launch


@triton.jit
def _mhc_finish_kernel(src_ptr, post_ptr, comb_ptr, base_ptr, scale_ptr, norm_w_ptr, post_out_ptr, comb_out_ptr,
                       ws_ptr, coef_ptr, T, D, split, iters, rms_eps, hc_eps, norm_eps,
                       N: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_NORM: tl.constexpr,
                       COMB_IN_APPLY: tl.constexpr, PDL: tl.constexpr):
    """The finish as its own launch (apply_launch 2), one program per token block: _mhc_kernel then carries no
    finisher (its registers, its ticket) and the apply launch reads `coef`."""
    await_previous_grid(PDL)
    NMIX: tl.constexpr = (2 + N) * N
    WSC: tl.constexpr = NMIX + 1 + (N + 1) * (N + 2) // 2
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    tt = tl.arange(0, BLOCK_T)
    _finish_block(src_ptr, post_ptr + t0 * N, comb_ptr + t0 * (N * N), base_ptr, scale_ptr, norm_w_ptr, src_ptr,
                  post_out_ptr + t0 * N, comb_out_ptr + t0 * (N * N), ws_ptr + t0 * (split * WSC),
                  coef_ptr + t0 * (N + 1), tt, tt < T - t0, D, split, iters, rms_eps, hc_eps, norm_eps,
                  N, SPLIT_P2, 16, HAS_NORM, False, COMB_IN_APPLY)


@triton.jit
def _mhc_apply_kernel(src_ptr, out_ptr, coef_ptr, norm_w_ptr, base_ptr, scale_ptr, comb_out_ptr, T, D, iters, hc_eps,
                      N: tl.constexpr, BLOCK_T: tl.constexpr, APPLY_D: tl.constexpr, HAS_NORM: tl.constexpr,
                      COMB_IN_APPLY: tl.constexpr, PDL: tl.constexpr):
    """Phase 2 as its own launch: one [BLOCK_T, APPLY_D] chunk of layer_in (→ its RMSNorm) per program, from the
    pre weights and r_in that the finish left in `coef`. COMB_IN_APPLY: the last program of each token block turns
    the comb's mixes·r that the finish left in `comb_out` into comb (softmax + Sinkhorn, one token per thread)."""
    await_previous_grid(PDL)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    tt = tl.arange(0, BLOCK_T)
    t_ok = tt < T - t0
    if COMB_IN_APPLY and tl.program_id(0) == tl.num_programs(0) - 1:
        comb_out_ptr += t0 * (N * N)
        mr = ()
        for q in tl.static_range(N * N):
            mr = mr + (tl.load(comb_out_ptr + tt * (N * N) + q, mask=t_ok, other=0.0),)
        logits = comb_logits(mr, base_ptr, scale_ptr, N)
        comb_from_logits(logits, tl.cast(hc_eps, tl.float32), iters, comb_out_ptr, tt, t_ok, N)
        return
    coef = coef_ptr + (t0 + tt) * (N + 1)
    pre = ()
    for k in tl.static_range(N):
        pre = pre + (tl.load(coef + k),)
    r_in = tl.load(coef + N)
    _apply_chunk(src_ptr + t0 * (N * D), out_ptr + t0 * D, norm_w_ptr, pre, r_in, tt, t_ok,
                 tl.program_id(0) * APPLY_D + tl.arange(0, APPLY_D), D, N, HAS_NORM)


# ------------------------------------------------------------------------------------------------- launching

_KINDS = {  # op -> (HAS_POST, HAS_PRE, HAS_NORM)
    "mhc_post_pre": (True, True, True),
    "mhc_pre": (False, True, False),
    "mhc_post": (True, False, False),
}


@dataclass(frozen=True)
class _Problem:
    op: str
    n: int
    d: int
    dtype: torch.dtype
    interpreted: bool = False
    tokens: int = 0  # 0: unknown (AOT specs), the row's `split` stands


def pick_config(op: str, tokens: int, fam: str) -> dict[str, int]:
    """The configs.TABLE row for `op` at `tokens` tokens on family `fam` ('cuda' | 'rocm')."""
    for bucket in _buckets(op):
        row = launch_config(bucket, fam)
        if row["max_t"] == 0 or tokens <= row["max_t"]:
            return row
    raise AssertionError("configs: the mhc.large row must have max_t = 0 (no limit)")


def _plan(p: _Problem, cfg: dict[str, int]) -> tuple[dict[str, object], int]:
    """The kernel's constexprs and the number of D slices for one problem and config row (tuned at n = 4)."""
    has_post, has_pre, has_norm = _KINDS[p.op]
    nm = max(16, triton.next_power_of_2((2 + p.n) * p.n))  # the mixes, the N of the GEMV's dots
    block_d = min(cfg["block_d"], triton.next_power_of_2(p.d))
    if has_pre:  # keep the fn tile (BLOCK_D × NM) at the size the row was tuned for (NM = 32)
        block_d = max(16, min(block_d, cfg["block_d"] * 32 // nm))
        if cfg["block_t"] < 16:
            raise ValueError(f"mhc: block_t {cfg['block_t']} < 16; the GEMV against fn runs on tensor cores")
    fn_parts = cfg["fn_parts"] if has_pre and p.dtype == torch.bfloat16 else 0
    if fn_parts not in (0, 2, 3):
        raise ValueError(f"mhc: fn_parts {fn_parts} is not 2 or 3 (bf16 parts of fn)")
    chunks = triton.cdiv(p.d, block_d)
    split = chunks if cfg["split"] == 0 else min(cfg["split"], chunks)
    if cfg.get("programs") and p.tokens:  # about `programs` programs: the largest power of two of slices that fits
        per_block = max(1, cfg["programs"] // triton.cdiv(p.tokens, cfg["block_t"]))
        split = min(split, 1 << (per_block.bit_length() - 1))
    split = triton.cdiv(chunks, triton.cdiv(chunks, split))  # no empty slices
    meta = dict(N=p.n, NM=nm, NH=triton.next_power_of_2((p.n + 1) * (p.n + 2) // 2), BLOCK_T=cfg["block_t"],
                BLOCK_D=block_d, APPLY_D=min(cfg.get("apply_d", 0) if has_pre else 16, triton.next_power_of_2(p.d)),
                SPLIT_P2=triton.next_power_of_2(split) if has_pre else 1, FN_PARTS=fn_parts,
                FN_PRESPLIT=bool(fn_parts and cfg["fn_presplit"]), FLAT_LOOP=bool(cfg.get("flat_loop", 0)),
                INTERPRETED=p.interpreted, HAS_POST=has_post, HAS_PRE=has_pre, HAS_NORM=has_norm,
                FINISH_INLINE=has_pre and not cfg["apply_launch"],
                FINISH_HERE=not (has_pre and cfg["apply_launch"] == 2),
                COMB_IN_APPLY=has_norm and cfg["apply_launch"] in (1, 2) and bool(cfg.get("comb_launch", 0)))
    return meta, split


def _main_meta(meta: dict[str, object]) -> dict[str, object]:
    """_mhc_kernel's constexprs: APPLY_D only matters where the kernel runs phase 2 itself."""
    return meta if meta["FINISH_INLINE"] else dict(meta, APPLY_D=16)


_FN_PARTS: dict[tuple, tuple] = {}


def fn_bf16_parts(fn: torch.Tensor, parts: int, nm: int) -> torch.Tensor:
    """fn as bf16 [parts, nm, n·D]: hi, mid (, lo) with hi + mid + lo = fn (each part the bf16 rounding of what the
    earlier ones leave), rows zero-padded to nm. fn is a weight: cached per fn tensor (identity and version
    counter; the entry dies with the tensor), so an in-place change of fn is seen by the next eager call but not
    by a CUDA graph captured before it. Not cached while a graph is being captured (the split is captured) nor
    traced (Inductor's AOT pass: the split becomes graph ops on the frozen weight)."""
    key = (id(fn), parts, nm)
    try:
        version = fn._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference mode)
        version = None
    hit = _FN_PARTS.get(key)
    if hit is not None and hit[0]() is fn and hit[1] == version:
        return hit[2]
    rest = fn.detach().float()
    out = torch.zeros(parts, nm, fn.shape[1], dtype=torch.bfloat16, device=fn.device)
    for k in range(parts):
        out[k, :fn.shape[0]] = rest.to(torch.bfloat16)
        rest = rest - out[k, :fn.shape[0]].float()
    if not traced() and not (fn.is_cuda and torch.cuda.is_current_stream_capturing()):
        _FN_PARTS[key] = (weakref.ref(fn, lambda _, key=key: _FN_PARTS.pop(key, None)), version, out)
    return out


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _arrival_counters(like: torch.Tensor, count: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per token block; the kernel resets each after use, so one buffer per
    (device, stream) serves every eager launch — no memset launch per call. A traced call (Inductor) gets fresh
    zeros: graph state must not outlive the graph."""
    device = like.device
    if traced():
        return torch.zeros(count, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _device_family(device: torch.device) -> str:
    return "rocm" if device.type == "cuda" and torch.version.hip else "cuda"


def _launch(op, res, x=None, post=None, comb=None, fn=None, base=None, scale=None, norm_w=None,
            rms_eps=0.0, hc_eps=0.0, iters=1, norm_eps=0.0, config=None, launches=("main", "apply")):
    """(new_res, layer_in or its RMSNorm, post_next, comb_next); the ones `op` does not produce are None.
    `launches` (benchmarks only) leaves out one of the two launches of an apply_launch config to time the other."""
    n, d = res.shape[-2:]
    lead = res.shape[:-2]
    tokens = res.numel() // (n * d)
    dev, dtype = res.device, res.dtype
    has_post, has_pre, has_norm = _KINDS[op]
    res2 = res.reshape(tokens, n, d).contiguous()
    new_res = torch.empty_like(res2) if has_post else None
    out = torch.empty(tokens, d, dtype=dtype, device=dev) if has_pre else None
    post_out = torch.empty(tokens, n, dtype=torch.float32, device=dev) if has_pre else None
    comb_out = torch.empty(tokens, n, n, dtype=torch.float32, device=dev) if has_pre else None
    if tokens:
        cfg = config or pick_config(op, tokens, _device_family(dev))
        meta, split = _plan(_Problem(op, n, d, dtype, dev.type == "cpu", tokens), cfg)
        if meta["FN_PRESPLIT"]:
            fn = fn_bf16_parts(fn, meta["FN_PARTS"], meta["NM"])

        def pointer(t, *shape):  # an absent tensor gets a stand-in the kernel never dereferences
            return res2 if t is None else t.reshape(shape or t.shape).contiguous()

        if has_pre and cfg["apply_launch"] == 3:
            counters = _arrival_counters(res2, triton.cdiv(tokens, meta["BLOCK_T"])) if cfg.get("finish_here") else res2
            mhc_rows.launch(meta, split, cfg, tokens, d, pointer(x, tokens, d), res2, pointer(post, tokens, n),
                            pointer(comb, tokens, n, n), fn, base, scale, pointer(norm_w), new_res, out, post_out,
                            comb_out, rms_eps, hc_eps, iters, norm_eps, counters, launches)
            return shaped_outputs(lead, n, d, new_res, out, post_out, comb_out)
        padded = triton.cdiv(tokens, meta["BLOCK_T"]) * meta["BLOCK_T"]
        ws = coef = counters = None
        if has_pre:
            columns = (2 + n) * n + 1 + (n + 1) * (n + 2) // 2  # mixes, Σ new_res², the inputs' Gram pairs
            ws = torch.empty(padded * split * columns, dtype=torch.float32, device=dev)
            coef = None if meta["FINISH_INLINE"] else torch.empty(padded, n + 1, dtype=torch.float32, device=dev)
            if meta["FINISH_HERE"]:
                counters = _arrival_counters(res2, padded // meta["BLOCK_T"] if split > 1 else 1)

        blocks = padded // meta["BLOCK_T"]
        src = new_res if has_post else res2
        if "main" in launches:
            wrap_triton(_mhc_kernel)[(split, blocks)](
                pointer(x, tokens, d), res2, pointer(post, tokens, n), pointer(comb, tokens, n, n),
                pointer(fn), pointer(base), pointer(scale), pointer(norm_w),
                pointer(new_res), pointer(out), pointer(post_out), pointer(comb_out), pointer(ws), pointer(coef),
                pointer(counters), tokens, d, split, iters, rms_eps, hc_eps, norm_eps,
                **_main_meta(meta), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                **programmatic_launch(dev))
        if not meta["FINISH_HERE"] and "main" in launches:
            wrap_triton(_mhc_finish_kernel)[(blocks,)](
                src, pointer(post, tokens, n), pointer(comb, tokens, n, n), pointer(base), pointer(scale),
                pointer(norm_w), post_out, comb_out, ws, coef, tokens, d, split, iters, rms_eps, hc_eps, norm_eps,
                N=n, BLOCK_T=meta["BLOCK_T"], SPLIT_P2=meta["SPLIT_P2"], HAS_NORM=has_norm,
                COMB_IN_APPLY=meta["COMB_IN_APPLY"], num_warps=cfg["num_warps"], **programmatic_launch(dev))
        if coef is not None and "apply" in launches:
            chunks = triton.cdiv(d, meta["APPLY_D"]) + meta["COMB_IN_APPLY"]  # + the comb's program
            wrap_triton(_mhc_apply_kernel)[(chunks, blocks)](
                src, out, coef, pointer(norm_w), pointer(base), pointer(scale), comb_out, tokens, d, iters, hc_eps,
                N=n, BLOCK_T=meta["BLOCK_T"], APPLY_D=meta["APPLY_D"], HAS_NORM=has_norm,
                COMB_IN_APPLY=meta["COMB_IN_APPLY"], num_warps=cfg["num_warps"],
                **programmatic_launch(dev))
    return shaped_outputs(lead, n, d, new_res, out, post_out, comb_out)


def shaped_outputs(lead, n, d, new_res, out, post_out, comb_out):
    """The outputs with the input's leading dims; None for the ones the op does not produce."""
    shaped = lambda t, *tail: None if t is None else t.reshape(*lead, *tail)  # noqa: E731
    return shaped(new_res, n, d), shaped(out, d), shaped(post_out, n), shaped(comb_out, n, n)


# ----------------------------------------------------------------------------------------- ops and checks

def unsupported_arguments(res, x=None, post=None, comb=None, fn=None, base=None, scale=None, norm_w=None,
                          iters=1) -> str | None:
    """Why the Triton kernel cannot run these arguments, in one sentence; None when it can."""
    if not isinstance(res, torch.Tensor) or res.dim() < 2:
        return "mhc: res must be a tensor of shape [..., n, D]."
    n, d = res.shape[-2:]
    tensors = [t for t in (res, x, post, comb, fn, base, scale, norm_w) if t is not None]
    if res.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "mhc: the Triton kernels run CPU tensors only under TRITON_INTERPRET=1."
    if res.device.type not in ("cpu", "cuda"):
        return f"mhc: the Triton kernels do not run on {res.device.type} tensors."
    if any(t.device != res.device for t in tensors):
        return "mhc: all tensors must be on one device."
    if res.dtype not in _ACT_DTYPES:
        return f"mhc: the residual dtype {res.dtype} is not one of bf16, fp16, fp32."
    if not 2 <= n <= _MAX_STREAMS or d < 1:
        return f"mhc: n = {n} streams (2..{_MAX_STREAMS} supported) and D = {d} (at least 1)."
    if any(not t.is_floating_point() for t in tensors):
        return "mhc: every tensor argument must be floating point."
    lead = tuple(res.shape[:-2])
    if x is not None and (tuple(x.shape) != (*lead, d) or x.dtype != res.dtype):
        return f"mhc: x must be {[*lead, d]} in {res.dtype}, got {list(x.shape)} in {x.dtype}."
    if post is not None and tuple(post.shape) != (*lead, n):
        return f"mhc: post must be {[*lead, n]}, got {list(post.shape)}."
    if comb is not None and tuple(comb.shape) != (*lead, n, n):
        return f"mhc: comb must be {[*lead, n, n]}, got {list(comb.shape)}."
    mixes = (2 + n) * n
    if fn is not None and tuple(fn.shape) != (mixes, n * d):
        return f"mhc: fn must be [{mixes}, {n * d}] for n = {n}, D = {d}, got {list(fn.shape)}."
    if base is not None and base.numel() != mixes:
        return f"mhc: base must hold (2+n)·n = {mixes} values, got {base.numel()}."
    if scale is not None and scale.numel() != 3:
        return f"mhc: scale must hold 3 values, got {scale.numel()}."
    if norm_w is not None and tuple(norm_w.shape) != (d,):
        return f"mhc: norm_w must be [{d}], got {list(norm_w.shape)}."
    if not isinstance(iters, int) or iters < 1:
        return f"mhc: Sinkhorn iters must be a positive int, got {iters!r}."
    return None


def _checked(reason: str | None) -> None:
    if reason is not None:
        raise InputError(reason)


def supports_mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps,
                          *args, **kwargs):
    return unsupported_arguments(res, x, post, comb, fn, base, scale, norm_w, iters)


def supports_mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters, *args, **kwargs):
    return unsupported_arguments(res, fn=fn, base=base, scale=scale, iters=iters)


def supports_mhc_post(x, res, post, comb, *args, **kwargs):
    return unsupported_arguments(res, x, post, comb)


def mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps, config=None):
    """dflash.mhc_post_pre in one launch → (new_res, RMSNorm(layer_in)·w, post_next, comb_next)."""
    _checked(supports_mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps))
    return _launch("mhc_post_pre", res, x, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters,
                   norm_eps, config)


def mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters, config=None):
    """dflash.mhc_pre in one launch → (layer_in, post, comb)."""
    _checked(supports_mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters))
    _, layer_in, post, comb = _launch("mhc_pre", res, fn=fn, base=base, scale=scale, rms_eps=rms_eps,
                                      hc_eps=hc_eps, iters=iters, config=config)
    return layer_in, post, comb


def mhc_post(x, res, post, comb, config=None):
    """dflash.mhc_post in one launch → new_res."""
    _checked(supports_mhc_post(x, res, post, comb))
    return _launch("mhc_post", res, x, post, comb, config=config)[0]


register(Provider("mhc_post_pre", "triton", ("cuda", "rocm"), mhc_post_pre, priority=10,
                  supports=supports_mhc_post_pre, traceable=True))
register(Provider("mhc_pre", "triton", ("cuda", "rocm"), mhc_pre, priority=10, supports=supports_mhc_pre,
                  traceable=True))
register(Provider("mhc_post", "triton", ("cuda", "rocm"), mhc_post, priority=10, supports=supports_mhc_post,
                  traceable=True))


# ---------------------------------------------------------------------------------------------------- AOT

def _signature(kernel, dtype: torch.dtype, fn_presplit: bool = False) -> dict[str, str]:
    act = "*" + _TL_NAMES[dtype]
    fn = "*bf16" if fn_presplit else "*fp32"
    types = dict(x_ptr=act, res_ptr=act, post_ptr="*fp32", comb_ptr="*fp32", fn_ptr=fn, base_ptr="*fp32",
                 scale_ptr="*fp32", norm_w_ptr="*fp32", new_res_ptr=act, out_ptr=act, post_out_ptr="*fp32",
                 comb_out_ptr="*fp32", ws_ptr="*fp32", coef_ptr="*fp32", count_ptr="*i32", src_ptr=act,
                 T="i32", D="i32", split="i32", ws_tokens="i32", iters="i32", rms_eps="fp32", hc_eps="fp32",
                 norm_eps="fp32")
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def _buckets(op: str) -> tuple[str, ...]:
    return ("mhc.post",) if op == "mhc_post" else ("mhc.decode", "mhc.small", "mhc.medium", "mhc.wide", "mhc.large")


def _spec(name: str, kernel, meta: dict, num_warps: int, num_stages: int) -> KernelSpec:
    """A bf16 spec assuming what the JIT specializes for these launches: 16-byte aligned tensors, D % 16 == 0."""
    signature = _signature(kernel, torch.bfloat16, bool(meta.get("FN_PRESPLIT")))
    meta = {k: v for k, v in meta.items() if k in kernel.arg_names}
    return KernelSpec(name, kernel, signature, meta, num_warps, num_stages,
                      divisible_by_16=pointer_args(signature) + ("D",))


def aot_specs(fam: str = "cuda") -> list[KernelSpec]:
    """Every launch the launcher makes for bf16, n = 4, D ∈ {4096, 7168} with `fam`'s config rows (the main kernel
    and, for rows with apply_launch, the apply kernel; apply_launch 3: mhc_rows' three kernels). D is a runtime
    argument, so both hidden sizes share a binary wherever their constexprs agree."""
    shared: dict[tuple, tuple] = {}
    for op in _KINDS:
        for bucket in _buckets(op):
            cfg = launch_config(bucket, fam)
            for d in (4096, 7168):
                meta, _ = _plan(_Problem(op, 4, d, torch.bfloat16), cfg)
                if meta["HAS_PRE"] and cfg["apply_launch"] == 3:
                    launches = {f"_{name}": spec for name, spec in mhc_rows.kernels(meta, cfg, d).items()}
                else:
                    launches = {"": (_mhc_kernel, _main_meta(meta), cfg["num_warps"], cfg["num_stages"])}
                    if not meta["FINISH_HERE"]:
                        launches["_finish"] = (_mhc_finish_kernel, meta, cfg["num_warps"], cfg["num_stages"])
                    if meta["HAS_PRE"] and not meta["FINISH_INLINE"]:
                        launches["_apply"] = (_mhc_apply_kernel, meta, cfg["num_warps"], cfg["num_stages"])
                for suffix, (kernel, constexprs, warps, stages) in launches.items():
                    key = (kernel.fn.__name__, tuple(sorted((k, v) for k, v in constexprs.items()
                                                            if k in kernel.arg_names)), warps, stages)
                    name = f"{op}_{bucket.split('.')[1]}{suffix}_bf16_n4"
                    sizes = shared.setdefault(key, (name, kernel, constexprs, warps, stages, []))[5]
                    sizes += [d] if d not in sizes else []
    return [_spec(f"{name}_D{'+'.join(map(str, ds))}", kernel, constexprs, warps, stages)
            for name, kernel, constexprs, warps, stages, ds in shared.values()]
