"""A split-K Triton GEMM for decode-sized inputs: y[M, N] = x[M, K] @ w[N, K]ᵀ with M ≤ 32 (nn.Linear's layout).

At M ≤ 32 a GEMM is a weight stream: the bytes of w dominate and the math is idle. So each program owns a
[BLOCK_N rows of w] × [one of SPLIT_K slices of K] tile, reads it once with wide loads along K (w is K-contiguous),
and multiplies it by the matching xᵀ slice (tiny, from L2): acc[BLOCK_N, BLOCK_M] += w_tile @ xᵀ_tile — w is the
MMA's M operand ("swap AB"), so a 16-row x still fills a 64-row tensor-core tile. N / BLOCK_N × SPLIT_K programs
keep every SM streaming even when N / BLOCK_N alone would not. With SPLIT_K > 1 each program stores its fp32
partial tile to a workspace and takes an arrival ticket (the pattern of mhc.py); the last slice of an N tile to
arrive sums the SPLIT_K partials in slice order (deterministic) and stores y — one launch, no memset, no atomics
on the data. An optional bias is added in fp32 by whichever program stores y. `skinny_gemm_joined` (constexpr
JOINED) takes the rows of cat([front, x], 1) from the two tensors — each row's pointer chosen once, before the K
loop — so the draft's context and block rows share one weight stream without a cat. `skinny_gemm_glu` (GLU) stores
silu(gate)·up of w's halves; `skinny_gemm_glu_norm` (GLU + NORM) takes the rows as rms_norm(x + residual), the norm
applied inside the K loop (one slice; docs/kernels/skinny_gemm.md "The norm in front"); `skinny_gemm_add_stats`
(STATS) adds a residual where it stores y and stores the next RMSNorm's weighted rows and sums of squares per 64
columns beside it ("The statistic after it"); `skinny_gemm_glu(..., x_sumsq=…)` (DEFERRED) reads such weighted rows
and scales each row of its product by the norm's 1/rms from those sums.

`gemm_config(m, n, k, family)` derives the launch from configs.TABLE["skinny_gemm"] (the rule and the H100 sweep
behind it: docs/kernels/skinny_gemm.md); compiler/triton/linear.py serves dflash.linear with it.
"""

import os

import torch
import triton
import triton.language as tl

from ...errors import InputError
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, prefetch_to_l2, programmatic_launch, wrap_triton
from .mhc import _arrival_counters
from .norm_rope import DTYPES, _compilable, _signature, family_of, row_sumsq_reason

MAX_M = 32


@triton.jit
def _store_tile(y_ptr, value, rm, rn, row_ok, pid_n, M, N, stride_ym, residual, norm_w, sw_ptr, sq_ptr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GLU: tl.constexpr, STATS: tl.constexpr):
    """y[m, n] = value[n, m] in y's dtype. GLU: value's rows are the gate rows, then the up rows, of the tile's
    BLOCK_N / 2 output columns; y[m, c] = silu(gate) · up of their y-dtype values, in fp32. STATS: y = s, the
    y-dtype value plus the residual tile [BLOCK_N, BLOCK_M] (rounded like the two ops), sw = s · norm_w
    [BLOCK_N, 1], and Σ s² of each 64 columns into sq [M, N / 64]."""
    if STATS:
        tile = rm[None, :] * stride_ym + rn[:, None]
        ok = row_ok[:, None] & (rm[None, :] < M)
        total = (value.to(y_ptr.dtype.element_ty).to(tl.float32) + residual.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + tile, total, mask=ok)
        exact = total.to(tl.float32)
        tl.store(sw_ptr + tile, (exact * norm_w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)
        groups = pid_n * (BLOCK_N // 64) + tl.arange(0, BLOCK_N // 64)
        sums = tl.sum(tl.reshape(exact * exact, (BLOCK_N // 64, 64, BLOCK_M)), axis=1)
        tl.store(sq_ptr + rm[None, :] * (N // 64) + groups[:, None], sums,
                 mask=(groups < N // 64)[:, None] & (rm[None, :] < M))
    elif GLU:
        v = value.to(y_ptr.dtype.element_ty).to(tl.float32)
        gate, up = tl.split(tl.permute(tl.reshape(v, (2, BLOCK_N // 2, BLOCK_M)), (1, 2, 0)))
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + rm[None, :] * stride_ym + cols[:, None],
                 (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty),
                 mask=(cols < N // 2)[:, None] & (rm[None, :] < M))
    else:
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], value.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (rm[None, :] < M))


@triton.jit
def skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       front_ptr, ROWS, FRONT, stride_xb, stride_fb, stride_fm, res_ptr, s_ptr, eps,
                       nw_ptr, sw_ptr, sq_ptr, xsq_ptr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, JOINED: tl.constexpr, GLU: tl.constexpr,
                       NORM: tl.constexpr, STATS: tl.constexpr, DEFERRED: tl.constexpr, SQ_GROUPS: tl.constexpr,
                       WIDEN_DOT: tl.constexpr, PREFETCH_K: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    sl = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    if GLU:  # w = [gate; up] (N = 2·I rows): the tile's rows are BLOCK_N / 2 gate rows, then the same up rows
        j = tl.arange(0, BLOCK_N)
        col = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2)
        rn = col + (j >= BLOCK_N // 2).to(tl.int32) * (N // 2)
        row_ok = col < N // 2
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = sl * span
    k_end = tl.minimum(k_start + span, K)
    if PDL and PREFETCH_K > 0:  # w depends on no kernel: its first PREFETCH_K columns head for L2 while we wait
        lines = k_start + tl.arange(0, PREFETCH_K // 64) * 64
        prefetch_to_l2(w_ptr + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * stride_wn
                       + tl.minimum(lines, K - 1)[None, :])
    await_previous_grid(PDL)
    if STATS:  # loaded before the K loop by every program: the one that stores the tile has them at hand
        residual = tl.load(res_ptr + rm[None, :] * stride_ym + rn[:, None], mask=row_ok[:, None] & (rm[None, :] < M),
                           other=0.0)
        norm_w = tl.load(nw_ptr + rn, mask=row_ok, other=0.0)[:, None]
    else:
        residual = 0.0
        norm_w = 0.0
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_start + rk)[None, :]
    if JOINED:  # row r = (b, t) of cat([front, x], 1): t < FRONT from front[b, t], else x[b, t - FRONT]
        b = rm // ROWS
        t = rm - b * ROWS
        from_front = (t < FRONT)[None, :]
        x_ptrs = tl.where(from_front, front_ptr + (b * stride_fb + t * stride_fm)[None, :],
                          x_ptr + (b * stride_xb + (t - FRONT) * stride_xm)[None, :]) + (k_start + rk)[:, None]
    else:
        x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_start + rk)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if NORM:  # x's rows are rms_norm(s) (no weight) for s = x + residual: x and residual go to the tensor cores as
        # loaded (two dots, no register round trip in front of them), Σ s² of the rounded s accumulates beside
        ssq = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        s_rows = tl.where(pid_n == 0, M, 0)  # the N-tile-0 programs store s (a mask, not a branch in the loop)
        r_ptrs = res_ptr + rm[None, :] * stride_xm + (k_start + rk)[:, None]
        s_ptrs = s_ptr + rm[None, :] * stride_xm + (k_start + rk)[:, None]
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + rk) < K
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & (rm[None, :] < M), other=0.0)
        if NORM:
            tk_ok = k_ok[:, None] & (rm[None, :] < M)
            rt = tl.load(r_ptrs, mask=tk_ok, other=0.0)
            st = (xt.to(tl.float32) + rt.to(tl.float32)).to(xt.dtype)
            tl.store(s_ptrs, st, mask=k_ok[:, None] & (rm[None, :] < s_rows))
            sf = st.to(tl.float32)
            ssq += sf * sf
            if WIDEN_DOT:
                acc += tl.dot(w.to(tl.float32), rt.to(tl.float32))
            else:
                acc += tl.dot(w, rt)
            r_ptrs += BLOCK_K
            s_ptrs += BLOCK_K
        if WIDEN_DOT:   # the interpreter's bf16 tl.dot multiplies raw bits (attention_common.widen_dot)
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc += tl.dot(w, xt)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if NORM:  # one slice holds the whole row (the launcher's rule): its statistic scales the product's columns
        acc *= tl.math.rsqrt(tl.sum(ssq, axis=0) / K + tl.cast(eps, tl.float32))[None, :]
    if DEFERRED:  # x's rows are an RMSNorm's weighted rows: each row's 1/rms from the 64-column sums of squares a
        groups = tl.arange(0, SQ_GROUPS)  # STATS GEMM stored (any K slice: the product is linear in the row)
        sq = tl.load(xsq_ptr + rm[None, :] * (K // 64) + groups[:, None],
                     mask=(groups < K // 64)[:, None] & (rm[None, :] < M), other=0.0)
        acc *= tl.math.rsqrt(tl.sum(sq, axis=0) / K + tl.cast(eps, tl.float32))[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        bias = 0.0
    if SPLIT_K == 1:
        _store_tile(y_ptr, acc + bias, rm, rn, row_ok, pid_n, M, N, stride_ym, residual, norm_w, sw_ptr, sq_ptr,
                    BLOCK_N, BLOCK_M, GLU, STATS)
    else:
        out_ok = row_ok[:, None] & (rm[None, :] < M)
        tile = rm[None, :] * N + rn[:, None]
        tl.store(ws_ptr + sl * BLOCK_M * N + tile, acc, mask=out_ok)
        # The ticket's acq_rel orders the other slices' partial stores (each made before a CTA barrier) before
        # the last one's loads; .cg reads them from L2.
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * BLOCK_M * N + tile, mask=out_ok, other=0.0, cache_modifier=".cg")
            _store_tile(y_ptr, total + bias, rm, rn, row_ok, pid_n, M, N, stride_ym, residual, norm_w, sw_ptr,
                        sq_ptr, BLOCK_N, BLOCK_M, GLU, STATS)
            tl.store(count_ptr + pid_n, 0)  # leave the ticket ready for the next launch


def unsupported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                front: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot compute x [M, K] @ w [N, K]ᵀ (+ bias [N]) — or, with `front`, cat([front [B, C, K],
    x [B, S, K]], 1) @ wᵀ — or None."""
    if front is not None:
        if front.dim() != 3 or x.dim() != 3 or front.shape[0] != x.shape[0] or front.shape[2] != x.shape[2]:
            return (f"skinny_gemm: front and x must be [B, C, K] and [B, S, K], got {tuple(front.shape)} and "
                    f"{tuple(x.shape)}.")
        if front.dtype != x.dtype or front.device != x.device:
            return "skinny_gemm: front and x must share dtype and device."
        rows = (front.shape[0] * (front.shape[1] + x.shape[1]), x.shape[2])
    else:
        rows = tuple(x.shape)
    if len(rows) != 2 or w.dim() != 2 or rows[1] != w.shape[1]:
        return f"skinny_gemm: x must be [M, K] and w [N, K], got {rows} and {tuple(w.shape)}."
    if not 1 <= rows[0] <= MAX_M:
        return f"skinny_gemm: x has {rows[0]} rows; the kernel takes 1 to {MAX_M}."
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return f"skinny_gemm: x and w must both be bf16 or fp16, got {x.dtype} and {w.dtype}."
    if bias is not None and (tuple(bias.shape) != (w.shape[0],) or bias.dtype != x.dtype):
        return f"skinny_gemm: bias must be [{w.shape[0]}] in {x.dtype}, got {tuple(bias.shape)} in {bias.dtype}."
    device = x.device if front is None else front.device
    tensors = (w,) if bias is None else (w, bias)
    if any(t.device != device for t in tensors) or (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "skinny_gemm: x, w and bias must be on one GPU (CPU tensors only under TRITON_INTERPRET=1)."
    return None


def serves(m: int, n: int, k: int, family: str) -> bool:
    """Whether the kernel beats the vendor GEMM at this shape (configs.TABLE["skinny_gemm"]): every shape up to
    max_m_any_weight rows, up to max_m rows only weights of at least min_weight_elems elements."""
    row = launch_config("skinny_gemm", family)
    return 1 <= m and (m <= row["max_m_any_weight"] or (m <= row["max_m"] and n * k >= row["min_weight_elems"]))


def gemm_config(n: int, k: int, family: str) -> dict:
    """The launch for w [N, K] (docs/kernels/skinny_gemm.md): block_n the widest power of two in [min_block_n,
    max_block_n] that still gives `programs` N tiles (else min_block_n); split_k the largest power of two up to
    max_split that keeps tiles × split within `programs` (≈ 2 per SM: enough to stream, few enough that the
    partial tiles stay cheap); block_k, warps and stages from the row."""
    row = launch_config("skinny_gemm", family)
    block_n = row["max_block_n"]
    while block_n > row["min_block_n"] and triton.cdiv(n, block_n) < row["programs"]:
        block_n //= 2
    tiles, split = triton.cdiv(n, block_n), 1
    while split * 2 <= row["max_split"] and tiles * split * 2 <= row["programs"]:
        split *= 2
    return {"block_n": block_n, "block_k": row["block_k"], "split_k": split, "num_warps": row["num_warps"],
            "num_stages": row["num_stages"], "prefetch_k": row["prefetch_k"]}


def plan(m: int, n: int, k: int, config: dict) -> dict:
    """The kernel's constexprs for an [m, k] × [n, k]ᵀ problem: BLOCK_M the next power of two ≥ 16 of m,
    SPLIT_K capped so that every slice has at least one BLOCK_K step, PREFETCH_K the config's prefetch_k columns
    (whole 64-element lines) cut to a power of two within one slice."""
    block_n, block_k = config["block_n"], config["block_k"]
    split = max(1, min(config["split_k"], triton.cdiv(k, block_k)))
    span = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    prefetch = min(config.get("prefetch_k", 0), span)
    return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                EVEN=n % block_n == 0 and k % (split * block_k) == 0,
                PREFETCH_K=0 if prefetch < 64 else 1 << (prefetch.bit_length() - 1))


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, config: dict | None = None,
                out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ wᵀ (+ bias) (x [M ≤ 32, K], w [N, K], bf16 / fp16) in x's dtype; config overrides keys of
    gemm_config(N, K, family)."""
    reason = unsupported(x, w, bias)
    if reason:
        raise InputError(reason)
    x = x.contiguous()
    return _launch(x, w, bias, x.shape[0], (x.stride(0), 0, 0, 0, 0), None, config, out)


def skinny_gemm_glu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    config: dict | None = None, out: torch.Tensor | None = None, x_sumsq: torch.Tensor | None = None,
                    x_eps: float = 0.0) -> torch.Tensor:
    """h [M, I] = silu(y[:, :I]) · y[:, I:] for y = x @ wᵀ (+ bias) in x's dtype, w = [gate; up] [2·I, K]: the
    SwiGLU product in the GEMM's epilogue (each tile holds the gate and the up rows of the same columns), so the
    [M, 2·I] output is never stored; config overrides keys of gemm_config(2·I, K, family). With x_sumsq [M, K / 64]
    (fp32, skinny_gemm_add_stats's), x holds an RMSNorm's weighted rows: each row of the product is scaled by
    rsqrt(Σ x_sumsq / K + x_eps) before the bias — the norm finished after the GEMM, as the qkv epilogue does."""
    reason = unsupported(x, w, bias) or (None if w.shape[0] % 2 == 0 else
                                         f"skinny_gemm: a [gate; up] weight has an even row count, not {w.shape[0]}.")
    if not reason and (why := row_sumsq_reason(x, x_sumsq)):
        reason = f"skinny_gemm: {why}."
    if reason:
        raise InputError(reason)
    x = x.contiguous()
    deferred = None if x_sumsq is None else (x_sumsq.contiguous(), x_eps)
    return _launch(x, w, bias, x.shape[0], (x.stride(0), 0, 0, 0, 0), None, config, out, glu=True, deferred=deferred)


def skinny_gemm_glu_norm(x: torch.Tensor, residual: torch.Tensor, eps: float, w: torch.Tensor,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, s): s = x + residual in x's dtype and h = skinny_gemm_glu(rms_norm(s, None, eps), w, bias) — the norm's
    weight, if any, folded into w's columns beforehand (passes/add_rms_norm_linear_silu_mul.py). The GEMM applies
    the norm: x and residual are both dot operands, Σ s² accumulates in the K loop, each row's 1/rms scales the
    product before the bias and the SwiGLU; one K slice per program, so a program sees whole rows. The N-tile-0
    programs store s. Not bitwise the two-kernel path, which rounds s and the normed row before the product."""
    reason = unsupported(x, w, bias) or _norm_reason(x, residual, w)
    if reason:
        raise InputError(reason)
    x, residual = x.contiguous(), residual.contiguous()
    total = torch.empty_like(x)
    h = _launch(x, w, bias, x.shape[0], (x.stride(0), 0, 0, 0, 0), None, None, None, glu=True,
                norm=(residual, total, eps))
    return h, total


def skinny_gemm_add_stats(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                          norm_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, sw, sumsq) = dflash.linear_add_norm_stats for x [M ≤ 32, K]: s = x @ wᵀ (+ bias) + residual [M, N], sw =
    s · norm_w, sumsq [M, N / 64] fp32 — all three stored by the program that stores the tile (N % 64 == 0)."""
    n = w.shape[0]
    reason = unsupported(x, w, bias) or (
        None if residual.shape == (x.shape[0], n) and residual.dtype == x.dtype and residual.device == x.device else
        f"skinny_gemm: the residual must be [{x.shape[0]}, {n}] in {x.dtype}, got {tuple(residual.shape)}.") or (
        None if n % 64 == 0 else f"skinny_gemm: sums of squares per 64 columns need N % 64 == 0, not {n}.")
    if reason:
        raise InputError(reason)
    x = x.contiguous()
    weighted = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    sumsq = torch.empty(x.shape[0], n // 64, dtype=torch.float32, device=x.device)
    norm_w = w.new_ones(n) if norm_w is None else norm_w.contiguous()
    total = _launch(x, w, bias, x.shape[0], (x.stride(0), 0, 0, 0, 0), None, None, None,
                    stats=(residual.contiguous(), norm_w, weighted, sumsq))
    return total, weighted, sumsq


def _norm_reason(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor) -> str | None:
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        return f"skinny_gemm: the residual must match x ({tuple(x.shape)} {x.dtype}), got {tuple(residual.shape)}."
    if w.shape[0] % 2:
        return f"skinny_gemm: a [gate; up] weight has an even row count, not {w.shape[0]}."
    return None


def skinny_gemm_joined(front: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                       config: dict | None = None) -> torch.Tensor:
    """y [B·(C+S), N] = cat([front [B, C, K], x [B, S, K]], 1).flatten(0, 1) @ wᵀ (+ bias), B·(C+S) ≤ 32, without
    the cat: each row's x tile is loaded from front or x (the draft's context and block rows through one weight
    stream)."""
    reason = unsupported(x, w, bias, front=front)
    if reason:
        raise InputError(reason)
    return launch_joined(front, x, w, bias, config)


def launch_joined(front: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """skinny_gemm_joined without its checks, for a caller that made them (`unsupported(..., front=front)`)."""
    front, x = _unit_rows(front), _unit_rows(x)
    (batch, c, _), s = front.shape, x.shape[1]
    return _launch(x, w, bias, batch * (c + s), (x.stride(1), x.stride(0), front.stride(0), front.stride(1), c + s),
                   front, config, None)


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, w, bias, m, strides, front, config, out, glu: bool = False, norm=None, stats=None,
            deferred=None) -> torch.Tensor:
    """strides: (x's row, x's batch, front's batch, front's row, rows per batch) — the last four only with front.
    glu: y holds silu(gate) · up, N / 2 columns (a tile's BLOCK_N rows: BLOCK_N / 2 gate, as many up).
    norm: (residual, s, eps) — x's rows are rms_norm(x + residual) without a weight (the sum stored to s), one K
    slice. stats: (residual, norm_w, sw, sumsq) — y = y + residual, sw = y · norm_w, sumsq [M, N / 64] the Σ y² of
    each 64 columns (N tiles of at least 64 rows). deferred: (x_sumsq [M, K / 64], eps) — x's rows scaled by
    rsqrt(Σ x_sumsq / K + eps) after the product."""
    w = w.contiguous()
    n, k = w.shape
    cfg = {**gemm_config(n, k, family_of(w)), **(config or {}), **({"split_k": 1} if norm else {})}
    if stats:
        cfg["block_n"] = max(cfg["block_n"], 64)
    meta = plan(m, n, k, cfg)
    residual, total, eps = norm or (x, x, 0.0)
    x_sumsq, eps = deferred if deferred else (x, eps)
    if stats:
        residual, norm_w, weighted, sumsq = stats
    else:
        norm_w = weighted = sumsq = x
    y = out if out is not None else torch.empty(m, n // 2 if glu else n, dtype=x.dtype, device=x.device)
    tiles, split = triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
    ws = torch.empty(split * meta["BLOCK_M"] * n if split > 1 else 1, dtype=torch.float32, device=x.device)
    counters = _arrival_counters(x, tiles if split > 1 else 1)
    stride_xm, stride_xb, stride_fb, stride_fm, rows = strides
    wrap_triton(skinny_gemm_kernel)[(tiles, split)](
        x, w, x if bias is None else bias.contiguous(), y, ws, counters, m, n, k, stride_xm, w.stride(0),
        y.stride(0), x if front is None else front, rows, 0 if front is None else front.shape[1], stride_xb,
        stride_fb, stride_fm, residual, total, eps, norm_w, weighted, sumsq, x_sumsq, **meta,
        HAS_BIAS=bias is not None, JOINED=front is not None, GLU=glu, NORM=norm is not None, STATS=stats is not None,
        DEFERRED=deferred is not None, SQ_GROUPS=triton.next_power_of_2(k // 64) if deferred else 1,
        WIDEN_DOT=x.device.type != "cuda", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **programmatic_launch(x.device))
    return y


def gemm_spec(dtype: torch.dtype, block_m: int, n: int, k: int, bias: bool = False, family: str = "cuda",
              joined: bool = False, glu: bool = False, norm: bool = False, stats: bool = False,
              deferred: bool = False) -> KernelSpec:
    """The build gemm_config(n, k, family) launches for up to block_m rows (`joined`: from front and x; `glu`: the
    SwiGLU product of w's halves; `norm`: x's rows normalized with a residual, one K slice; `stats`: the residual
    added and the norm's weighted rows and sums of squares stored; `deferred`: x's rows scaled by a norm's 1/rms
    from those sums): N and K tile multiples (EVEN), 16-byte aligned pointers and strides divisible by 16."""
    config = {**gemm_config(n, k, family), **({"split_k": 1} if norm else {})}
    if stats:
        config["block_n"] = max(config["block_n"], 64)
    meta = plan(block_m, n, k, config)
    split = meta["SPLIT_K"]
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=config["block_n"], BLOCK_K=config["block_k"], SPLIT_K=split,
                      EVEN=True, HAS_BIAS=bias, JOINED=joined, GLU=glu, NORM=norm, STATS=stats, DEFERRED=deferred,
                      SQ_GROUPS=triton.next_power_of_2(k // 64) if deferred else 1, WIDEN_DOT=False,
                      PREFETCH_K=meta["PREFETCH_K"])
    fn = _compilable(skinny_gemm_kernel)
    dt = "*" + DTYPES[dtype]
    pointers = {"x_ptr": dt, "w_ptr": dt, "b_ptr": dt, "y_ptr": dt, "ws_ptr": "*fp32", "count_ptr": "*i32",
                "front_ptr": dt, "res_ptr": dt, "s_ptr": dt, "nw_ptr": dt, "sw_ptr": dt, "sq_ptr": "*fp32",
                "xsq_ptr": "*fp32"}
    signature = _signature(fn, pointers, ("eps",), constexprs)
    strides = ("stride_xm", "stride_wn", "stride_ym") + (("stride_xb", "stride_fb", "stride_fm") if joined else ())
    flags = "".join(f",{name}" for name, on in (("bias", bias), ("joined", joined), ("glu", glu), ("norm", norm),
                                                ("stats", stats), ("deferred", deferred)) if on)
    return KernelSpec(f"skinny_gemm[{DTYPES[dtype]},m{block_m},n{config['block_n']},k{config['block_k']},"
                      f"split{split}{flags},{family}]", fn, signature, constexprs, num_warps=config["num_warps"],
                      num_stages=config["num_stages"], divisible_by_16=pointer_args(signature) + ("N", "K") + strides)
