"""dflash.rope_cos_sin — a step's rope tables in one op; dflash.joined_rope_cos_sin — the same of two position
tensors joined, with the joined positions.

Every step graph builds its cos/sin tables from the positions with ~12 tiny ATen kernels (cast, product, cat, cos,
sin, scale, casts):
    freqs = f32(positions)[..., None] · inv_freq;  emb = cat(freqs, freqs);  cos, sin = emb.cos(), emb.sin()
The op computes them the same way in fp32 and rounds each table once to `dtype`.
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError


def _check(positions: Tensor, inv_freq: Tensor) -> None:
    if isinstance(positions, torch.fx.Proxy):  # symbolically traced (Ascend codegen): dtypes are not known
        return
    torch._check_with(InputError, not positions.is_floating_point() and not positions.is_complex(),
                      lambda: f"rope_cos_sin: positions must be an integer tensor, got {positions.dtype}.")
    torch._check_with(InputError, inv_freq.dim() == 1 and inv_freq.is_floating_point(),
                      lambda: f"rope_cos_sin: inv_freq must be a 1-D float tensor [rot_dim/2], got "
                              f"{tuple(inv_freq.shape)} {inv_freq.dtype}.")


def rope_cos_sin_reference(positions: Tensor, inv_freq: Tensor, scale: float,
                           dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) [..., S, 2·len(inv_freq)] in `dtype`: angles f32(positions) · f32(inv_freq), each half of the last
    dim holding the same angles; cos and sin in fp32, times `scale` unless it is 1, rounded once. Contiguous."""
    _check(positions, inv_freq)
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


@torch.library.custom_op("dflash::rope_cos_sin", mutates_args=())
def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return rope_cos_sin_reference(positions, inv_freq, scale, dtype)


def _empty_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


@rope_cos_sin.register_fake
def _(positions, inv_freq, scale, dtype):
    _check(positions, inv_freq)
    return _empty_tables(positions, inv_freq, dtype)


def _check_joined(front: Tensor, positions: Tensor) -> None:
    if isinstance(front, torch.fx.Proxy):
        return
    torch._check_with(InputError, front.dtype == positions.dtype and front.dim() == positions.dim() >= 1
                      and front.shape[:-1] == positions.shape[:-1],
                      lambda: f"joined_rope_cos_sin: front and positions must share dtype and leading dims, got "
                              f"{tuple(front.shape)} {front.dtype} and {tuple(positions.shape)} {positions.dtype}.")


def joined_rope_cos_sin_reference(front: Tensor, positions: Tensor, inv_freq: Tensor, scale: float,
                                  dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(joined, cos, sin): joined = cat([front, positions], -1) and its rope tables (rope_cos_sin_reference) — the
    DFlash draft's context and block positions, which its cache writes read joined too."""
    _check_joined(front, positions)
    joined = torch.cat((front, positions), dim=-1)
    return (joined, *rope_cos_sin_reference(joined, inv_freq, scale, dtype))


@torch.library.custom_op("dflash::joined_rope_cos_sin", mutates_args=())
def joined_rope_cos_sin(front: Tensor, positions: Tensor, inv_freq: Tensor, scale: float,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return joined_rope_cos_sin_reference(front, positions, inv_freq, scale, dtype)


@joined_rope_cos_sin.register_fake
def _(front, positions, inv_freq, scale, dtype):
    _check_joined(front, positions)
    _check(positions, inv_freq)
    joined = positions.new_empty((*positions.shape[:-1], front.shape[-1] + positions.shape[-1]))
    return (joined, *_empty_tables(joined, inv_freq, dtype))
