"""dflash.silu_mul on CUDA/ROCm: one pointwise kernel instead of ATen's silu and mul.

gate[..., I], up[..., I] (typically the two halves of the merged gate|up GEMM's output, row stride 2·I)
  ─ silu_mul_kernel: tiles of BLOCK_M rows × BLOCK_N columns, silu(g)·u in fp32, stored once ─▶ out[..., I]
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, programmatic_launch, wrap_triton
from .norm_rope import (_compilable, _num_warps, _signature, device_reason, dtype_reason, family_of, first_reason,
                        shape_reason)


@triton.jit
def silu_mul_kernel(gate_ptr, up_ptr, out_ptr, M, N, stride_gate, stride_up,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    await_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    g = tl.load(gate_ptr + rows * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rows * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor, n: int) -> Tensor:
    """t as [M, n] with unit last stride: a view where the layout allows (the halves of a merged output do)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tile(n: int, rows: int, family: str) -> tuple[int, int, dict]:
    cfg = launch_config("silu_mul", family)
    block_n = min(triton.next_power_of_2(n), cfg["elems"])
    return max(1, min(cfg["elems"] // block_n, triton.next_power_of_2(rows))), block_n, cfg


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """The dflash.silu_mul provider: out[..., I] = silu(gate) · up, contiguous."""
    n = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows = out.numel() // n if n else 0
    if rows == 0:
        return out
    g, u = _rows(gate, n), _rows(up, n)
    block_m, block_n, cfg = _tile(n, rows, family_of(gate))
    wrap_triton(silu_mul_kernel)[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
        g, u, out, rows, n, g.stride(0), u.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=_num_warps(cfg, block_m * block_n), **programmatic_launch(gate.device))
    return out


def silu_mul_supports(gate: Tensor, up: Tensor) -> str | None:
    return first_reason(device_reason(gate), dtype_reason(gate, up=up), shape_reason("up", up, tuple(gate.shape)))


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """bf16 with `family`'s launch config: the Qwen3-8B MLP (I 12288) at decode token counts, halves of a merged
    gate|up output (row strides 2·I)."""
    block_m, block_n, cfg = _tile(12288, 16, family)
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    fn = _compilable(silu_mul_kernel)
    signature = _signature(fn, {n: "*bf16" for n in ("gate_ptr", "up_ptr", "out_ptr")}, (), constexprs)
    return [KernelSpec(f"silu_mul[bf16,{family}]", fn, signature, constexprs,
                       num_warps=_num_warps(cfg, block_m * block_n),
                       divisible_by_16=pointer_args(signature) + ("N", "stride_gate", "stride_up"))]


register(Provider("silu_mul", "triton", ("cuda", "rocm"), silu_mul, priority=10, supports=silu_mul_supports,
                  traceable=True))
