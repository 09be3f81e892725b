"""The mHC boundary without a Gram matrix: token tiles of 16 to 128 for the GEMV, whole rows for the norm (config
`apply_launch` 3 — every cuda row of mhc_post_pre / mhc_pre; mhc.py's launcher calls `launch`).

mhc.py's `_mhc_kernel` folds the norm's statistic into phase 1 as a Gram matrix of the inputs: each phase-1 step
carries up to n + 1 row reductions and the finisher 15 more column sums (n 4). Here the statistic is the reference's
own, taken by the rows launch over whole rows, so phase 1 is loads, FMAs, stores and dots:

  `_wide_kernel`, grid (split, token blocks of BLOCK_T): the token's mixers (post, comb) loaded once; per chunk of
      BLOCK_D columns, x and the n res tiles loaded together; each new_res[j] = post_j·x + Σ_i comb[i, j]·res[i] is
      stored in the activation dtype and feeds Σ new_res² (an element-wise accumulator, reduced once at the end) and
      the mixes against fn's bf16 parts on tensor cores with M = BLOCK_T → fp32 partials [column, token, slice]: the
      (2+n)·n mixes and Σ new_res². With config `finish_here` the last slice of a token block to arrive (an atomic
      ticket) finishes the block (`_finish_tokens`: r, pre → coef, post, and the comb's mixes·r for the rows launch).
  `_finish_kernel` (rows without finish_here), 32·FINISH_WARPS tokens per program, one per thread: the same scalars,
      the comb's softmax + Sinkhorn included.
  `_rows_kernel`, apply_rows tokens per program with their whole rows in registers: layer_in = Σ_k pre_k·new_res_k
      rounded as the reference rounds it, Σ layer_in² of that rounded row (the reference's own statistic), then
      (layer_in·r_in)·w; with finish_here its first programs, one token per thread, run the comb's softmax +
      Sinkhorn beside the rows.

Bytes: phase 1 reads x, res and writes new_res (18·D per token in bf16 at n 4); the rows kernel re-reads new_res and
writes the output (10·D): 28·D against the floor's 20·D.

The layout barrier (config `layout_barrier`, cuda rows): new_res[j] has two consumers, the store (a coalesced
blocked layout) and the dot (the tensor-core operand layout), and Triton's layout pass then computes the whole chain
x, res → new_res[j] twice, once in each layout (seen in the TTGIR: every local_load, FMA and rounding doubled). An
identity in PTX (`mov.b32`, not pure: declared pure, triton 3.6 rematerializes through it — H100 D 4096 T 16 11.3 →
14.0 µs, T 4096 217 → 259) between the rounding and the dot stops that: one chain, and the dot operand is converted
once. sm_90, triton 3.9 AOT: 227 → 168 registers at block 32×32, 4 warps; H100: 309 → 262 µs at D 4096, T 4096.
Launches traced for Inductor leave it out: torch's mutation analysis of a `wrap_triton` kernel gives up on impure
inline assembly and then treats every input as written (Inductor would copy them per call). The ROCm row leaves it
off (the identity is PTX). docs/kernels/mhc.md has the measurements.
"""

import torch
import triton
import triton.language as tl

from .launch import await_previous_grid, programmatic_launch, traced, wrap_triton
from .mhc_math import comb_from_logits, comb_logits, comb_or_its_mixes, layer_in, mix_partial, pre_post, slice_sum

FINISH_WARPS = 4  # the finish kernel: 32·FINISH_WARPS tokens per program, one per thread


@triton.jit
def _wide_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, fn_ptr, new_res_ptr, ws_ptr, T, D, split, ws_tokens,
                 count_ptr, base_ptr, scale_ptr, post_out_ptr, comb_out_ptr, coef_ptr, rms_eps, hc_eps,
                 N: tl.constexpr, NM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 FN_PARTS: tl.constexpr, FN_PRESPLIT: tl.constexpr, INTERPRETED: tl.constexpr,
                 HAS_POST: tl.constexpr, LAYOUT_BARRIER: tl.constexpr, FINISH_HERE: tl.constexpr,
                 L2_HINTS: tl.constexpr, SPLIT_P2: tl.constexpr, PDL: tl.constexpr):
    """Phase 1 of one (D slice, token block): new_res stored (HAS_POST; mhc_pre reads res), partials to ws.
    FINISH_HERE: the last slice of the block to arrive (an atomic ticket) finishes its tokens (`_finish_tokens`,
    the comb left as mixes·r for the rows launch) — no finish launch. L2_HINTS (HAS_POST): new_res, which the rows
    launch reads again, is kept in L2 before x and res, which nothing reads again, so more of it is still there."""
    READ_ONCE: tl.constexpr = "evict_first" if L2_HINTS else ""
    READ_AGAIN: tl.constexpr = "evict_last" if L2_HINTS else ""
    await_previous_grid(PDL)
    NMIX: tl.constexpr = (2 + N) * N
    sl = tl.program_id(0)
    tb = tl.program_id(1)
    t0 = tb.to(tl.int64) * BLOCK_T
    x_ptr += t0 * D
    res_ptr += t0 * (N * D)
    new_res_ptr += t0 * (N * D)
    tt = tl.arange(0, BLOCK_T)
    t_ok = tt < T - t0
    tok = t0 + tt
    mixes = tl.zeros((BLOCK_T, NM), tl.float32)
    ssq = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    chunks = tl.cdiv(D, BLOCK_D)
    per_slice = tl.cdiv(chunks, split)
    first = sl * per_slice
    if HAS_POST:  # the token's mixers, once (in registers: the stream loop below is unrolled)
        combs = ()
        for q in tl.static_range(N * N):
            combs = combs + (tl.load(comb_ptr + tok * (N * N) + q, mask=t_ok, other=0.0),)
        posts = ()
        for q in tl.static_range(N):
            posts = posts + (tl.load(post_ptr + tok * N + q, mask=t_ok, other=0.0),)
    for c in range(first, tl.minimum(first + per_slice, chunks)):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        td_ok = t_ok[:, None] & d_ok[None, :]
        rows = tt[:, None] * (N * D) + d[None, :]
        if HAS_POST:
            x = tl.load(x_ptr + tt[:, None] * D + d[None, :], mask=td_ok, other=0.0,
                        eviction_policy=READ_ONCE).to(tl.float32)
            res = ()
            for i in tl.static_range(N):
                res = res + (tl.load(res_ptr + rows + i * D, mask=td_ok, other=0.0, eviction_policy=READ_ONCE),)
        for j in tl.static_range(N):
            if HAS_POST:
                mix = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                for i in tl.static_range(N):
                    mix += combs[i * N + j][:, None] * res[i].to(tl.float32)
                post_j = posts[j]
                new_j = (post_j[:, None] * x + mix).to(new_res_ptr.dtype.element_ty)
                tl.store(new_res_ptr + rows + j * D, new_j, mask=td_ok, eviction_policy=READ_AGAIN)
                f = new_j.to(tl.float32)
            else:
                f = tl.load(res_ptr + rows + j * D, mask=td_ok, other=0.0).to(tl.float32)
            ssq += f * f
            if LAYOUT_BARRIER:  # an identity Triton cannot see through: see the module docstring
                f = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [f], dtype=tl.float32, is_pure=False,
                                              pack=1)
            mixes = mix_partial(f, fn_ptr + j * D, d, d_ok, D, mixes, N, NM, FN_PARTS, FN_PRESPLIT, INTERPRETED)
    cols = tl.arange(0, NM)[None, :]
    tl.store(ws_ptr + (cols * ws_tokens + tok[:, None]) * split + sl, mixes, mask=cols < NMIX)
    tl.store(ws_ptr + (NMIX * ws_tokens + tok) * split + sl, tl.sum(ssq, axis=1))
    if FINISH_HERE:
        # the ticket's acq_rel orders the other slices' partials (each stored before a CTA barrier) before our loads
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + tb, 1, sem="acq_rel", scope="gpu") == split - 1:
            _finish_tokens(ws_ptr, tok, tt, t_ok, ws_tokens, split, D, rms_eps, hc_eps, base_ptr, scale_ptr,
                           post_out_ptr + t0 * N, comb_out_ptr + t0 * (N * N), coef_ptr, 1, N, SPLIT_P2, True)
            tl.store(count_ptr + tb, 0)  # leave the ticket ready for the next launch


@triton.jit
def _finish_tokens(ws_ptr, tok, tt, t_ok, ws_tokens, split, D, rms_eps, hc_eps, base_ptr, scale_ptr, post_out_ptr,
                   comb_out_ptr, coef_ptr, iters, N: tl.constexpr, SPLIT_P2: tl.constexpr, COMB_LATER: tl.constexpr):
    """The scalars of tokens `tok` from the slices' partials: post to post_out, pre to coef [tokens, N]; the comb
    (softmax + Sinkhorn) to comb_out, or (COMB_LATER) its mixes·r there for the rows launch to finish.
    post_out and comb_out point at the first of the tokens (indexed by tt)."""
    NMIX: tl.constexpr = (2 + N) * N
    rms_eps = tl.cast(rms_eps, tl.float32)  # fp32 as eager Triton types Python floats (Inductor: fp64)
    hc_eps = tl.cast(hc_eps, tl.float32)
    m = ()
    for q in tl.static_range(NMIX):
        m = m + (slice_sum(ws_ptr, tok, t_ok, q, ws_tokens, split, SPLIT_P2),)
    r = tl.math.rsqrt(slice_sum(ws_ptr, tok, t_ok, NMIX, ws_tokens, split, SPLIT_P2) / (N * D) + rms_eps)
    pre = pre_post(m, r, base_ptr, scale_ptr, hc_eps, post_out_ptr, tt, t_ok, N)
    for k in tl.static_range(N):
        tl.store(coef_ptr + tok * N + k, pre[k], mask=t_ok)
    comb_or_its_mixes(m, r, base_ptr, scale_ptr, hc_eps, iters, comb_out_ptr, tt, t_ok, N, COMB_LATER)


@triton.jit
def _finish_kernel(base_ptr, scale_ptr, post_out_ptr, comb_out_ptr, coef_ptr, ws_ptr, T, D, split, ws_tokens,
                   iters, rms_eps, hc_eps, N: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                   PDL: tl.constexpr):
    """The scalars of BLOCK tokens (one per thread: the serial softmax + Sinkhorn chain is not repeated by other
    warps) from the slices' partials: post, comb to the outputs, pre to coef [tokens, N] for the rows kernel."""
    await_previous_grid(PDL)
    t0 = tl.program_id(0).to(tl.int64) * BLOCK
    tt = tl.arange(0, BLOCK)
    t_ok = tt < T - t0
    _finish_tokens(ws_ptr, t0 + tt, tt, t_ok, ws_tokens, split, D, rms_eps, hc_eps, base_ptr, scale_ptr,
                   post_out_ptr + t0 * N, comb_out_ptr + t0 * (N * N), coef_ptr, iters, N, SPLIT_P2, False)


@triton.jit
def _rows_kernel(src_ptr, coef_ptr, norm_w_ptr, out_ptr, comb_out_ptr, base_ptr, scale_ptr, T, D, norm_eps, iters,
                 hc_eps, N: tl.constexpr, ROWS: tl.constexpr, D_P2: tl.constexpr, HAS_NORM: tl.constexpr,
                 COMB_TOKENS: tl.constexpr, PDL: tl.constexpr):
    """Phase 2 of ROWS tokens over whole rows held in registers: layer_in = Σ_k pre_k·src_k (src: new_res, or res
    for mhc_pre) rounded as the reference rounds it, then (HAS_NORM) the reference's RMSNorm of that rounded row.
    COMB_TOKENS > 0: the first programs, COMB_TOKENS tokens each (one per thread), turn the comb's mixes·r that the
    finish left in comb_out into comb (softmax + Sinkhorn) beside the rows."""
    await_previous_grid(PDL)
    pid = tl.program_id(0)
    if COMB_TOKENS > 0:
        comb_programs = tl.cdiv(T, COMB_TOKENS)
        if pid < comb_programs:
            ct = tl.arange(0, COMB_TOKENS)
            c_ok = ct < T - pid * COMB_TOKENS
            comb_out_ptr += pid.to(tl.int64) * COMB_TOKENS * (N * N)
            mr = ()
            for q in tl.static_range(N * N):
                mr = mr + (tl.load(comb_out_ptr + ct * (N * N) + q, mask=c_ok, other=0.0),)
            comb_from_logits(comb_logits(mr, base_ptr, scale_ptr, N), tl.cast(hc_eps, tl.float32), iters,
                             comb_out_ptr, ct, c_ok, N)
            return
        pid -= comb_programs
    norm_eps = tl.cast(norm_eps, tl.float32)
    t0 = pid.to(tl.int64) * ROWS
    tt = tl.arange(0, ROWS)
    t_ok = tt < T - t0
    tok = t0 + tt
    d = tl.arange(0, D_P2)
    td_ok = t_ok[:, None] & (d[None, :] < D)
    pre = ()
    for k in tl.static_range(N):
        pre = pre + (tl.load(coef_ptr + tok * N + k, mask=t_ok, other=0.0),)
    li = layer_in(src_ptr, out_ptr, pre, tok, td_ok, d, D, N)
    if HAS_NORM:
        lf = li.to(tl.float32)
        r_in = tl.math.rsqrt(tl.sum(lf * lf, axis=1) / D + norm_eps)
        w = tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        li = ((lf * r_in[:, None]) * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tok[:, None] * D + d[None, :], li, mask=td_ok)


def rows_warps(rows: int, d: int) -> int:
    """The rows kernel's warps: ≈ 32 fp32 elements of the [rows, D] tile per thread (4..16 warps)."""
    return min(16, max(4, rows * triton.next_power_of_2(d) // 1024))


def kernels(meta: dict, cfg: dict, d: int) -> dict[str, tuple]:
    """name -> (kernel, constexprs, num_warps, num_stages) of the launches for one plan (mhc._plan's meta): wide,
    finish (unless the row's `finish_here`: the wide kernel's last slice finishes), rows."""
    rows = cfg["apply_rows"]
    finish_here = bool(cfg.get("finish_here", 0))
    wide = dict(N=meta["N"], NM=meta["NM"], BLOCK_T=meta["BLOCK_T"], BLOCK_D=meta["BLOCK_D"],
                FN_PARTS=meta["FN_PARTS"], FN_PRESPLIT=meta["FN_PRESPLIT"], INTERPRETED=meta["INTERPRETED"],
                HAS_POST=meta["HAS_POST"],
                LAYOUT_BARRIER=bool(cfg["layout_barrier"]) and not meta["INTERPRETED"] and not traced(),
                FINISH_HERE=finish_here, L2_HINTS=bool(cfg.get("l2_hints", 0)), SPLIT_P2=meta["SPLIT_P2"])
    rows_warp_count = rows_warps(rows, d)
    launches = {"wide": (_wide_kernel, wide, cfg["num_warps"], cfg["num_stages"])}
    if not finish_here:
        launches["finish"] = (_finish_kernel, dict(N=meta["N"], BLOCK=32 * FINISH_WARPS, SPLIT_P2=meta["SPLIT_P2"]),
                              FINISH_WARPS, 1)
    launches["rows"] = (_rows_kernel, dict(N=meta["N"], ROWS=rows, D_P2=triton.next_power_of_2(d),
                                           HAS_NORM=meta["HAS_NORM"], COMB_TOKENS=32 * rows_warp_count * finish_here),
                        rows_warp_count, 1)
    return launches


def launch(meta: dict, split: int, cfg: dict, tokens: int, d: int, x, res, post, comb, fn, base, scale, norm_w,
           new_res, out, post_out, comb_out, rms_eps, hc_eps, iters, norm_eps, counters,
           launches=("main", "apply")) -> None:
    """The launches into the caller's outputs. x, post, comb: stand-ins for mhc_pre (never read: HAS_POST off);
    new_res None for mhc_pre (the rows kernel then reads res); counters: zeroed tickets, one per token block (with
    the row's finish_here; else a stand-in, never read). `launches` (benchmarks): "main" is phase 1 and the finish, "apply" the rows
    kernel."""
    n, block_t = meta["N"], meta["BLOCK_T"]
    ws_tokens = triton.cdiv(tokens, block_t) * block_t
    ws = torch.empty(((2 + n) * n + 1) * ws_tokens * split, dtype=torch.float32, device=res.device)
    coef = torch.empty(tokens, n, dtype=torch.float32, device=res.device)
    src = res if new_res is None else new_res
    specs = kernels(meta, cfg, d)

    def run(name, grid, *args):
        kernel, constexprs, warps, stages = specs[name]
        wrap_triton(kernel)[grid](*args, **constexprs, num_warps=warps, num_stages=stages,
                                  **programmatic_launch(res.device))

    if "main" in launches:
        run("wide", (split, ws_tokens // block_t), x, res, post, comb, fn, src, ws, tokens, d, split, ws_tokens,
            counters, base, scale, post_out, comb_out, coef, rms_eps, hc_eps)
        if "finish" in specs:
            run("finish", (triton.cdiv(tokens, 32 * FINISH_WARPS),), base, scale, post_out, comb_out, coef, ws,
                tokens, d, split, ws_tokens, iters, rms_eps, hc_eps)
    if "apply" in launches:
        comb_tokens = specs["rows"][1]["COMB_TOKENS"]
        programs = triton.cdiv(tokens, cfg["apply_rows"]) + (triton.cdiv(tokens, comb_tokens) if comb_tokens else 0)
        run("rows", (programs,), src, coef, norm_w, out, comb_out, base, scale, tokens, d, norm_eps, iters, hc_eps)
