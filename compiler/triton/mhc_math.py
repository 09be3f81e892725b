"""Triton helpers shared by the mHC kernels (mhc.py, mhc_rows.py): the GEMV step against fn on tensor cores, the
workspace's slice sums and the per-token scalar math of the finish (pre, post, softmax + Sinkhorn), which works on
one [tokens] vector per scalar — a token's whole n×n matrix in one thread, no shuffles, no barriers."""

import triton
import triton.language as tl


@triton.jit
def dot_bf16(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a·b for bf16 a, b. The Triton interpreter multiplies bf16 dot operands as their raw uint16 bits
    (triton 3.9), so there the same bf16 values go in as fp32: their products and fp32 sums are identical."""
    if INTERPRETED:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def mix_partial(f, fn_ptr, d, d_ok, D, acc, N: tl.constexpr, NM: tl.constexpr, FN_PARTS: tl.constexpr,
                 FN_PRESPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + f [BLOCK_T, BLOCK_D] (one stream's chunk, fp32, zero where masked) · fn[:, d]ᵀ → [BLOCK_T, NM] on
    tensor cores; fn_ptr points at this stream's columns. FN_PARTS 0 (fp16/fp32 activations): an IEEE fp32 dot.
    2 or 3 (bf16 activations, exact in bf16): fn as bf16 parts hi + mid (+ lo), one bf16 dot each, smallest
    first — 3 parts carry all 24 bits of an fp32 (the fp32 product), 2 parts 16 bits (each fn element within
    2^-17 relative). FN_PRESPLIT: fn_ptr is the launcher's bf16 [FN_PARTS, NM, n·D] (rows zero-padded to NM);
    otherwise fn is fp32 and split here, in every program."""
    NMIX: tl.constexpr = (2 + N) * N
    j = tl.arange(0, NM)
    if FN_PRESPLIT:
        a16 = f.to(tl.bfloat16)
        for p in tl.static_range(FN_PARTS):
            part = fn_ptr + (FN_PARTS - 1 - p) * (NM * N * D)
            w = tl.load(part + j[None, :] * (N * D) + d[:, None], mask=d_ok[:, None], other=0.0)
            acc = dot_bf16(a16, w, acc, INTERPRETED)
    else:
        w = tl.load(fn_ptr + j[None, :] * (N * D) + d[:, None], mask=(j[None, :] < NMIX) & d_ok[:, None], other=0.0)
        w = w.to(tl.float32)
        if FN_PARTS == 0:
            acc = tl.dot(f, w, acc, input_precision="ieee")
        else:
            a16 = f.to(tl.bfloat16)
            hi = w.to(tl.bfloat16)
            rest = w - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            if FN_PARTS == 3:
                acc = dot_bf16(a16, (rest - mid.to(tl.float32)).to(tl.bfloat16), acc, INTERPRETED)
            acc = dot_bf16(a16, mid, acc, INTERPRETED)
            acc = dot_bf16(a16, hi, acc, INTERPRETED)
    return acc


@triton.jit
def _vsum(vals, first: tl.constexpr, stride: tl.constexpr, count: tl.constexpr):
    """vals[first] + vals[first + stride] + … (count terms) of a tuple of tensors."""
    acc = vals[first]
    for k in tl.static_range(1, count):
        acc += vals[first + k * stride]
    return acc


@triton.jit
def _vmax(vals, first: tl.constexpr, count: tl.constexpr):
    """max(vals[first], …, vals[first + count − 1]) of a tuple of tensors."""
    acc = vals[first]
    for k in tl.static_range(1, count):
        acc = tl.maximum(acc, vals[first + k])
    return acc


@triton.jit
def _normalize(c, eps, N: tl.constexpr, ROWS: tl.constexpr):
    """c: the n×n matrices of a token block as a flat tuple of N·N [BLOCK_T] vectors (row-major); divides each row
    (ROWS) or column by its sum + eps. One thread holds a token's whole matrix: no shuffles, no barriers."""
    SA: tl.constexpr = N if ROWS else 1
    SB: tl.constexpr = 1 if ROWS else N
    out = c
    for a in tl.static_range(N):
        s = _vsum(c, a * SA, SB, N) + eps
        for b in tl.static_range(N):
            out = out[:a * SA + b * SB] + (c[a * SA + b * SB] / s,) + out[a * SA + b * SB + 1:]
    return out


@triton.jit
def slice_sum(ws_ptr, tok, t_ok, q: tl.constexpr, col_stride, split, SPLIT_P2: tl.constexpr):
    """Σ over the `split` slices of workspace column q for tokens `tok`: the workspace is [column, token, slice]
    (col_stride tokens per column), so a column's [tokens, split] tile is contiguous (coalesced, one vector load per
    thread; a [token, slice, column] layout made every element its own 32-byte L2 sector)."""
    s = tl.arange(0, SPLIT_P2)
    v = tl.load(ws_ptr + (q * col_stride + tok[:, None]) * split + s[None, :],
                mask=(s[None, :] < split) & t_ok[:, None], other=0.0)
    return tl.sum(v, axis=1)


@triton.jit
def pre_post(m, r, base_ptr, scale_ptr, hc_eps, post_out_ptr, tt, t_ok, N: tl.constexpr):
    """pre_k = σ(m_k·r·s0 + b_k) + eps (returned: a tuple of N [tokens] vectors) and post_k = 2σ(m_(N+k)·r·s1 +
    b_(N+k)) (stored to post_out [tokens, N]), from the token's mixes m (a tuple of [tokens] vectors) and r."""
    s_pre = tl.load(scale_ptr).to(tl.float32)
    s_post = tl.load(scale_ptr + 1).to(tl.float32)
    pre = ()
    for k in tl.static_range(N):
        pre = pre + (tl.sigmoid(m[k] * r * s_pre + tl.load(base_ptr + k).to(tl.float32)) + hc_eps,)
        post = 2.0 * tl.sigmoid(m[N + k] * r * s_post + tl.load(base_ptr + N + k).to(tl.float32))
        tl.store(post_out_ptr + tt * N + k, post, mask=t_ok)
    return pre


@triton.jit
def comb_mr(m, r, N: tl.constexpr):
    """m_(2N+q)·r, q over (source, destination): the comb's mixes scaled by r, a tuple of N·N [tokens] vectors."""
    mr = ()
    for q in tl.static_range(N * N):
        mr = mr + (m[2 * N + q] * r,)
    return mr


@triton.jit
def comb_logits(mr, base_ptr, scale_ptr, N: tl.constexpr):
    """The comb logits m_(2N+q)·r·s2 + b_(2N+q) from comb_mr's products."""
    s_comb = tl.load(scale_ptr + 2).to(tl.float32)
    logits = ()
    for q in tl.static_range(N * N):
        logits = logits + (mr[q] * s_comb + tl.load(base_ptr + 2 * N + q).to(tl.float32),)
    return logits


@triton.jit
def comb_from_logits(logits, hc_eps, iters, comb_out_ptr, tt, t_ok, N: tl.constexpr):
    """comb = Sinkhorn(softmax over destinations(logits) + eps), `iters` normalizations → comb_out [tokens, N, N]."""
    comb = ()
    for i in tl.static_range(N):
        top = _vmax(logits, i * N, N)
        e = ()
        for j in tl.static_range(N):
            e = e + (tl.exp(logits[i * N + j] - top),)
        total = _vsum(e, 0, 1, N)
        for j in tl.static_range(N):
            comb = comb + (e[j] / total + hc_eps,)
    comb = _normalize(comb, hc_eps, N, False)
    for _ in range(iters - 1):
        comb = _normalize(comb, hc_eps, N, True)
        comb = _normalize(comb, hc_eps, N, False)
    for q in tl.static_range(N * N):
        tl.store(comb_out_ptr + tt * (N * N) + q, comb[q], mask=t_ok)


@triton.jit
def comb_sinkhorn(m, r, base_ptr, scale_ptr, hc_eps, iters, comb_out_ptr, tt, t_ok, N: tl.constexpr):
    """comb from the token's mixes m and r: comb_logits, then comb_from_logits."""
    comb_from_logits(comb_logits(comb_mr(m, r, N), base_ptr, scale_ptr, N), hc_eps, iters, comb_out_ptr, tt, t_ok,
                     N)


@triton.jit
def comb_or_its_mixes(m, r, base_ptr, scale_ptr, hc_eps, iters, comb_out_ptr, tt, t_ok, N: tl.constexpr,
                      LATER: tl.constexpr):
    """comb (comb_sinkhorn) to comb_out [tokens, N, N], or (LATER) the comb's mixes·r there, for a later launch to
    finish with comb_logits and comb_from_logits — the same formulas in the same order."""
    if LATER:
        mr = comb_mr(m, r, N)
        for q in tl.static_range(N * N):
            tl.store(comb_out_ptr + tt * (N * N) + q, mr[q], mask=t_ok)
    else:
        comb_sinkhorn(m, r, base_ptr, scale_ptr, hc_eps, iters, comb_out_ptr, tt, t_ok, N)


@triton.jit
def layer_in(src_ptr, out_ptr, pre, tok, td_ok, d, D, N: tl.constexpr):
    """layer_in = Σ_k pre_k·src_k for tokens `tok` and columns `d` of src [tokens, N, D] (pre: a tuple of N
    [tokens] vectors), summed in fp32 and rounded to out's dtype as the reference rounds it."""
    rows = src_ptr + tok[:, None] * (N * D) + d[None, :]
    li = pre[0][:, None] * tl.load(rows, mask=td_ok, other=0.0).to(tl.float32)
    for k in tl.static_range(1, N):
        li += pre[k][:, None] * tl.load(rows + k * D, mask=td_ok, other=0.0).to(tl.float32)
    return li.to(out_ptr.dtype.element_ty)
