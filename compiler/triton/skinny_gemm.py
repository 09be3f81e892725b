"""A split-K Triton GEMM for decode-sized inputs: y[M, N] = x[M, K] @ w[N, K]ᵀ with M ≤ 32 (nn.Linear's layout).

At M ≤ 32 a GEMM is a weight stream: the bytes of w dominate and the math is idle. So each program owns a
[BLOCK_N rows of w] × [one of SPLIT_K slices of K] tile, reads it once with wide loads along K (w is K-contiguous),
and multiplies it by the matching xᵀ slice (tiny, from L2): acc[BLOCK_N, BLOCK_M] += w_tile @ xᵀ_tile — w is the
MMA's M operand ("swap AB"), so a 16-row x still fills a 64-row tensor-core tile. N / BLOCK_N × SPLIT_K programs
keep every SM streaming even when N / BLOCK_N alone would not. With SPLIT_K > 1 each program stores its fp32
partial tile to a workspace and takes an arrival ticket (the pattern of mhc.py); the last slice of an N tile to
arrive sums the SPLIT_K partials in slice order (deterministic) and stores y — one launch, no memset, no atomics
on the data. Used by benchmarks/sweep_skinny_gemm.py; not wired into a dflash op.
"""

import os

import torch
import triton
import triton.language as tl

from ...errors import InputError
from .aot import KernelSpec, pointer_args
from .mhc import _arrival_counters
from .norm_rope import DTYPES, _compilable, _signature, family_of

MAX_M = 32
# per family: shared memory is stages × (BLOCK_N + BLOCK_M) × BLOCK_K × 2 bytes on sm_90 (one stage less on sm_80):
# 4 stages fit sm_80 / sm_90 at BLOCK_M 32; gfx942's 64 KiB LDS takes 2.
DEFAULT_CONFIG = {"cuda": {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 4},
                  "rocm": {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 2}}


@triton.jit
def skinny_gemm_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       EVEN: tl.constexpr, WIDEN_DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    sl = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = sl * span
    k_end = tl.minimum(k_start + span, K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_start + rk)[None, :]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_start + rk)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + rk) < K
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & (rm[None, :] < M), other=0.0)
        if WIDEN_DOT:   # the interpreter's bf16 tl.dot multiplies raw bits (attention_common.widen_dot)
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc += tl.dot(w, xt)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ok = (rn[:, None] < N) & (rm[None, :] < M)
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
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
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_ok)
            tl.store(count_ptr + pid_n, 0)  # leave the ticket ready for the next launch


def _unsupported(x: torch.Tensor, w: torch.Tensor) -> str | None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        return f"skinny_gemm: x must be [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}."
    if not 1 <= x.shape[0] <= MAX_M:
        return f"skinny_gemm: x has {x.shape[0]} rows; the kernel takes 1 to {MAX_M}."
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return f"skinny_gemm: x and w must both be bf16 or fp16, got {x.dtype} and {w.dtype}."
    if x.device != w.device or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "skinny_gemm: x and w must be on one GPU (CPU tensors only under TRITON_INTERPRET=1)."
    return None


def plan(m: int, n: int, k: int, config: dict) -> dict:
    """The kernel's constexprs for an [m, k] × [n, k]ᵀ problem: BLOCK_M the next power of two ≥ 16 of m,
    SPLIT_K capped so that every slice has at least one BLOCK_K step."""
    block_n, block_k = config["block_n"], config["block_k"]
    split = max(1, min(config["split_k"], triton.cdiv(k, block_k)))
    return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                EVEN=n % block_n == 0 and k % (split * block_k) == 0)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ wᵀ (x [M ≤ 32, K], w [N, K], bf16 / fp16) in x's dtype; config overrides keys of the device
    family's DEFAULT_CONFIG."""
    reason = _unsupported(x, w)
    if reason:
        raise InputError(reason)
    cfg = {**DEFAULT_CONFIG[family_of(x)], **(config or {})}
    x, w = x.contiguous(), w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    meta = plan(m, n, k, cfg)
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles, split = triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
    ws = torch.empty(split * meta["BLOCK_M"] * n if split > 1 else 1, dtype=torch.float32, device=x.device)
    counters = _arrival_counters(x.device, tiles if split > 1 else 1)
    skinny_gemm_kernel[(tiles, split)](
        x, w, y, ws, counters, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        **meta, WIDEN_DOT=x.device.type != "cuda", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def gemm_spec(dtype: torch.dtype, block_m: int, split_k: int, family: str = "cuda") -> KernelSpec:
    """One build with the family's DEFAULT_CONFIG: N and K tile multiples (EVEN), 16-byte aligned pointers and
    strides divisible by 16."""
    config = DEFAULT_CONFIG[family]
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=config["block_n"], BLOCK_K=config["block_k"], SPLIT_K=split_k,
                      EVEN=True, WIDEN_DOT=False)
    fn = _compilable(skinny_gemm_kernel)
    dt = "*" + DTYPES[dtype]
    pointers = {"x_ptr": dt, "w_ptr": dt, "y_ptr": dt, "ws_ptr": "*fp32", "count_ptr": "*i32"}
    signature = _signature(fn, pointers, (), constexprs)
    return KernelSpec(f"skinny_gemm[{DTYPES[dtype]},m{block_m},n{config['block_n']},k{config['block_k']},"
                      f"split{split_k},{family}]", fn, signature, constexprs, num_warps=config["num_warps"],
                      num_stages=config["num_stages"],
                      divisible_by_16=pointer_args(signature) + ("N", "K", "stride_xm", "stride_wn", "stride_ym"))
