"""dflash.qkv_norm_rope as ONE Triton kernel: the merged GEMM with the per-head norm + rope epilogue in registers.

x[T,H] @ w_qkv[(n_q+2·n_kv)·hd, H]ᵀ, tiled [BLOCK_M tokens] × [one head]: each program accumulates its head as two
fp32 halves `lo`, `hi` [BLOCK_M, hd/2] (two tl.dot on the same x tile), so rotate-half rope is
`lo·cos − hi·sin`, `hi·cos + lo·sin` with no register shuffle. ONE_DOT instead runs one [BLOCK_M, hd] dot (one
wider MMA per step) and splits it with reshape/permute/split: on NVIDIA MMA layouts each thread already holds
column c and c + hd/2, so the split stays in registers (no convert_layout in the TTGIR for sm_80/sm_90); on
gfx942 it goes through LDS, so the ROCm rows keep two dots. For partial rotary (rot < hd) the halves are the
rotated pairs (channel j ↔ j + rot/2) followed by the pass-through channels split in two, gathered by the
weight-row index. Epilogue, in the reference's order and roundings: + bias, round to the activation dtype (the
GEMM output), q/k heads: RMSNorm (fp32 statistic Σlo² + Σhi², fp32 weight product) → round → rope in fp32 →
round; v heads: stored as rounded. q → [T, n_q, hd]; k/v → [B, S, n_kv, hd] or a KV cache at cache positions.
Programs are ordered in groups of GROUP_M token tiles × all heads, so the x and w tiles in flight stay in L2.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .aot import KernelSpec, pointer_args
from .attention_common import widen_dot
from .configs import TABLE
from .launch import await_previous_grid, programmatic_launch, wrap_triton
from .mhc import _arrival_counters
from .norm_rope import DTYPES, _compilable, _signature


@triton.jit
def _k_tile(ptrs, k_ok, EVEN_K: tl.constexpr, WIDEN_DOT: tl.constexpr):
    """One BLOCK_K slice of x or w (k_ok masks the tail of H unless EVEN_K); widened to fp32 under the
    interpreter, whose bf16 tl.dot is wrong (attention_common.widen_dot)."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=k_ok, other=0.0)
    if WIDEN_DOT:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def qkv_gemm_norm_rope_kernel(
        x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, ws_ptr, count_ptr,
        T, K, S, N_Q, N_KV, S_DST, eps,
        stride_xt, stride_wn, stride_cos_b, stride_cos_s, stride_kv_b, stride_kv_s, stride_kv_h,
        HD: tl.constexpr, ROT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Q_NORM: tl.constexpr,
        HAS_K_NORM: tl.constexpr, CACHE: tl.constexpr, EVEN_K: tl.constexpr, WIDEN_DOT: tl.constexpr,
        ONE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    HALF: tl.constexpr = HD // 2
    R2: tl.constexpr = ROT // 2
    heads = N_Q + 2 * N_KV
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(T, BLOCK_M)
    in_group = GROUP_M * heads
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    head = (pid % in_group) // group_m

    j = tl.arange(0, HALF)
    if ROT == HD or ROT == 0:
        lo_col = j
        hi_col = j + HALF
    else:   # rotated pairs (j, j + R2) for j < R2, then the pass-through channels [ROT, HD) in two halves
        lo_col = tl.where(j < R2, j, j + R2)
        hi_col = tl.where(j < R2, j + R2, j + HALF)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows.to(tl.int64)
    t_load = t % T                      # rows past T read a valid row; their results are never stored
    sl = tl.program_id(1)               # this program's slice of K (SPLIT_K > 1: partial sums, see below)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = sl * span
    k_end = tl.minimum(k_start + span, K)
    kk = tl.arange(0, BLOCK_K)
    await_previous_grid(PDL)
    x_tile = x_ptr + t_load[:, None] * stride_xt + k_start + kk[None, :]
    w_head = w_ptr + (head * HD).to(tl.int64) * stride_wn + k_start + kk[:, None]
    if ONE_DOT:     # one [BLOCK_M, HD] dot over the columns lo_col ++ hi_col, split into the halves in registers
        i = tl.arange(0, HD)
        if ROT == HD or ROT == 0:
            cols = i
        else:
            cols = tl.where(i < HALF, tl.where(i < R2, i, i + R2),
                            tl.where(i - HALF < R2, i - HALF + R2, i))
        w_all = w_head + cols[None, :].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = _k_tile(x_tile, kk[None, :] < K - k0, EVEN_K, WIDEN_DOT)
            acc = tl.dot(a, _k_tile(w_all, kk[:, None] < K - k0, EVEN_K, WIDEN_DOT), acc, input_precision="ieee")
            x_tile += BLOCK_K
            w_all += BLOCK_K
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    else:           # two [BLOCK_M, HD/2] dots sharing the x tile
        w_lo = w_head + lo_col[None, :].to(tl.int64) * stride_wn
        w_hi = w_head + hi_col[None, :].to(tl.int64) * stride_wn
        lo = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        hi = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = _k_tile(x_tile, kk[None, :] < K - k0, EVEN_K, WIDEN_DOT)
            lo = tl.dot(a, _k_tile(w_lo, kk[:, None] < K - k0, EVEN_K, WIDEN_DOT), lo, input_precision="ieee")
            hi = tl.dot(a, _k_tile(w_hi, kk[:, None] < K - k0, EVEN_K, WIDEN_DOT), hi, input_precision="ieee")
            x_tile += BLOCK_K
            w_lo += BLOCK_K
            w_hi += BLOCK_K

    if SPLIT_K == 1:
        _epilogue(lo, hi, rows, t, j, lo_col, hi_col, head, T, S, N_Q, N_KV, S_DST, eps, b_ptr, cos_ptr, sin_ptr,
                  q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, stride_cos_b, stride_cos_s, stride_kv_b,
                  stride_kv_s, stride_kv_h, HD, ROT, HAS_BIAS, HAS_Q_NORM, HAS_K_NORM, CACHE)
    else:   # fp32 partials of this slice; the last slice of the tile to arrive sums them in slice order (the same
        # bits whatever the arrival order) and runs the epilogue (the ticket pattern of skinny_gemm.py)
        tile = (pid * SPLIT_K).to(tl.int64) * BLOCK_M * HD + tl.arange(0, BLOCK_M)[:, None] * HD + j[None, :]
        tl.store(ws_ptr + tile + sl * BLOCK_M * HD, lo)
        tl.store(ws_ptr + tile + sl * BLOCK_M * HD + HALF, hi)
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            lo = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            hi = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            for s_ in range(SPLIT_K):
                lo += tl.load(ws_ptr + tile + s_ * BLOCK_M * HD, cache_modifier=".cg")
                hi += tl.load(ws_ptr + tile + s_ * BLOCK_M * HD + HALF, cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)  # leave the ticket ready for the next launch
            _epilogue(lo, hi, rows, t, j, lo_col, hi_col, head, T, S, N_Q, N_KV, S_DST, eps, b_ptr, cos_ptr,
                      sin_ptr, q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, stride_cos_b, stride_cos_s,
                      stride_kv_b, stride_kv_s, stride_kv_h, HD, ROT, HAS_BIAS, HAS_Q_NORM, HAS_K_NORM, CACHE)


@triton.jit
def _epilogue(lo, hi, rows, t, j, lo_col, hi_col, head, T, S, N_Q, N_KV, S_DST, eps, b_ptr, cos_ptr, sin_ptr,
              q_norm_ptr, k_norm_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, stride_cos_b, stride_cos_s, stride_kv_b,
              stride_kv_s, stride_kv_h, HD: tl.constexpr, ROT: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, CACHE: tl.constexpr):
    """+ bias, round, per-head norm, rope, store — of the head's fp32 halves lo, hi [BLOCK_M, HD/2]."""
    R2: tl.constexpr = ROT // 2
    dt = q_ptr.dtype.element_ty
    if HAS_BIAS:
        lo += tl.load(b_ptr + head * HD + lo_col).to(tl.float32)[None, :]
        hi += tl.load(b_ptr + head * HD + hi_col).to(tl.float32)[None, :]
    lo = lo.to(dt).to(tl.float32)       # the GEMM output as the reference sees it
    hi = hi.to(dt).to(tl.float32)

    row_ok = rows < T
    b = t // S
    s = t - b * S
    if CACHE:
        s_dst = tl.load(pos_ptr + t, mask=row_ok, other=0).to(tl.int64)
        row_ok_kv = row_ok & (s_dst >= 0) & (s_dst < S_DST)
    else:
        s_dst = s
        row_ok_kv = row_ok
    kv_row = b * stride_kv_b + s_dst * stride_kv_s
    if head < N_Q + N_KV:
        if HAS_Q_NORM or HAS_K_NORM:
            if ((head < N_Q) & HAS_Q_NORM) | ((head >= N_Q) & HAS_K_NORM):
                w_ptr_norm = k_norm_ptr
                if head < N_Q:
                    w_ptr_norm = q_norm_ptr
                r = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HD + eps)[:, None]
                lo = (lo * r * tl.load(w_ptr_norm + lo_col).to(tl.float32)[None, :]).to(dt).to(tl.float32)
                hi = (hi * r * tl.load(w_ptr_norm + hi_col).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        if ROT > 0:
            table = b[:, None] * stride_cos_b + s[:, None] * stride_cos_s
            rot_ok = row_ok[:, None] & (j < R2)[None, :]
            c_lo = tl.load(cos_ptr + table + lo_col[None, :], mask=rot_ok, other=1.0).to(tl.float32)
            s_lo = tl.load(sin_ptr + table + lo_col[None, :], mask=rot_ok, other=0.0).to(tl.float32)
            c_hi = tl.load(cos_ptr + table + hi_col[None, :], mask=rot_ok, other=1.0).to(tl.float32)
            s_hi = tl.load(sin_ptr + table + hi_col[None, :], mask=rot_ok, other=0.0).to(tl.float32)
            lo_rot = lo * c_lo - hi * s_lo
            hi = hi * c_hi + lo * s_hi
            lo = lo_rot
        if head < N_Q:
            q_row = q_ptr + t[:, None] * (N_Q * HD) + head * HD
            tl.store(q_row + lo_col[None, :], lo.to(dt), mask=row_ok[:, None])
            tl.store(q_row + hi_col[None, :], hi.to(dt), mask=row_ok[:, None])
        else:
            k_row = k_ptr + kv_row[:, None] + (head - N_Q) * stride_kv_h
            tl.store(k_row + lo_col[None, :], lo.to(dt), mask=row_ok_kv[:, None])
            tl.store(k_row + hi_col[None, :], hi.to(dt), mask=row_ok_kv[:, None])
    else:
        v_row = v_ptr + kv_row[:, None] + (head - N_Q - N_KV) * stride_kv_h
        tl.store(v_row + lo_col[None, :], lo.to(dt), mask=row_ok_kv[:, None])
        tl.store(v_row + hi_col[None, :], hi.to(dt), mask=row_ok_kv[:, None])


# ---- when the fused GEMM runs, and with which tiles ----

ROWS = ("qkv_gemm.ar", "qkv_gemm.decode", "qkv_gemm.small", "qkv_gemm.medium", "qkv_gemm.large")


def gemm_config(tokens: int, family: str) -> dict[str, int]:
    """The configs.TABLE row for `tokens`: the first of ROWS with tokens <= max_t (0 = no limit)."""
    for row in ROWS:
        cfg = TABLE[row][family]
        if cfg["max_t"] == 0 or tokens <= cfg["max_t"]:
            return cfg
    raise AssertionError("the last qkv_gemm row must have max_t 0")


def fused_gemm_chosen(x: Tensor, tokens: int, family: str) -> bool:
    """Whether dflash.qkv_norm_rope runs the fused GEMM (else the vendor GEMM + epilogue): 16-bit activations (an
    fp32 tl.dot is computed exactly, on CUDA cores) and the table row of this token count says `fused`."""
    return x.dtype != torch.float32 and bool(gemm_config(tokens, family)["fused"])


def launch_qkv_gemm(x2: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, cos: Tensor, sin: Tensor,
                    q_norm_w: Tensor | None, k_norm_w: Tensor | None, eps: float, n_q: int, n_kv: int,
                    head_dim: int, q_out: Tensor, kv_dst: tuple[Tensor, Tensor], positions: Tensor | None,
                    cfg: dict[str, int]) -> None:
    """One launch. x2 [B·S, H] with unit last stride; w_qkv [(n_q+2·n_kv)·hd, H] with unit last stride;
    cos/sin [B, S, rot] with unit last stride; q_out [B·S·n_q·hd] contiguous; kv_dst (k, v), each
    [B, S_dst, n_kv, hd] with unit last stride and equal strides (a plain output, or a cache
    [B, n_kv, S_max, hd] transposed), written at s_dst = positions[b, s] when positions are given (rows outside
    [0, S_dst) are dropped)."""
    S = cos.shape[1]
    tokens, hidden = x2.shape
    if tokens == 0:
        return
    k_dst, v_dst = kv_dst
    assert x2.stride(1) == 1 and w_qkv.stride(1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert k_dst.stride() == v_dst.stride() and k_dst.stride(-1) == 1 and q_out.is_contiguous()
    heads, split = n_q + 2 * n_kv, cfg["split_k"]
    tiles = triton.cdiv(tokens, cfg["block_m"]) * heads
    ws = torch.empty(tiles * split * cfg["block_m"] * head_dim if split > 1 else 1, dtype=torch.float32,
                     device=x2.device)
    counters = _arrival_counters(x2, tiles if split > 1 else 1)
    wrap_triton(qkv_gemm_norm_rope_kernel)[(tiles, split)](
        x2, w_qkv, x2 if b_qkv is None else b_qkv, cos, sin, x2 if q_norm_w is None else q_norm_w,
        x2 if k_norm_w is None else k_norm_w, q_out, k_dst, v_dst, x2 if positions is None else positions, ws,
        counters, tokens, hidden, S, n_q, n_kv, k_dst.shape[1], eps,
        x2.stride(0), w_qkv.stride(0), cos.stride(0), cos.stride(1), *k_dst.stride()[:3],
        HD=head_dim, ROT=cos.shape[-1], HAS_BIAS=b_qkv is not None, HAS_Q_NORM=q_norm_w is not None,
        HAS_K_NORM=k_norm_w is not None, CACHE=positions is not None, EVEN_K=hidden % cfg["block_k"] == 0,
        WIDEN_DOT=widen_dot(x2), ONE_DOT=bool(cfg["one_dot"]), BLOCK_M=cfg["block_m"], BLOCK_K=cfg["block_k"],
        GROUP_M=cfg["group_m"], SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **programmatic_launch(x2.device))


# ---- ahead-of-time specs ----

# int arguments that are multiples of 16 whenever H and hd are (K, row strides, rope-table and KV strides)
ALIGNED_INTS = ("K", "stride_xt", "stride_wn", "stride_cos_b", "stride_cos_s", "stride_kv_b", "stride_kv_s",
                "stride_kv_h")


def gemm_spec(dtype: torch.dtype, head_dim: int, rot: int, bias: bool, norm: bool, cache: bool, row: str,
              family: str = "cuda") -> KernelSpec:
    """The fused kernel for H a multiple of BLOCK_K, configured by configs.TABLE[row][family], with 16-byte
    aligned pointers and the ALIGNED_INTS divisible by 16 (what the JIT sees for H 4096, hd 128)."""
    cfg = TABLE[row][family]
    dt = "*" + DTYPES[dtype]
    constexprs = {"HD": head_dim, "ROT": rot, "HAS_BIAS": bias, "HAS_Q_NORM": norm, "HAS_K_NORM": norm,
                  "CACHE": cache, "EVEN_K": True, "WIDEN_DOT": False, "ONE_DOT": bool(cfg["one_dot"]),
                  "BLOCK_M": cfg["block_m"],
                  "BLOCK_K": cfg["block_k"], "GROUP_M": cfg["group_m"], "SPLIT_K": cfg["split_k"]}
    fn = _compilable(qkv_gemm_norm_rope_kernel)
    pointers = {n: dt for n in fn.arg_names if n.endswith("_ptr")} | {"pos_ptr": "*i64", "ws_ptr": "*fp32",
                                                                       "count_ptr": "*i32"}
    signature = _signature(fn, pointers, ("eps",), constexprs)
    flags = "".join(f for f, on in ((",bias", bias), (",qknorm", norm), (",cache", cache)) if on)
    return KernelSpec(f"qkv_gemm_norm_rope[{DTYPES[dtype]},hd{head_dim},rot{rot}{flags},{row.split('.')[1]},"
                      f"{family}]", fn, signature, constexprs, num_warps=cfg["num_warps"],
                      num_stages=cfg["num_stages"], divisible_by_16=pointer_args(signature) + ALIGNED_INTS)


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16, hd 128, full rotary, q/k norm, no bias: plain outputs and into caches, for every table row that
    runs the fused kernel (a row's tiles as the launcher picks them)."""
    rows = [row for row in ROWS if TABLE[row][family]["fused"]]
    return [gemm_spec(torch.bfloat16, 128, 128, False, True, cache, row, family)
            for row in rows for cache in (False, True)]
