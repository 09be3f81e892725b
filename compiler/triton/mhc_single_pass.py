"""The `gluon` provider of dflash.mhc_post_pre: one persistent launch on sm_90 (mhc_single_pass_kernels.py).

before:  dflash.mhc_post_pre → dflash_triton.mhc_post_pre   (mhc.py: two launches; new_res written, then re-read)
after:   dflash.mhc_post_pre → dflash_gluon.mhc_post_pre    (one launch, DRAM bytes at the floor)

It declines — and the Triton provider runs — unless the device is sm_90, the activations bf16 with n = 4 streams,
D a multiple of 128 with D/128 ≤ the SM count, and the token count static and ≥ configs.TABLE["mhc.single_pass"]
min_t (below it the Triton kernels are faster; a dynamic count cannot be compared, so the Triton provider, which
serves every count, keeps it). It is an opaque op to Inductor (Gluon kernels are not traceable by wrap_triton).

Launch: grid = S slices × R token ranges ≤ the SM count, launched cooperatively (CUDA guarantees that every CTA is
resident at once — the spin-waits between CTAs need it — or fails the launch). The flags and workspace are fresh
stream-ordered allocations per call (the flags zeroed), so concurrent streams and CUDA-graph replays never share
state. Gluon kernels do not run under TRITON_INTERPRET: CI compiles this one for sm_90 (`aot_specs`); its numerics
are tested on the GPU (tests/kernels/test_gluon_mhc.py, `pytest -m gpu`).
"""

import math

import torch
import triton

from ...errors import InputError
from ..providers import Provider, register
from .aot import KernelSpec, pointer_args
from .configs import launch_config
from .launch import device_facts
from .mhc import fn_bf16_parts, shaped_outputs, unsupported_arguments
from .mhc_single_pass_kernels import B, MIX_WARPS, W, layouts, single_pass_kernel

STREAMS = 4


def _config() -> dict[str, int]:
    return launch_config("mhc.single_pass", "cuda")


def kernel_unsupported(x, res, post, comb, fn, base, scale, norm_w, iters) -> str | None:
    """Why the single-pass kernel cannot run these arguments, in one sentence; None when it can (any T)."""
    reason = unsupported_arguments(res, x, post, comb, fn, base, scale, norm_w, iters)
    if reason is not None:
        return reason
    if res.device.type != "cuda" or torch.version.hip or not torch.cuda.is_available():
        return "mhc single pass: needs a CUDA device (sm_90)."
    capability, sms = device_facts(res.device.index or 0)
    if capability[0] != 9:
        return f"mhc single pass: built for sm_90 (warp specialization, cp.async, mma_v2); this GPU is " \
               f"sm_{capability[0]}{capability[1]}."
    n, d = res.shape[-2:]
    if res.dtype != torch.bfloat16 or n != STREAMS:
        return f"mhc single pass: bf16 activations with {STREAMS} streams only, got {res.dtype} with n = {n}."
    if d % W or d // W > sms:
        return f"mhc single pass: D must be a multiple of {W} with D/{W} ≤ {sms} SMs, got D = {d}."
    if any(t.dtype != torch.float32 for t in (post, comb, base, scale)):
        return "mhc single pass: post, comb, base and scale must be fp32 (DeepSeek-V4 keeps them so)."
    tokens = math.prod(res.shape[:-2])
    if isinstance(tokens, int) and (tokens + B) * n * d >= 2 ** 31:  # int64 row offsets measured 1–2 % slower
        return f"mhc single pass: T·n·D = {tokens * n * d} elements exceed its int32 offsets (< 2^31)."
    return None


def supports(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps, *args, **kwargs):
    """kernel_unsupported, and a static token count ≥ min_t (where the single pass beats the Triton provider)."""
    reason = kernel_unsupported(x, res, post, comb, fn, base, scale, norm_w, iters)
    if reason is not None:
        return reason
    tokens = math.prod(res.shape[:-2])  # a SymInt when dynamic (Size.numel() would specialize it)
    if not isinstance(tokens, int):
        return "mhc single pass: the token count is dynamic; the Triton provider serves every count."
    if tokens < _config()["min_t"]:
        return f"mhc single pass: T = {tokens} < {_config()['min_t']}, where the Triton provider is faster."
    return None


def _constexprs(slices: int, cfg: dict[str, int]) -> dict[str, object]:
    regs = (cfg["load_regs"], cfg["release_regs"], cfg["reduce_regs"], cfg["apply_regs"], cfg["gemv_regs"])
    return dict(N=STREAMS, B=B, W=W, S=slices, SP2=triton.next_power_of_2(slices), P=cfg["fn_parts"],
                ST=cfg["stages"], SP=cfg["partial_ring"], SN=cfg["row_ring"], CH=cfg["reduce_columns"], REGS=regs,
                **layouts())


def mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps):
    """dflash.mhc_post_pre in one cooperative launch → (new_res, RMSNorm(layer_in)·w, post_next, comb_next)."""
    reason = kernel_unsupported(x, res, post, comb, fn, base, scale, norm_w, iters)
    if reason is not None:
        raise InputError(reason)
    n, d = res.shape[-2:]
    lead = res.shape[:-2]
    tokens = lead.numel()
    dev = res.device
    res2 = res.reshape(tokens, n, d).contiguous()
    new_res = torch.empty_like(res2)
    out = torch.empty(tokens, d, dtype=res.dtype, device=dev)
    post_out = torch.empty(tokens, n, dtype=torch.float32, device=dev)
    comb_out = torch.empty(tokens, n, n, dtype=torch.float32, device=dev)
    if tokens:
        cfg = _config()
        slices = d // W
        blocks = triton.cdiv(tokens, B)
        ranges = min(max(1, device_facts(dev.index or 0)[1] // slices), blocks)
        columns = (2 + n) * n + n * (n + 1) // 2  # the mixes and the Gram pairs of the rounded row
        ws = torch.empty(blocks * columns * slices * B, dtype=torch.float32, device=dev)
        coef = torch.empty(blocks * (n + 1) * B, dtype=torch.float32, device=dev)
        flags = torch.zeros(2 * blocks, dtype=torch.int32, device=dev)
        single_pass_kernel[(slices * ranges,)](
            x.reshape(tokens, d).contiguous(), res2, post.reshape(tokens, n).contiguous(),
            comb.reshape(tokens, n, n).contiguous(), fn_bf16_parts(fn, cfg["fn_parts"], 32), base, scale,
            norm_w.contiguous(), new_res, out, post_out, comb_out, ws, coef, flags, tokens, d, blocks, ranges,
            rms_eps, hc_eps, norm_eps, iters, **_constexprs(slices, cfg), num_warps=MIX_WARPS,
            launch_cooperative_grid=True)
    return shaped_outputs(lead, n, d, new_res, out, post_out, comb_out)


register(Provider("mhc_post_pre", "gluon", ("cuda",), mhc_post_pre, priority=20, supports=supports))


# ---------------------------------------------------------------------------------------------------- AOT

_SIGNATURE = dict(x_ptr="*bf16", res_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32", fnp_ptr="*bf16",
                  base_ptr="*fp32", scale_ptr="*fp32", norm_w_ptr="*bf16", new_res_ptr="*bf16", out_ptr="*bf16",
                  post_out_ptr="*fp32", comb_out_ptr="*fp32", ws_ptr="*fp32", coef_ptr="*fp32", flags_ptr="*i32",
                  T="i32", D="i32", num_blocks="i32", ranges="i32", rms_eps="fp32", hc_eps="fp32", norm_eps="fp32",
                  iters="i32")


def aot_specs(family: str = "cuda") -> list[KernelSpec]:
    """The launches at D 4096 and 7168 (S = D/128 is a constexpr), bf16 norm weight: sm_90 only, none for rocm."""
    specs = []
    if family != "cuda":
        return specs
    for d in (4096, 7168):
        constexprs = _constexprs(d // W, _config())
        signature = {name: _SIGNATURE.get(name, "constexpr") for name in single_pass_kernel.arg_names}
        specs.append(KernelSpec(f"mhc_post_pre_single_pass_bf16_n4_D{d}", single_pass_kernel, signature, constexprs,
                                MIX_WARPS, 1, divisible_by_16=pointer_args(signature) + ("D",), archs=("sm_90",)))
    return specs
