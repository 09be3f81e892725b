"""Triton kernels for dflash.mhc_post_pre, dflash.mhc_pre and dflash.mhc_post (CUDA sm_80+, ROCm gfx942/gfx950).

One kernel, `_mhc_kernel`; constexpr flags make it the fused boundary (post → pre → RMSNorm), the first
sublayer's pre alone or the last sublayer's post alone. A program owns BLOCK_T tokens and one of `split`
contiguous slices of D:
  phase 1, per slice:  new_res = post·x + combᵀ·res (stored once, in the activation dtype), Σ new_res² and the
                       (2+n)·n mixes (the un-normalized rounded row against fn) → fp32 partials in a workspace;
  phase 2, per token block, run by the program that arrives last (an atomic ticket; split = 1 needs none):
                       sum the partials, r = rsqrt(mean + eps), sigmoid / 2·sigmoid / softmax + Sinkhorn in
                       registers, then layer_in = Σ_k pre_k·new_res_k over the whole row (re-read, mostly from
                       L2) and, for mhc_post_pre, the weighted RMSNorm of layer_in.
docs/kernels/mhc.md explains the grid, the memory traffic and the configs.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...errors import InputError
from ..providers import Provider, register
from .aot import KernelSpec
from .configs import launch_config

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_MAX_STREAMS = 8


# ----------------------------------------------------------------------------------------------- the kernel

@triton.jit
def _dot_bf16(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a·b for bf16 a, b. The Triton interpreter multiplies bf16 dot operands as their raw uint16 bits
    (triton 3.9), so there the same bf16 values go in as fp32: their products and fp32 sums are identical."""
    if INTERPRETED:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _mix_partial(f, fn_ptr, d, d_ok, D, N: tl.constexpr, NM: tl.constexpr, USE_DOT: tl.constexpr,
                 FN_BF16_PARTS: tl.constexpr, INTERPRETED: tl.constexpr):
    """f [BLOCK_T, BLOCK_D] (one stream's chunk, fp32, zero where masked) · fn[:, d]ᵀ → [BLOCK_T, NM] partial
    mixes, fp32-accurate; fn_ptr points at this stream's columns of fn.

    USE_DOT: tensor cores. With bf16 activations f is exact in bf16 and fn is split into three bf16 parts
    (hi + mid + lo carry all 24 bits of an fp32), so three bf16 dots give the fp32 product; other activation
    dtypes use an IEEE fp32 dot. Without USE_DOT (BLOCK_T < 16): broadcast-multiply-reduce on CUDA cores."""
    NMIX: tl.constexpr = (2 + N) * N
    j = tl.arange(0, NM)
    if USE_DOT:
        w = tl.load(fn_ptr + j[None, :] * (N * D) + d[:, None], mask=(j[None, :] < NMIX) & d_ok[:, None], other=0.0)
        w = w.to(tl.float32)
        if FN_BF16_PARTS:
            a16 = f.to(tl.bfloat16)
            hi = w.to(tl.bfloat16)
            rest = w - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            part = _dot_bf16(a16, lo, tl.zeros((f.shape[0], NM), tl.float32), INTERPRETED)
            part = _dot_bf16(a16, mid, part, INTERPRETED)
            part = _dot_bf16(a16, hi, part, INTERPRETED)
        else:
            part = tl.dot(f, w, input_precision="ieee")
    else:
        w = tl.load(fn_ptr + j[:, None] * (N * D) + d[None, :], mask=(j[:, None] < NMIX) & d_ok[None, :], other=0.0)
        part = tl.sum(f[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return part


@triton.jit
def _finish_rows(res_ptr, new_res_ptr, base_ptr, scale_ptr, norm_w_ptr, out_ptr, post_out_ptr, comb_out_ptr,
                 ws_ptr, tt, t_ok, D, split, iters, rms_eps, hc_eps, norm_eps,
                 N: tl.constexpr, NP: tl.constexpr, NM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_POST: tl.constexpr, HAS_NORM: tl.constexpr):
    """Phase 2 for a token block: partials → pre/post/comb → layer_in (→ RMSNorm with weight)."""
    NMIX: tl.constexpr = (2 + N) * N
    tl.debug_barrier()
    k = tl.arange(0, NP)
    k_ok = k < N
    i3 = k[None, :, None]
    j3 = k[None, None, :]
    ij_ok = (i3 < N) & (j3 < N)
    ssq = tl.zeros(tt.shape, tl.float32)
    pre_m = tl.zeros((tt.shape[0], NP), tl.float32)
    post_m = tl.zeros((tt.shape[0], NP), tl.float32)
    comb_m = tl.zeros((tt.shape[0], NP, NP), tl.float32)
    for s in range(split):
        row = ws_ptr + (tt * split + s) * NM
        ssq += tl.load(row + NMIX)
        pre_m += tl.load(row[:, None] + k[None, :], mask=k_ok[None, :], other=0.0)
        post_m += tl.load(row[:, None] + N + k[None, :], mask=k_ok[None, :], other=0.0)
        comb_m += tl.load(row[:, None, None] + 2 * N + i3 * N + j3, mask=ij_ok, other=0.0)
    r = tl.math.rsqrt(ssq / (N * D) + rms_eps)

    s_pre = tl.load(scale_ptr).to(tl.float32)
    s_post = tl.load(scale_ptr + 1).to(tl.float32)
    s_comb = tl.load(scale_ptr + 2).to(tl.float32)
    b_pre = tl.load(base_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    b_post = tl.load(base_ptr + N + k, mask=k_ok, other=0.0).to(tl.float32)
    b_comb = tl.load(base_ptr + 2 * N + i3 * N + j3, mask=ij_ok, other=0.0).to(tl.float32)
    pre = tl.where(k_ok[None, :], tl.sigmoid(pre_m * r[:, None] * s_pre + b_pre[None, :]) + hc_eps, 0.0)
    post = 2.0 * tl.sigmoid(post_m * r[:, None] * s_post + b_post[None, :])
    tl.store(post_out_ptr + tt[:, None] * N + k[None, :], post, mask=t_ok[:, None] & k_ok[None, :])

    # softmax over destinations, then Sinkhorn; padded rows/columns are held at 0 and stay 0.
    logits = tl.where(j3 < N, comb_m * r[:, None, None] * s_comb + b_comb, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    comb = tl.where(ij_ok, e / tl.sum(e, axis=2)[:, :, None] + hc_eps, 0.0)
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + hc_eps)
    tl.store(comb_out_ptr + tt[:, None, None] * (N * N) + i3 * N + j3, comb, mask=t_ok[:, None, None] & ij_ok)

    if HAS_POST:
        src_ptr = new_res_ptr
    else:
        src_ptr = res_ptr
    chunks = tl.cdiv(D, BLOCK_D)
    ssq_in = tl.zeros(tt.shape, tl.float32)
    for c in range(chunks):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        td_ok = t_ok[:, None] & (d[None, :] < D)
        rows = tt[:, None, None] * (N * D) + k[None, :, None] * D + d[None, None, :]
        v = tl.load(src_ptr + rows, mask=td_ok[:, None, :] & k_ok[None, :, None], other=0.0).to(tl.float32)
        layer_in = tl.sum(pre[:, :, None] * v, axis=1).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tt[:, None] * D + d[None, :], layer_in, mask=td_ok)
        if HAS_NORM:
            li = layer_in.to(tl.float32)
            ssq_in += tl.sum(li * li, axis=1)
    if HAS_NORM:
        tl.debug_barrier()
        r_in = tl.math.rsqrt(ssq_in / D + norm_eps)
        for c in range(chunks):
            d = c * BLOCK_D + tl.arange(0, BLOCK_D)
            td_ok = t_ok[:, None] & (d[None, :] < D)
            li = tl.load(out_ptr + tt[:, None] * D + d[None, :], mask=td_ok, other=0.0).to(tl.float32)
            w = tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            normed = (li * r_in[:, None]) * w[None, :]
            tl.store(out_ptr + tt[:, None] * D + d[None, :], normed.to(out_ptr.dtype.element_ty), mask=td_ok)


@triton.jit
def _mhc_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, fn_ptr, base_ptr, scale_ptr, norm_w_ptr,
                new_res_ptr, out_ptr, post_out_ptr, comb_out_ptr, ws_ptr, count_ptr,
                T, D, split, iters, rms_eps, hc_eps, norm_eps,
                N: tl.constexpr, NP: tl.constexpr, NM: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_DOT: tl.constexpr, FN_BF16_PARTS: tl.constexpr, INTERPRETED: tl.constexpr,
                HAS_POST: tl.constexpr, HAS_PRE: tl.constexpr, HAS_NORM: tl.constexpr):
    NMIX: tl.constexpr = (2 + N) * N
    tb = tl.program_id(0)
    sl = tl.program_id(1)
    # Pointers start at this block's first token (64-bit, once); offsets inside the block stay 32-bit.
    t0 = tb.to(tl.int64) * BLOCK_T
    x_ptr += t0 * D
    res_ptr += t0 * (N * D)
    new_res_ptr += t0 * (N * D)
    out_ptr += t0 * D
    post_ptr += t0 * N
    post_out_ptr += t0 * N
    comb_ptr += t0 * (N * N)
    comb_out_ptr += t0 * (N * N)
    ws_ptr += t0 * (split * NM)
    tt = tl.arange(0, BLOCK_T)
    t_ok = tt < T - t0

    mixes = tl.zeros((BLOCK_T, NM), tl.float32)
    ssq = tl.zeros((BLOCK_T,), tl.float32)
    chunks = tl.cdiv(D, BLOCK_D)
    per_slice = tl.cdiv(chunks, split)
    for c in range(sl * per_slice, tl.minimum(sl * per_slice + per_slice, chunks)):
        d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        td_ok = t_ok[:, None] & d_ok[None, :]
        if HAS_POST:
            x = tl.load(x_ptr + tt[:, None] * D + d[None, :], mask=td_ok, other=0.0).to(tl.float32)
        # Destination stream j (a runtime loop: unrolled, the streams' tiles would all be live at once).
        for j in range(N):
            if HAS_POST:  # new_res[j] = post_j·x + Σ_i comb[i, j]·res[i]; res[i] is re-read from L1 per j
                mix = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                for i in tl.static_range(N):
                    comb_ij = tl.load(comb_ptr + tt * (N * N) + i * N + j, mask=t_ok, other=0.0).to(tl.float32)
                    res_i = tl.load(res_ptr + tt[:, None] * (N * D) + i * D + d[None, :], mask=td_ok, other=0.0)
                    mix += comb_ij[:, None] * res_i.to(tl.float32)
                post_j = tl.load(post_ptr + tt * N + j, mask=t_ok, other=0.0).to(tl.float32)
                new_j = (post_j[:, None] * x + mix).to(new_res_ptr.dtype.element_ty)
                tl.store(new_res_ptr + tt[:, None] * (N * D) + j * D + d[None, :], new_j, mask=td_ok)
                f = new_j.to(tl.float32)
            else:
                f = tl.load(res_ptr + tt[:, None] * (N * D) + j * D + d[None, :], mask=td_ok, other=0.0)
                f = f.to(tl.float32)
            if HAS_PRE:
                ssq += tl.sum(f * f, axis=1)
                mixes += _mix_partial(f, fn_ptr + j * D, d, d_ok, D, N, NM, USE_DOT, FN_BF16_PARTS, INTERPRETED)

    if HAS_PRE:
        cols = tl.arange(0, NM)
        partial = mixes + tl.where(cols[None, :] == NMIX, ssq[:, None], 0.0)
        tl.store(ws_ptr + (tt[:, None] * split + sl) * NM + cols[None, :], partial)
        # With split > 1 the last slice of this token block to arrive finishes it: the ticket's acq_rel orders the
        # partials and new_res stores of the other slices (each made before a CTA barrier) before our loads.
        ticket = split - 1
        if split > 1:
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + tb, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:
            _finish_rows(res_ptr, new_res_ptr, base_ptr, scale_ptr, norm_w_ptr, out_ptr, post_out_ptr, comb_out_ptr,
                         ws_ptr, tt, t_ok, D, split, iters, rms_eps, hc_eps, norm_eps, N, NP, NM, BLOCK_D,
                         HAS_POST, HAS_NORM)
            if split > 1:
                tl.store(count_ptr + tb, 0)  # leave the ticket ready for the next launch


# ------------------------------------------------------------------------------------------------- launching

_KINDS = {  # op -> (HAS_POST, HAS_PRE, HAS_NORM)
    "mhc_post_pre": (True, True, True),
    "mhc_pre": (False, True, False),
    "mhc_post": (True, False, False),
}


@dataclass(frozen=True)
class _Problem:
    op: str
    n: int
    d: int
    dtype: torch.dtype
    interpreted: bool = False


def pick_config(op: str, tokens: int, fam: str) -> dict[str, int]:
    """The configs.TABLE row for `op` at `tokens` tokens on family `fam` ('cuda' | 'rocm')."""
    for bucket in _buckets(op):
        row = launch_config(bucket, fam)
        if row["max_t"] == 0 or tokens <= row["max_t"]:
            return row
    raise AssertionError("configs: the mhc.large row must have max_t = 0 (no limit)")


def _plan(p: _Problem, cfg: dict[str, int]) -> tuple[dict[str, object], int]:
    """The kernel's constexprs and the number of D slices for one problem and config row (tuned at n = 4)."""
    has_post, has_pre, has_norm = _KINDS[p.op]
    np_ = triton.next_power_of_2(p.n)
    nm = max(16, triton.next_power_of_2((2 + p.n) * p.n + 1))  # the mixes plus one column for Σx²
    block_d = min(cfg["block_d"], triton.next_power_of_2(p.d))
    if has_pre:  # keep the fn tile (BLOCK_D × NM) at the size the row was tuned for (NM = 32)
        block_d = max(16, min(block_d, cfg["block_d"] * 32 // nm))
    chunks = triton.cdiv(p.d, block_d)
    split = chunks if cfg["split"] == 0 else min(cfg["split"], chunks)
    split = triton.cdiv(chunks, triton.cdiv(chunks, split))  # no empty slices
    block_t = cfg["block_t"]
    meta = dict(N=p.n, NP=np_, NM=nm, BLOCK_T=block_t, BLOCK_D=block_d,
                USE_DOT=has_pre and block_t >= 16, FN_BF16_PARTS=p.dtype == torch.bfloat16,
                INTERPRETED=p.interpreted, HAS_POST=has_post, HAS_PRE=has_pre, HAS_NORM=has_norm)
    return meta, split


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per token block; the kernel resets each after use, so one buffer per
    (device, stream) serves every launch — no memset launch per call."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _device_family(device: torch.device) -> str:
    return "rocm" if device.type == "cuda" and torch.version.hip else "cuda"


def _launch(op, res, x=None, post=None, comb=None, fn=None, base=None, scale=None, norm_w=None,
            rms_eps=0.0, hc_eps=0.0, iters=1, norm_eps=0.0, config=None):
    """(new_res, layer_in or its RMSNorm, post_next, comb_next); the ones `op` does not produce are None."""
    n, d = res.shape[-2:]
    lead = res.shape[:-2]
    tokens = res.numel() // (n * d)
    dev, dtype = res.device, res.dtype
    has_post, has_pre, has_norm = _KINDS[op]
    res2 = res.reshape(tokens, n, d).contiguous()
    new_res = torch.empty_like(res2) if has_post else None
    out = torch.empty(tokens, d, dtype=dtype, device=dev) if has_pre else None
    post_out = torch.empty(tokens, n, dtype=torch.float32, device=dev) if has_pre else None
    comb_out = torch.empty(tokens, n, n, dtype=torch.float32, device=dev) if has_pre else None
    if tokens:
        cfg = config or pick_config(op, tokens, _device_family(dev))
        meta, split = _plan(_Problem(op, n, d, dtype, dev.type == "cpu"), cfg)
        blocks = triton.cdiv(tokens, meta["BLOCK_T"])
        ws = torch.empty(blocks * meta["BLOCK_T"] * split * meta["NM"], dtype=torch.float32, device=dev) \
            if has_pre else None
        counters = _arrival_counters(dev, blocks if split > 1 else 1) if has_pre else None  # int32 even unused

        def pointer(t, *shape):  # an absent tensor gets a stand-in the kernel never dereferences
            return res2 if t is None else t.reshape(shape or t.shape).contiguous()

        _mhc_kernel[(blocks, split)](
            pointer(x, tokens, d), res2, pointer(post, tokens, n), pointer(comb, tokens, n, n),
            pointer(fn), pointer(base), pointer(scale), pointer(norm_w),
            pointer(new_res), pointer(out), pointer(post_out), pointer(comb_out), pointer(ws), pointer(counters),
            tokens, d, split, iters, rms_eps, hc_eps, norm_eps,
            **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    shaped = lambda t, *tail: None if t is None else t.reshape(*lead, *tail)  # noqa: E731
    return shaped(new_res, n, d), shaped(out, d), shaped(post_out, n), shaped(comb_out, n, n)


# ----------------------------------------------------------------------------------------- ops and checks

def _unsupported(res, x=None, post=None, comb=None, fn=None, base=None, scale=None, norm_w=None,
                 iters=1) -> str | None:
    """Why the Triton kernel cannot run these arguments, in one sentence; None when it can."""
    if not isinstance(res, torch.Tensor) or res.dim() < 2:
        return "mhc: res must be a tensor of shape [..., n, D]."
    n, d = res.shape[-2:]
    tensors = [t for t in (res, x, post, comb, fn, base, scale, norm_w) if t is not None]
    if res.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "mhc: the Triton kernels run CPU tensors only under TRITON_INTERPRET=1."
    if res.device.type not in ("cpu", "cuda"):
        return f"mhc: the Triton kernels do not run on {res.device.type} tensors."
    if any(t.device != res.device for t in tensors):
        return "mhc: all tensors must be on one device."
    if res.dtype not in _ACT_DTYPES:
        return f"mhc: the residual dtype {res.dtype} is not one of bf16, fp16, fp32."
    if not 2 <= n <= _MAX_STREAMS or d < 1:
        return f"mhc: n = {n} streams (2..{_MAX_STREAMS} supported) and D = {d} (at least 1)."
    if any(not t.is_floating_point() for t in tensors):
        return "mhc: every tensor argument must be floating point."
    lead = tuple(res.shape[:-2])
    if x is not None and (tuple(x.shape) != (*lead, d) or x.dtype != res.dtype):
        return f"mhc: x must be {[*lead, d]} in {res.dtype}, got {list(x.shape)} in {x.dtype}."
    if post is not None and tuple(post.shape) != (*lead, n):
        return f"mhc: post must be {[*lead, n]}, got {list(post.shape)}."
    if comb is not None and tuple(comb.shape) != (*lead, n, n):
        return f"mhc: comb must be {[*lead, n, n]}, got {list(comb.shape)}."
    mixes = (2 + n) * n
    if fn is not None and tuple(fn.shape) != (mixes, n * d):
        return f"mhc: fn must be [{mixes}, {n * d}] for n = {n}, D = {d}, got {list(fn.shape)}."
    if base is not None and base.numel() != mixes:
        return f"mhc: base must hold (2+n)·n = {mixes} values, got {base.numel()}."
    if scale is not None and scale.numel() != 3:
        return f"mhc: scale must hold 3 values, got {scale.numel()}."
    if norm_w is not None and tuple(norm_w.shape) != (d,):
        return f"mhc: norm_w must be [{d}], got {list(norm_w.shape)}."
    if not isinstance(iters, int) or iters < 1:
        return f"mhc: Sinkhorn iters must be a positive int, got {iters!r}."
    return None


def _checked(reason: str | None) -> None:
    if reason is not None:
        raise InputError(reason)


def supports_mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps,
                          *args, **kwargs):
    return _unsupported(res, x, post, comb, fn, base, scale, norm_w, iters)


def supports_mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters, *args, **kwargs):
    return _unsupported(res, fn=fn, base=base, scale=scale, iters=iters)


def supports_mhc_post(x, res, post, comb, *args, **kwargs):
    return _unsupported(res, x, post, comb)


def mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps, config=None):
    """dflash.mhc_post_pre in one launch → (new_res, RMSNorm(layer_in)·w, post_next, comb_next)."""
    _checked(supports_mhc_post_pre(x, res, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters, norm_eps))
    return _launch("mhc_post_pre", res, x, post, comb, fn, base, scale, norm_w, rms_eps, hc_eps, iters,
                   norm_eps, config)


def mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters, config=None):
    """dflash.mhc_pre in one launch → (layer_in, post, comb)."""
    _checked(supports_mhc_pre(res, fn, base, scale, rms_eps, hc_eps, iters))
    _, layer_in, post, comb = _launch("mhc_pre", res, fn=fn, base=base, scale=scale, rms_eps=rms_eps,
                                      hc_eps=hc_eps, iters=iters, config=config)
    return layer_in, post, comb


def mhc_post(x, res, post, comb, config=None):
    """dflash.mhc_post in one launch → new_res."""
    _checked(supports_mhc_post(x, res, post, comb))
    return _launch("mhc_post", res, x, post, comb, config=config)[0]


register(Provider("mhc_post_pre", "triton", ("cuda", "rocm"), mhc_post_pre, priority=10,
                  supports=supports_mhc_post_pre))
register(Provider("mhc_pre", "triton", ("cuda", "rocm"), mhc_pre, priority=10, supports=supports_mhc_pre))
register(Provider("mhc_post", "triton", ("cuda", "rocm"), mhc_post, priority=10, supports=supports_mhc_post))


# ---------------------------------------------------------------------------------------------------- AOT

def _signature(dtype: torch.dtype) -> dict[str, str]:
    act = "*" + _TL_NAMES[dtype]
    pointers = dict(x_ptr=act, res_ptr=act, post_ptr="*fp32", comb_ptr="*fp32", fn_ptr="*fp32",
                    base_ptr="*fp32", scale_ptr="*fp32", norm_w_ptr="*fp32", new_res_ptr=act, out_ptr=act,
                    post_out_ptr="*fp32", comb_out_ptr="*fp32", ws_ptr="*fp32", count_ptr="*i32")
    scalars = dict(T="i32", D="i32", split="i32", iters="i32", rms_eps="fp32", hc_eps="fp32", norm_eps="fp32")
    sig = {**pointers, **scalars}
    return {name: sig.get(name, "constexpr") for name in _mhc_kernel.arg_names}


def _buckets(op: str) -> tuple[str, ...]:
    return ("mhc.post",) if op == "mhc_post" else ("mhc.small", "mhc.medium", "mhc.large")


def aot_specs(fam: str = "cuda") -> list[KernelSpec]:
    """Every configuration the launcher picks for bf16, n = 4, D ∈ {4096, 7168}, with `fam`'s config rows.
    D is a runtime argument, so both hidden sizes share a binary wherever their constexprs agree."""
    shared: dict[tuple, list[int]] = {}
    for op in _KINDS:
        for bucket in _buckets(op):
            cfg = launch_config(bucket, fam)
            for d in (4096, 7168):
                meta, _ = _plan(_Problem(op, 4, d, torch.bfloat16), cfg)
                shared.setdefault((op, bucket, tuple(meta.items())), []).append(d)
    return [KernelSpec(f"{op}_{bucket.split('.')[1]}_bf16_n4_D{'+'.join(map(str, ds))}", _mhc_kernel,
                       _signature(torch.bfloat16), dict(meta), launch_config(bucket, fam)["num_warps"],
                       launch_config(bucket, fam)["num_stages"])
            for (op, bucket, meta), ds in shared.items()]
