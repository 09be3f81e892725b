"""Triton kernels for per-head RMSNorm + neox rope, and the dflash.rms_norm / dflash.rope providers.

`norm_rope_heads_kernel` is the one epilogue every projection op uses: it reads a GEMM output laid out
[T, L·(n_q + 2·n_kv)·hd], and per (token block, head, layer) program RMS-normalizes q/k heads (fp32 statistics,
fp32 weight product), ropes them (rotate-half on the first rot_dim channels), copies v heads, and stores each
once, rounded to the activation dtype: q to [T, n_q, hd], k/v to [L, B, S, n_kv, hd] or into a KV cache at
per-token positions. dflash.rope alone is the same kernel with n_kv = 0 and no norm. `rms_norm_rows_kernel`
normalizes rows of any width (dflash.rms_norm), after adding the residual and storing the sum when asked
(dflash.add_rms_norm).
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ...errors import DFlashError
from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, programmatic_launch, wrap_triton

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_ROW = 32768     # widest rms_norm row: one tile of next_pow2(N) fp32 values per row


@triton.jit
def norm_rope_heads_kernel(
        proj_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, sq_ptr,
        T, S, N_Q, N_KV, S_DST, FRONT, eps, X_WIDTH, x_eps,
        stride_proj_l, stride_proj_t, stride_cos_b, stride_cos_s, stride_k_norm_l,
        stride_kv_l, stride_kv_b, stride_kv_s, stride_kv_h,
        HD: tl.constexpr, ROT: tl.constexpr, HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr,
        CACHE: tl.constexpr, JOINED: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
        ROW_SUMSQ: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    await_previous_grid(PDL)
    head = tl.program_id(1)
    layer = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, HD)
    rows = t < T
    mask = rows[:, None] & (d < HD)[None, :]
    t = t.to(tl.int64)
    b = t // S
    s = t - b * S
    src = proj_ptr + layer * stride_proj_l + t[:, None] * stride_proj_t + head * HD
    x = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if CACHE:
        s_dst = tl.load(pos_ptr + t, mask=rows, other=0).to(tl.int64)
        mask_dst = mask & ((s_dst >= 0) & (s_dst < S_DST))[:, None]
    else:
        s_dst = s
        mask_dst = mask
    if JOINED:  # the first FRONT rows of each batch row are context rows: no q, and a slot that a block row of
        # the same batch row also names keeps the block's k/v (the order of the reference's two writes)
        block_row = s >= FRONT
        q_row = t - (b + 1) * FRONT
        j = tl.arange(0, BLOCK_J)
        later = tl.load(pos_ptr + b[:, None] * S + FRONT + j[None, :], mask=rows[:, None] & (j < S - FRONT)[None, :],
                        other=-1)
        shadowed = tl.sum((later == s_dst[:, None]).to(tl.int32), axis=1) > 0
        mask_dst = mask_dst & (block_row | ~shadowed)[:, None]
        mask_q = mask & block_row[:, None]
    else:
        block_row = rows
        q_row = t
        mask_q = mask
    if ROW_SUMSQ:  # the block rows were projected from an RMSNorm's weighted rows: its 1/rms first (sq [rows, P])
        p = tl.arange(0, BLOCK_P)
        stat_ok = rows & block_row
        sums = tl.load(sq_ptr + q_row[:, None] * (X_WIDTH // 64) + p[None, :],
                       mask=stat_ok[:, None] & (p < X_WIDTH // 64)[None, :], other=0.0)
        row_scale = tl.where(stat_ok, tl.rsqrt(tl.sum(sums, axis=1) / X_WIDTH + tl.cast(x_eps, tl.float32)), 1.0)
        x = x * row_scale[:, None]
    kv_dst = layer * stride_kv_l + b[:, None] * stride_kv_b + s_dst[:, None] * stride_kv_s + d[None, :]
    if head < N_Q + N_KV:
        HALF: tl.constexpr = ROT // 2
        partner = tl.where(d < HALF, d + HALF, d - HALF)     # channels ≥ ROT: sin = 0 masks it
        xp = tl.load(src + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROW_SUMSQ:
            xp = xp * row_scale[:, None]
        if HAS_Q_NORM or HAS_K_NORM:
            if ((head < N_Q) & HAS_Q_NORM) | ((head >= N_Q) & HAS_K_NORM):
                w_ptr = k_norm_ptr + layer * stride_k_norm_l
                if head < N_Q:
                    w_ptr = q_norm_ptr
                r = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
                x = x * r * tl.load(w_ptr + d).to(tl.float32)[None, :]
                xp = xp * r * tl.load(w_ptr + partner).to(tl.float32)[None, :]
        rot = mask & (d < ROT)[None, :]
        table = b[:, None] * stride_cos_b + s[:, None] * stride_cos_s + d[None, :]
        c = tl.load(cos_ptr + table, mask=rot, other=1.0).to(tl.float32)
        sn = tl.load(sin_ptr + table, mask=rot, other=0.0).to(tl.float32)
        y = (x * c + tl.where((d < HALF)[None, :], -xp, xp) * sn).to(k_ptr.dtype.element_ty)
        if head < N_Q:
            tl.store(q_ptr + q_row[:, None] * (N_Q * HD) + head * HD + d[None, :], y, mask=mask_q)
        else:
            tl.store(k_ptr + kv_dst + (head - N_Q) * stride_kv_h, y, mask=mask_dst)
    else:
        y = x.to(v_ptr.dtype.element_ty)
        tl.store(v_ptr + kv_dst + (head - N_Q - N_KV) * stride_kv_h, y, mask=mask_dst)


@triton.jit
def normalized_rows(x, w_ptr, cols, N, eps, HAS_WEIGHT: tl.constexpr):
    """RMSNorm of the rows of x [BLOCK_M, BLOCK_N] over their N columns (the rest masked to 0), in fp32."""
    x = x.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def rms_norm_rows_kernel(x_ptr, residual_ptr, w_ptr, y_ptr, sum_ptr, sq_ptr, M, N, eps, HAS_RESIDUAL: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    await_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the sum rounded to the activation dtype, as the add it replaces stores it; normed from there
        x = (x.to(tl.float32) + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, x, mask=mask)
    if STATS:  # the statistic left to the reader: y = x · w, and Σ x² of each 64 columns into sq [M, N / 64]
        exact = x.to(tl.float32)
        y = exact * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        groups = tl.arange(0, BLOCK_N // 64)
        sums = tl.sum(tl.reshape(exact * exact, (BLOCK_M, BLOCK_N // 64, 64)), axis=2)
        tl.store(sq_ptr + rows[:, None] * (N // 64) + groups[None, :], sums,
                 mask=(rows < M)[:, None] & (groups < N // 64)[None, :])
    else:
        y = normalized_rows(x, w_ptr, cols, N, eps, HAS_WEIGHT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- shared host-side helpers (qkv_norm_rope.py and kv_materialize.py use them too) ----

def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 and so run on CPU tensors."""
    return isinstance(norm_rope_heads_kernel, InterpretedFunction)


def family_of(t: Tensor) -> str:
    """The configs.TABLE family of the device `t` lives on (the interpreter runs the 'cuda' rows)."""
    return "rocm" if t.device.type == "cuda" and torch.version.hip else "cuda"


def device_reason(x: Tensor) -> str | None:
    if x.device.type == "cuda" or interpreting():
        return None
    late = " (TRITON_INTERPRET=1 was set after import)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return (f"Triton kernels need CUDA/ROCm tensors, got {x.device}{late}; "
            "set TRITON_INTERPRET=1 before import to run them on CPU")


def dtype_reason(x: Tensor, **weights: Tensor | None) -> str | None:
    if x.dtype not in DTYPES:
        return f"activation dtype {x.dtype} is not one of fp32/fp16/bf16"
    for name, w in weights.items():
        if w is not None and w.dtype != x.dtype:
            return f"{name} is {w.dtype} but the activation is {x.dtype}"
        if w is not None and w.device != x.device:
            return f"{name} is on {w.device} but the activation is on {x.device}"
    return None


def head_dim_reason(head_dim: int) -> str | None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two ≥ 16"
    return None


def rope_reason(cos: Tensor, sin: Tensor, lead: torch.Size, head_dim: int, device: torch.device) -> str | None:
    rot = cos.shape[-1] if cos.dim() else -1
    if sin.shape != cos.shape:
        return f"sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ in shape"
    if rot < 0 or rot % 2 or rot > head_dim:
        return f"rot_dim {rot} must be even and at most head_dim {head_dim}"
    if cos.dtype not in DTYPES or sin.dtype not in DTYPES:
        return f"cos/sin dtype {cos.dtype}/{sin.dtype} is not one of fp32/fp16/bf16"
    if cos.device != device or sin.device != device:
        return f"cos/sin are on {cos.device}/{sin.device} but the activation is on {device}"
    try:
        fits = torch.broadcast_shapes(cos.shape[:-1], lead) == lead
    except RuntimeError:
        fits = False
    return None if fits else f"cos/sin {tuple(cos.shape)} do not broadcast over the token dims {tuple(lead)}"


def row_sumsq_reason(x: Tensor, x_sumsq: Tensor | None) -> str | None:
    """Why x_sumsq cannot be the fp32 sums of squares of each 64 columns of x's rows (linear_add_norm_stats's), which
    a GEMM reading x's weighted rows uses to finish their RMSNorm; None also when there is no x_sumsq."""
    if x_sumsq is None:
        return None
    want = (*x.shape[:-1], x.shape[-1] // 64)
    if x.shape[-1] % 64 or tuple(x_sumsq.shape) != want or x_sumsq.dtype != torch.float32:
        return f"x_sumsq must be {list(want)} fp32 (x's width a multiple of 64), got {tuple(x_sumsq.shape)}"
    return None if x_sumsq.device == x.device else f"x_sumsq is on {x_sumsq.device} but x on {x.device}"


def shape_reason(name: str, w: Tensor | None, shape: tuple[int, ...]) -> str | None:
    if w is None or tuple(w.shape) == shape:
        return None
    return f"{name} has shape {tuple(w.shape)}, expected {list(shape)}"


def first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def batch_and_seq(lead: torch.Size) -> tuple[int, int]:
    """Token dims folded to (B, S): S is the last one (the sequence), B all others."""
    if len(lead) == 0:
        return 1, 1
    return lead[:-1].numel(), lead[-1]


def rope_table(table: Tensor, lead: torch.Size) -> Tensor:
    """cos or sin broadcast to the token dims and folded to [B, S, rot] (a view where strides allow)."""
    folded = table.expand(*lead, table.shape[-1]).reshape(*batch_and_seq(lead), table.shape[-1])
    return folded if folded.stride(-1) == 1 else folded.contiguous()


def _num_warps(cfg: dict, tile_elems: int) -> int:
    return max(1, min(cfg["max_warps"], tile_elems // (cfg["warp"] * cfg["elems_per_thread"])))


def _heads_block(cfg: dict, head_dim: int, tokens: int, heads: int, layers: int) -> int:
    block = max(1, cfg["elems"] // head_dim)
    block = min(block, triton.next_power_of_2(max(tokens, 1)))
    while block > 1 and triton.cdiv(tokens, block) * heads * layers < cfg["min_programs"]:
        block //= 2
    return block


def launch_norm_rope_heads(proj: Tensor, cos: Tensor, sin: Tensor, q_norm_w: Tensor | None,
                           k_norm_w: Tensor | None, eps: float, n_q: int, n_kv: int, head_dim: int,
                           q_out: Tensor | None, kv_dst: tuple[Tensor, Tensor] | None,
                           positions: Tensor | None = None, front: int = 0,
                           row_sumsq: tuple[Tensor, float] | None = None) -> None:
    """One launch of the head epilogue.

    proj [B·S, L·(n_q+2·n_kv)·hd] (row-major GEMM output); cos/sin [B, S, rot]; q_norm_w [hd]; k_norm_w [hd] or
    [L, hd]; q_out [B, S, n_q, hd] contiguous (n_q > 0 needs L = 1); kv_dst (k, v), each [L, B, S_dst, n_kv, hd]
    with unit last stride — a plain output (S_dst = S) or a cache permuted to that order, written at
    s_dst = positions[b, s] (rows outside [0, S_dst) are dropped, never written out of bounds).
    front > 0 (with positions): the first `front` rows of each batch row are context rows — k/v only, q_out is
    [B, S - front, n_q, hd], and a context row's slot that a later row of its batch row names is left to that row.
    row_sumsq (sumsq [B·(S - front), P], x_eps): the (block) rows were projected from an RMSNorm's weighted rows of
    width 64·P; each is scaled by rsqrt(Σ sumsq[row] / (64·P) + x_eps) before anything else.
    """
    B, S = cos.shape[0], cos.shape[1]
    layers = 1 if kv_dst is None else kv_dst[0].shape[0]
    heads = n_q + 2 * n_kv
    if B * S == 0 or layers == 0:
        return
    assert proj.shape == (B * S, layers * heads * head_dim) and proj.stride(1) == 1
    assert n_q == 0 or (layers == 1 and q_out is not None and q_out.is_contiguous())
    assert front == 0 or (positions is not None and 0 < front < S)
    if kv_dst is None:
        k_dst = v_dst = q_out
        kv_strides = (0, 0, 0, 0)
    else:
        k_dst, v_dst = kv_dst
        assert k_dst.stride() == v_dst.stride() and k_dst.stride(-1) == 1 and k_dst.shape[3] == n_kv
        kv_strides = (k_dst.stride(0), k_dst.stride(1), k_dst.stride(2), k_dst.stride(3))
    k_norm_stride = k_norm_w.stride(0) if k_norm_w is not None and k_norm_w.dim() == 2 else 0
    sumsq, x_eps = (row_sumsq[0].contiguous(), row_sumsq[1]) if row_sumsq else (None, 0.0)
    cfg = launch_config("norm_rope_heads", family_of(proj))
    block_t = _heads_block(cfg, head_dim, B * S, heads, layers)
    grid = (triton.cdiv(B * S, block_t), heads, layers)
    wrap_triton(norm_rope_heads_kernel)[grid](
        proj, cos, sin, proj if q_norm_w is None else q_norm_w, proj if k_norm_w is None else k_norm_w,
        k_dst if q_out is None else q_out, k_dst, v_dst, proj if positions is None else positions.contiguous(),
        proj if row_sumsq is None else sumsq, B * S, S, n_q, n_kv, k_dst.shape[2] if kv_dst is not None else 0, front,
        eps, 64 * sumsq.shape[-1] if row_sumsq else 0, x_eps,
        heads * head_dim, proj.stride(0), cos.stride(0), cos.stride(1), k_norm_stride, *kv_strides,
        HD=head_dim, ROT=cos.shape[-1], HAS_Q_NORM=q_norm_w is not None, HAS_K_NORM=k_norm_w is not None,
        CACHE=positions is not None, JOINED=front > 0, BLOCK_J=triton.next_power_of_2(S - front) if front else 1,
        BLOCK_T=block_t, ROW_SUMSQ=row_sumsq is not None,
        BLOCK_P=triton.next_power_of_2(sumsq.shape[-1]) if row_sumsq else 1,
        num_warps=_num_warps(cfg, block_t * head_dim),
        **programmatic_launch(proj.device))


# ---- dflash.rms_norm and dflash.rope providers ----

def _launch_rms_norm_rows(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float, y: Tensor,
                          total: Tensor | None, sumsq: Tensor | None = None) -> None:
    """sumsq given (with weight and residual): y = total · weight unnormalized, the sums of squares into sumsq."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows == 0:
        return
    cfg = launch_config("rms_norm_rows", family_of(x))
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(cfg["elems"] // block_n, triton.next_power_of_2(rows)))
    wrap_triton(rms_norm_rows_kernel)[(triton.cdiv(rows, block_m),)](
        x, x if residual is None else residual, x if weight is None else weight, y, y if total is None else total,
        y if sumsq is None else sumsq, rows, n, eps, HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, STATS=sumsq is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=_num_warps(cfg, block_m * block_n), **programmatic_launch(x.device))


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, *, out: Tensor | None = None) -> Tensor:
    """x [..., N] → x·rsqrt(mean(x²)+eps)·w, one row per tile row; `out` (contiguous, x's shape) is optional."""
    x = x.contiguous()
    y = torch.empty_like(x) if out is None else out
    _launch_rms_norm_rows(x, None, weight, eps, y, None)
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """The dflash.add_rms_norm provider: s = x + residual stored, rms_norm(s) — one read of each input."""
    x, residual = x.contiguous(), residual.contiguous()
    y, total = torch.empty_like(x), torch.empty_like(x)
    _launch_rms_norm_rows(x, residual, weight, eps, y, total)
    return y, total


def add_norm_stats(x: Tensor, residual: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s, s · weight, Σ s² per 64 columns) for s = x + residual: linear_add_norm_stats after a vendor GEMM."""
    x, residual = x.contiguous(), residual.contiguous()
    total, weighted = torch.empty_like(x), torch.empty_like(x)
    sumsq = x.new_empty(*x.shape[:-1], x.shape[-1] // 64, dtype=torch.float32)
    _launch_rms_norm_rows(x, residual, weight.contiguous(), 0.0, weighted, total, sumsq)
    return total, weighted, sumsq


def rms_norm_supports(x: Tensor, weight: Tensor | None, eps: float) -> str | None:
    n = x.shape[-1] if x.dim() else 0
    return first_reason(
        device_reason(x), dtype_reason(x, weight=weight),
        f"rms_norm row width {n} exceeds {MAX_ROW}" if n > MAX_ROW else None,
        shape_reason("weight", weight, (n,)))


def add_rms_norm_supports(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> str | None:
    return first_reason(rms_norm_supports(x, weight, eps), dtype_reason(x, residual=residual),
                        shape_reason("residual", residual, tuple(x.shape)))


def rope(x: Tensor, cos: Tensor, sin: Tensor, *, out: Tensor | None = None) -> Tensor:
    """x [..., H, D] with cos/sin [..., rot] → rope of each head; `out` (contiguous, x's shape) is optional."""
    lead, (heads, head_dim) = x.shape[:-2], x.shape[-2:]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    proj = x.reshape(-1, heads * head_dim)
    proj = proj if proj.stride(-1) == 1 else proj.contiguous()
    launch_norm_rope_heads(proj, rope_table(cos, lead), rope_table(sin, lead), None, None, 0.0,
                           heads, 0, head_dim, y, None)
    return y


def rope_supports(x: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    if x.dim() < 2:
        return f"rope needs x [..., heads, head_dim], got {tuple(x.shape)}"
    return first_reason(device_reason(x), dtype_reason(x), head_dim_reason(x.shape[-1]),
                        rope_reason(cos, sin, x.shape[:-2], x.shape[-1], x.device))


# ---- ahead-of-time specs ----

def _compilable(kernel):
    if isinstance(kernel, InterpretedFunction):
        raise DFlashError("Triton kernels cannot be compiled ahead of time in a process started with "
                          "TRITON_INTERPRET=1; run the compilation in a process without it.")
    return kernel


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    names = kernel.arg_names
    return {n: pointers.get(n) or ("constexpr" if n in constexprs else "fp32" if n in floats else "i32")
            for n in names}


# int arguments of the head epilogue that are multiples of head_dim (or of rot, for the rope-table strides)
HEADS_ALIGNED_INTS = ("stride_proj_l", "stride_proj_t", "stride_k_norm_l", "stride_kv_l", "stride_kv_b",
                      "stride_kv_s", "stride_kv_h")


def heads_spec(dtype: torch.dtype, head_dim: int, rot: int, q_norm: bool, k_norm: bool, cache: bool,
               family: str = "cuda", block_j: int = 0, stats_width: int = 0) -> KernelSpec:
    """The epilogue configured like `launch_norm_rope_heads` would for a large token count, with 16-byte aligned
    pointers and the strides that are multiples of hd (and of rot, for the rope tables) divisible by 16;
    block_j > 0: context rows in front of block rows of up to block_j tokens (front > 0); stats_width > 0: the rows'
    RMSNorm finished from sums of squares over that width (row_sumsq)."""
    dt = "*" + DTYPES[dtype]
    cfg = launch_config("norm_rope_heads", family)
    block_t = max(1, cfg["elems"] // head_dim)
    constexprs = {"HD": head_dim, "ROT": rot, "HAS_Q_NORM": q_norm, "HAS_K_NORM": k_norm, "CACHE": cache,
                  "JOINED": block_j > 0, "BLOCK_J": max(block_j, 1), "BLOCK_T": block_t,
                  "ROW_SUMSQ": stats_width > 0, "BLOCK_P": max(1, triton.next_power_of_2(stats_width // 64))}
    pointers = {n: dt for n in ("proj_ptr", "cos_ptr", "sin_ptr", "q_norm_ptr", "k_norm_ptr", "q_ptr", "k_ptr",
                                "v_ptr")} | {"pos_ptr": "*i64", "sq_ptr": "*fp32"}
    fn = _compilable(norm_rope_heads_kernel)
    flags = "".join(f for f, on in ((",qnorm", q_norm), (",knorm", k_norm), (",cache", cache),
                                    (f",front{block_j}", block_j), (f",sumsq{stats_width}", stats_width)) if on)
    signature = _signature(fn, pointers, ("eps", "x_eps"), constexprs)
    ints = (HEADS_ALIGNED_INTS if head_dim % 16 == 0 else ()) + (
        ("stride_cos_b", "stride_cos_s") if rot % 16 == 0 else ())
    return KernelSpec(f"norm_rope_heads[{DTYPES[dtype]},hd{head_dim},rot{rot}{flags},{family}]", fn, signature,
                      constexprs, num_warps=_num_warps(cfg, block_t * head_dim),
                      divisible_by_16=pointer_args(signature) + ints)


def rows_spec(dtype: torch.dtype, width: int, weight: bool, family: str = "cuda", residual: bool = False,
              stats: bool = False) -> KernelSpec:
    dt = "*" + DTYPES[dtype]
    cfg = launch_config("rms_norm_rows", family)
    block_n = triton.next_power_of_2(width)
    constexprs = {"HAS_RESIDUAL": residual, "HAS_WEIGHT": weight, "STATS": stats,
                  "BLOCK_M": max(1, cfg["elems"] // block_n), "BLOCK_N": block_n}
    fn = _compilable(rms_norm_rows_kernel)
    pointers = {n: dt for n in ("x_ptr", "residual_ptr", "w_ptr", "y_ptr", "sum_ptr")} | {"sq_ptr": "*fp32"}
    signature = _signature(fn, pointers, ("eps",), constexprs)
    flags = ("w" if weight else "no_w") + (",residual" if residual else "") + (",stats" if stats else "")
    return KernelSpec(f"rms_norm_rows[{DTYPES[dtype]},n{width},{flags},{family}]", fn,
                      signature, constexprs, num_warps=_num_warps(cfg, constexprs["BLOCK_M"] * block_n),
                      divisible_by_16=pointer_args(signature) + (("N",) if width % 16 == 0 else ()))


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16 with `family`'s launch configs: rms_norm rows of 4096 with and without weight, with a residual, and with
    a residual and the statistic left to the reader (linear_add_norm_stats after a vendor GEMM); rope
    alone (the head epilogue without norm, hd 128)."""
    return [rows_spec(torch.bfloat16, 4096, True, family), rows_spec(torch.bfloat16, 4096, False, family),
            rows_spec(torch.bfloat16, 4096, True, family, residual=True),
            rows_spec(torch.bfloat16, 4096, True, family, residual=True, stats=True),
            heads_spec(torch.bfloat16, 128, 128, q_norm=False, k_norm=False, cache=False, family=family)]


register(Provider("rms_norm", "triton", ("cuda", "rocm"), rms_norm, priority=10, supports=rms_norm_supports,
                  traceable=True))
register(Provider("add_rms_norm", "triton", ("cuda", "rocm"), add_rms_norm, priority=10,
                  supports=add_rms_norm_supports, traceable=True))
register(Provider("rope", "triton", ("cuda", "rocm"), rope, priority=10, supports=rope_supports, traceable=True))
