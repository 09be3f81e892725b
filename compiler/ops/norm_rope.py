"""dflash.rms_norm, dflash.add_rms_norm and dflash.rope — the building blocks the fused ops are defined with."""

import torch
from torch import Tensor

from torch_dflash.errors import InputError


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """`x * rsqrt(mean(x², -1) + eps) * w`, statistics and the weight product in fp32, stored in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(s, weight, eps), s) with s = x + residual in x's dtype: a residual add and the norm after it.
    Both outputs contiguous."""
    _check_residual(x, residual)
    total = (x + residual).contiguous()
    return rms_norm_reference(total, weight, eps), total


def _check_residual(x: Tensor, residual: Tensor) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, x.shape == residual.shape and x.dtype == residual.dtype,
                      lambda: f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                              f"{residual.dtype} must have one shape and dtype.")


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rot_dim(x: Tensor, cos: Tensor) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, cos.shape[-1] <= x.shape[-1],
                      lambda: f"rope: rot_dim {cos.shape[-1]} is larger than head_dim {x.shape[-1]}.")


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox rope on the first rot_dim = cos.shape[-1] channels of x [B, S, H, D]; cos/sin [B, S, rot_dim].
    The result is contiguous whatever the layout of x."""
    _check_rot_dim(x, cos)
    rot_dim = cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :rot_dim], xf[..., rot_dim:]
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    out = torch.cat((rot * c + rotate_half(rot) * s, rest), dim=-1)
    return out.to(x.dtype).contiguous()


@torch.library.custom_op("dflash::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("dflash::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return add_rms_norm_reference(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _check_residual(x, residual)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("dflash::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return rope_reference(x, cos, sin)


@rope.register_fake
def _(x, cos, sin):
    _check_rot_dim(x, cos)
    return x.new_empty(x.shape)
