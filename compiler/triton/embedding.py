"""dflash.embedding_rms_norm on CUDA/ROCm: the token embedding gather and the RMSNorm after it, one kernel.

weight [V, H], ids [...] (int32/int64)
  ─ embedding_rms_norm_kernel: BLOCK_M token rows per program; row ids[t] of W read once (int64 offsets: V·H
    passes 2^31 for large vocabularies), stored, and normalized (fp32 statistics and weight product, rounded
    once, as rms_norm_rows_kernel) ─▶ embeds [..., H], normed [..., H] in W's dtype
Replaces ATen's gather (indexSelectSmallIndex, ~8 µs on an H100 for 16 tokens × 4096) and the norm's launch.
The kernel does not check ids: one outside [0, V) reads outside W. The runtime checks every id a user hands it
(prompts, stop tokens, the draft's mask token) against the target's vocabulary before any compute
(runtime/checks.py); the other ids a step sees are tokens the target's lm_head produced.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, programmatic_launch, wrap_triton
from .norm_rope import (DTYPES, MAX_ROW, _compilable, _num_warps, _signature, device_reason, dtype_reason,
                        family_of, first_reason, normalized_rows, shape_reason)


@triton.jit
def embedding_rms_norm_kernel(w_ptr, ids_ptr, norm_w_ptr, embeds_ptr, y_ptr, M, N, stride_w, eps,
                              HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PDL: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    await_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    ids = tl.load(ids_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    x = tl.load(w_ptr + ids[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(embeds_ptr + offs, x, mask=mask)
    y = normalized_rows(x, norm_w_ptr, cols, N, eps, HAS_WEIGHT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _tile(n: int, rows: int, family: str) -> tuple[int, int, dict]:
    cfg = launch_config("embedding_rms_norm", family)
    block_n = triton.next_power_of_2(n)
    return max(1, min(cfg["elems"] // block_n, triton.next_power_of_2(rows))), block_n, cfg


def embedding_rms_norm(weight: Tensor, ids: Tensor, norm_weight: Tensor | None, eps: float, *,
                       out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The dflash.embedding_rms_norm provider: (W[ids], rms_norm(W[ids], norm_weight, eps)); `out` (two contiguous
    tensors of shape [..., H]) is optional."""
    n = weight.shape[1]
    embeds, normed = out or (weight.new_empty((*ids.shape, n)), weight.new_empty((*ids.shape, n)))
    rows = ids.numel()
    if rows == 0 or n == 0:
        return embeds, normed
    flat = ids.reshape(-1).contiguous()
    block_m, block_n, cfg = _tile(n, rows, family_of(weight))
    wrap_triton(embedding_rms_norm_kernel)[(triton.cdiv(rows, block_m),)](
        weight, flat, weight if norm_weight is None else norm_weight, embeds, normed, rows, n, weight.stride(0), eps,
        HAS_WEIGHT=norm_weight is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=_num_warps(cfg, block_m * block_n), **programmatic_launch(weight.device))
    return embeds, normed


def embedding_rms_norm_supports(weight: Tensor, ids: Tensor, norm_weight: Tensor | None, eps: float) -> str | None:
    n = weight.shape[-1]
    return first_reason(
        device_reason(weight), dtype_reason(weight, norm_weight=norm_weight),
        f"ids are on {ids.device} but the weight is on {weight.device}" if ids.device != weight.device else None,
        f"embedding_rms_norm row width {n} exceeds {MAX_ROW}" if n > MAX_ROW else None,
        "the embedding table's rows are strided (last stride ≠ 1)" if weight.stride(-1) != 1 else None,
        shape_reason("norm_weight", norm_weight, (n,)))


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16 with `family`'s launch config: a 4096-wide table (Qwen3-8B) with a norm weight, int64 ids. The ids
    pointer is not assumed aligned: token ids are often a slice of a longer tensor."""
    block_m, block_n, cfg = _tile(4096, 16, family)
    constexprs = {"HAS_WEIGHT": True, "BLOCK_M": block_m, "BLOCK_N": block_n}
    fn = _compilable(embedding_rms_norm_kernel)
    dt = "*" + DTYPES[torch.bfloat16]
    pointers = {n: dt for n in ("w_ptr", "norm_w_ptr", "embeds_ptr", "y_ptr")} | {"ids_ptr": "*i64"}
    signature = _signature(fn, pointers, ("eps",), constexprs)
    aligned = tuple(p for p in pointer_args(signature) if p != "ids_ptr") + ("N", "stride_w")
    return [KernelSpec(f"embedding_rms_norm[bf16,h4096,{family}]", fn, signature, constexprs,
                       num_warps=_num_warps(cfg, block_m * block_n), divisible_by_16=aligned)]


register(Provider("embedding_rms_norm", "triton", ("cuda", "rocm"), embedding_rms_norm, priority=10,
                  supports=embedding_rms_norm_supports, traceable=True))
