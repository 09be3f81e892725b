"""Kernel benchmark cases: dflash.mhc_post_pre, the DeepSeek-V4 sublayer boundary, at D 4096 and 7168, n = 4.

Variants per (D, T): 'eager' (transformers' DeepseekV4DecoderLayer spelling: hc_post of sublayer L as the
layer writes it, then the next DeepseekV4HyperConnection.forward, then DeepseekV4RMSNorm — the real modules,
fn/base/scale in fp32 as DeepSeek-V4 keeps them), 'inductor' (torch.compile of that function) and 'dflash' (the
provider the lowering picks for these arguments on this GPU: the sm_90 single pass from its min_t, else the Triton
kernels; on CPU the Triton kernels, interpreted); where the pick is the single pass, 'dflash-triton' too. The
activations rotate (harness.py) so that every timed call reads them from HBM; the weights (fn, base, scale:
1.6 MB at D 4096, fp32) do not and may stay in L2 (half the floor's bytes at T 16, a small part above). Anchors on
H100 (docs §9), D 4096: T 4096 eager 4.11 ms, inductor 1.10 ms, bytes floor 0.11 ms; T 16 inductor 0.46 ms
(launch-bound).
"""

import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4RMSNorm

from .case import KERNEL_GRAPH_CALLS, Case, Rotation
from torch_dflash.compiler import lowering, providers
from torch_dflash.compiler.ops.mhc import mhc_post_pre_reference
from torch_dflash.compiler.triton.mhc import mhc_post_pre as triton_mhc_post_pre

STREAMS = 4
ITERS = 20
EPS = 1e-6
FULL = dict(hidden=(4096, 7168), tokens=(16, 256, 4096, 16384))
TINY = dict(hidden=(64,), tokens=(3, 8))


def _modules(hidden: int, device, g: torch.Generator):
    """The next sublayer's hyper-connection (fp32 parameters) and its input RMSNorm (activation dtype)."""
    config = DeepseekV4Config(hidden_size=hidden, hc_mult=STREAMS, hc_sinkhorn_iters=ITERS, hc_eps=EPS,
                              rms_norm_eps=EPS)
    hc = DeepseekV4HyperConnection(config).to(device)
    with torch.no_grad():
        hc.fn.copy_(torch.randn(hc.fn.shape, generator=g, device=device) * 0.02)
        hc.base.copy_(torch.randn(hc.base.shape, generator=g, device=device) * 0.1)
        hc.scale.copy_(0.5 + torch.rand(3, generator=g, device=device))
    norm = DeepseekV4RMSNorm(hidden, eps=EPS).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g, device=device))
    return hc, norm


def _boundary(hc, norm):
    def boundary(out, res, post, comb):
        """DeepseekV4DecoderLayer: hc_post of sublayer L, then the next sublayer's hc_pre and input norm."""
        dtype = res.dtype
        res = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), res)
        post, comb, collapsed = hc(res)
        return res, norm(collapsed), post, comb
    return boundary


def _case(tokens: int, hidden: int, device, hc, norm, boundary, compiled) -> Case:
    dtype = torch.bfloat16
    g = torch.Generator(device).manual_seed(tokens * 7 + hidden)

    def make_inputs():
        """The boundary's activations (one input set): sublayer output, residual streams, post and comb mixes."""
        out = torch.randn(1, tokens, hidden, generator=g, device=device).to(dtype)
        res = torch.randn(1, tokens, STREAMS, hidden, generator=g, device=device).to(dtype)
        post = 2 * torch.sigmoid(torch.randn(1, tokens, STREAMS, generator=g, device=device))
        comb = torch.softmax(torch.randn(1, tokens, STREAMS, STREAMS, generator=g, device=device), -1)
        return out, res, post, comb

    inputs = Rotation(make_inputs)
    weights = (hc.fn.detach(), hc.base.detach(), hc.scale.detach(), norm.weight.detach(), EPS, EPS, ITERS, EPS)

    example = (*inputs.current, *weights)
    picked = lowering.choose("mhc_post_pre", "cuda", example, {}).provider if device == "cuda" else "triton"
    dflash = next(p.impl for p in providers.all_providers("mhc_post_pre") if p.name == picked)

    def check():
        op_args = (*inputs.current, *weights)
        for got, want in zip(dflash(*op_args), mhc_post_pre_reference(*op_args)):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=2e-2)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs.current)
        return run

    act = dtype.itemsize
    mixes = (2 + STREAMS) * STREAMS
    floor = (tokens * hidden * act * 2                       # x read, normed layer_in written
             + tokens * STREAMS * hidden * act * 2           # res read, new_res written
             + tokens * (STREAMS + STREAMS ** 2) * 4 * 2     # post/comb read, post_next/comb_next written
             + (mixes * STREAMS * hidden + mixes + 3) * 4    # fn, base, scale once
             + hidden * act)                                 # norm weight
    return Case(
        suite="kernels", name=f"mhc_post_pre D={hidden} T={tokens}",
        variants={"eager": no_grad(boundary), "inductor": no_grad(compiled),
                  "dflash": lambda: dflash(*inputs.current, *weights),
                  **({"dflash-triton": lambda: triton_mhc_post_pre(*inputs.current, *weights)}
                     if picked != "triton" else {})},
        check=check,
        floor_bytes=floor,
        floor_flops=2 * tokens * mixes * STREAMS * hidden,
        use_cuda_graph=True,                                 # at large T too: no host time inside the interval,
        graph_calls=KERNEL_GRAPH_CALLS if tokens <= 256 else 1,  # and there one call per replay with the host
        host_ahead=tokens > 256,                             # ahead: its graph launch queued before the start event
        notes=f"n {STREAMS}, D {hidden}, bf16 activations, fp32 fn, Sinkhorn {ITERS} iters; dflash: {picked}",
        extra={"tokens": tokens, "hidden": hidden},
        rotation=inputs)


def cases(device="cuda", small: bool = False) -> list[Case]:
    """D 4096 and 7168 at T = 16, 256, 4096, 16384 ('inductor' compiled statically per T); `small` gives tiny
    shapes that run on CPU, sharing one dynamic-shape compilation."""
    shape = TINY if small else FULL
    lowering.load_providers("cuda")
    built = []
    for hidden in shape["hidden"]:
        hc, norm = _modules(hidden, device, torch.Generator(device).manual_seed(hidden))
        boundary = _boundary(hc, norm)
        compiled = torch.compile(boundary, dynamic=small)
        built += [_case(t, hidden, device, hc, norm, boundary, compiled) for t in shape["tokens"]]
    return built
