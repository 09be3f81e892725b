"""dflash.rope_cos_sin on CUDA/ROCm: a step's rope tables in one launch instead of ~12 ATen kernels.

positions[...] (int), inv_freq[H] (fp32)
  ─ rope_cos_sin_kernel: BLOCK_M positions × BLOCK_H angles per program, angle = f32(pos) · inv_freq in fp32,
    cos and sin, times scale, each stored twice (both halves of the last dim) ─▶ cos[..., 2H], sin[..., 2H]
dflash.joined_rope_cos_sin: the same kernel (constexpr JOINED) reads position r of cat([front, positions], -1) from
whichever of the two it lies in and also stores it ─▶ joined, cos, sin — in place of an ATen cat launch (which,
launched without programmatic launch, also stalls the chain of launches around it) and the tables' own.
Angles reach 10^5 radians, so cos/sin must be the precise ones: tl.cos / tl.sin lower to libdevice's __nv_cosf /
__ocml_cos_f32 (full range reduction), never to cos.approx (tests/kernels/test_triton_rope_tables.py reads the PTX);
the interpreter has no libdevice, which is why the kernel does not call it by name.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import await_previous_grid, programmatic_launch, wrap_triton
from .norm_rope import DTYPES, _compilable, _num_warps, _signature, device_reason, family_of, first_reason

POSITIONS = {torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def rope_cos_sin_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, N, scale, front_ptr, joined_ptr, FRONT, WIDTH,
                        HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, JOINED: tl.constexpr,
                        PDL: tl.constexpr):
    scale = tl.cast(scale, tl.float32)  # fp32 as eager Triton types Python floats (Inductor passes fp64)
    await_previous_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    if JOINED:  # row r = (b, t) of cat([front, positions], -1), WIDTH columns: t < FRONT from front, else positions
        b = rows // WIDTH
        t = rows - b * WIDTH
        head = t < FRONT
        ids = tl.where(head, tl.load(front_ptr + b * FRONT + t, mask=(rows < N) & head, other=0),
                       tl.load(pos_ptr + b * (WIDTH - FRONT) + t - FRONT, mask=(rows < N) & ~head, other=0))
        tl.store(joined_ptr + rows, ids, mask=rows < N)
    else:
        ids = tl.load(pos_ptr + rows, mask=rows < N, other=0)
    pos = ids.to(tl.float32)
    inv = tl.load(inv_ptr + cols, mask=cols < HALF, other=0.0)
    angles = pos[:, None] * inv[None, :]
    c = (tl.cos(angles) * scale).to(cos_ptr.dtype.element_ty)
    s = (tl.sin(angles) * scale).to(sin_ptr.dtype.element_ty)
    mask = (rows < N)[:, None] & (cols < HALF)[None, :]
    offs = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    tl.store(cos_ptr + offs, c, mask=mask)
    tl.store(cos_ptr + offs + HALF, c, mask=mask)
    tl.store(sin_ptr + offs, s, mask=mask)
    tl.store(sin_ptr + offs + HALF, s, mask=mask)


def _tile(half: int, family: str) -> tuple[int, int, dict]:
    cfg = launch_config("rope_cos_sin", family)
    block_h = triton.next_power_of_2(half)
    return max(1, cfg["elems"] // block_h), block_h, cfg


def _launch(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype, out, front: Tensor | None):
    """cos, sin of `positions` — of cat([front, positions], -1) with `front`, which also fills joined = out[0]."""
    half = inv_freq.shape[0]
    width = positions.shape[-1] + (0 if front is None else front.shape[-1])
    shape = (*positions.shape[:-1], width, 2 * half)
    cos, sin = out[-2:] if out else (torch.empty(shape, dtype=dtype, device=positions.device) for _ in range(2))
    joined = None if front is None else (out[0] if out else positions.new_empty(shape[:-1]))
    rows = cos.numel() // max(1, 2 * half)
    if rows and half:
        block_m, block_h, cfg = _tile(half, family_of(positions))
        front_len = 0 if front is None else front.shape[-1]
        wrap_triton(rope_cos_sin_kernel)[(triton.cdiv(rows, block_m),)](
            positions.reshape(-1).contiguous(), inv_freq.contiguous(), cos, sin, rows, scale,
            positions if front is None else front.reshape(-1).contiguous(), cos if joined is None else joined,
            front_len, width, HALF=half, BLOCK_M=block_m, BLOCK_H=block_h, JOINED=front is not None,
            num_warps=_num_warps(cfg, block_m * block_h), **programmatic_launch(positions.device))
    return (cos, sin) if front is None else (joined, cos, sin)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype, *,
                 out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The dflash.rope_cos_sin provider: (cos, sin) [..., 2·H] in `dtype`, contiguous; `out` (two such tensors) is
    optional."""
    return _launch(positions, inv_freq, scale, dtype, out, None)


def joined_rope_cos_sin(front: Tensor, positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype, *,
                        out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The dflash.joined_rope_cos_sin provider: (joined, cos, sin) of cat([front, positions], -1), contiguous;
    `out` (three such tensors) is optional."""
    return _launch(positions, inv_freq, scale, dtype, out, front)


def rope_cos_sin_supports(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype) -> str | None:
    return first_reason(
        device_reason(positions),
        f"positions are {positions.dtype}, not int32/int64" if positions.dtype not in POSITIONS else None,
        f"inv_freq is {inv_freq.dtype}, not fp32" if inv_freq.dtype != torch.float32 else None,
        f"inv_freq is on {inv_freq.device} but positions are on {positions.device}"
        if inv_freq.device != positions.device else None,
        f"table dtype {dtype} is not one of fp32/fp16/bf16" if dtype not in DTYPES else None)


def joined_rope_cos_sin_supports(front: Tensor, positions: Tensor, inv_freq: Tensor, scale: float,
                                 dtype: torch.dtype) -> str | None:
    return first_reason(
        rope_cos_sin_supports(positions, inv_freq, scale, dtype),
        f"front is {front.dtype} on {front.device}, positions {positions.dtype} on {positions.device}"
        if front.dtype != positions.dtype or front.device != positions.device else None)


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """int64 positions, bf16 tables of rot_dim 128 (Qwen3-8B, its DFlash draft) with `family`'s launch config, of
    one position tensor and of two joined."""
    block_m, block_h, cfg = _tile(64, family)
    fn = _compilable(rope_cos_sin_kernel)
    pointers = {"pos_ptr": "*i64", "inv_ptr": "*fp32", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "front_ptr": "*i64",
                "joined_ptr": "*i64"}
    specs = []
    for joined in (False, True):
        constexprs = {"HALF": 64, "BLOCK_M": block_m, "BLOCK_H": block_h, "JOINED": joined}
        signature = _signature(fn, pointers, ("scale",), constexprs)
        specs.append(KernelSpec(f"{'joined_' if joined else ''}rope_cos_sin[bf16,rot128,{family}]", fn, signature,
                                constexprs, num_warps=_num_warps(cfg, block_m * block_h),
                                divisible_by_16=pointer_args(signature)))
    return specs


register(Provider("rope_cos_sin", "triton", ("cuda", "rocm"), rope_cos_sin, priority=10,
                  supports=rope_cos_sin_supports, traceable=True))
register(Provider("joined_rope_cos_sin", "triton", ("cuda", "rocm"), joined_rope_cos_sin, priority=10,
                  supports=joined_rope_cos_sin_supports, traceable=True))
