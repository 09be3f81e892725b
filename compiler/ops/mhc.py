"""dflash.mhc_pre / mhc_post / mhc_post_pre — DeepSeek-V4 manifold-constrained hyper-connections.

res is the n-stream residual [..., n, D]; post [..., n] and comb [..., n, n] come out in fp32; comb is
[source, destination]:  new_res[j] = post_j·x + Σ_i comb[i, j]·res[i].
mhc_post_pre = mhc_post of sublayer L → mhc_pre of sublayer L+1 → that sublayer's RMSNorm, one pass over res.
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

from .norm_rope import rms_norm_reference


def _check_fn(res: Tensor, fn: Tensor) -> None:
    if isinstance(res, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    n = res.shape[-2]
    torch._check_with(InputError, fn.shape[0] == (2 + n) * n,
                      lambda: f"mhc: fn has {fn.shape[0]} rows, expected (2+n)·n = {(2 + n) * n} for n = {n}.")


def mhc_pre_reference(res, fn, base, scale, rms_eps, hc_eps, iters):
    _check_fn(res, fn)
    n = res.shape[-2]
    xf = res.flatten(-2).float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_eps)
    m = (xf * r) @ fn.float().t()
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = (m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = torch.softmax(logits, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    layer_in = (pre.unsqueeze(-1) * res.float()).sum(-2).to(res.dtype)
    return layer_in, post, comb


def mhc_post_reference(x, res, post, comb):
    mixed = post.float().unsqueeze(-1) * x.float().unsqueeze(-2)
    mixed = mixed + comb.float().transpose(-1, -2) @ res.float()
    return mixed.to(res.dtype).contiguous()  # the broadcast may follow x's layout


def mhc_post_pre_reference(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps):
    new_res = mhc_post_reference(x, res, post, comb)
    layer_in, post_next, comb_next = mhc_pre_reference(new_res, fn, base, scale, rms_eps, hc_eps, iters)
    return new_res, rms_norm_reference(layer_in, norm_w, norm_eps), post_next, comb_next


def _pre_fake(res: Tensor, fn: Tensor):
    _check_fn(res, fn)
    n = res.shape[-2]
    lead = res.shape[:-2]
    f32 = torch.float32
    return res.new_empty(*lead, res.shape[-1]), res.new_empty(*lead, n, dtype=f32), res.new_empty(*lead, n, n, dtype=f32)


@torch.library.custom_op("dflash::mhc_pre", mutates_args=())
def mhc_pre(res: Tensor, fn: Tensor, base: Tensor, scale: Tensor, rms_eps: float, hc_eps: float,
            iters: int) -> tuple[Tensor, Tensor, Tensor]:
    return mhc_pre_reference(res, fn, base, scale, rms_eps, hc_eps, iters)


@mhc_pre.register_fake
def _(res, fn, base, scale, rms_eps, hc_eps, iters):
    return _pre_fake(res, fn)


@torch.library.custom_op("dflash::mhc_post", mutates_args=())
def mhc_post(x: Tensor, res: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    return mhc_post_reference(x, res, post, comb)


@mhc_post.register_fake
def _(x, res, post, comb):
    return res.new_empty(res.shape)


@torch.library.custom_op("dflash::mhc_post_pre", mutates_args=())
def mhc_post_pre(x: Tensor, res: Tensor, post: Tensor, comb: Tensor, fn: Tensor, base: Tensor, scale: Tensor,
                 norm_w: Tensor, rms_eps: float, hc_eps: float, iters: int,
                 norm_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return mhc_post_pre_reference(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps)


@mhc_post_pre.register_fake
def _(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps):
    layer_in, post_next, comb_next = _pre_fake(res, fn)
    return res.new_empty(res.shape), layer_in, post_next, comb_next
