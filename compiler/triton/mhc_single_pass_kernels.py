"""dflash.mhc_post_pre in ONE persistent, warp-specialized launch (Gluon, sm_90): DRAM bytes at the floor.

before (mhc.py / mhc_rows.py, two launches):  res, x ──phase 1──▶ new_res (HBM) ──phase 2──▶ out
after (this kernel, one launch):              res, x ──▶ new_res (HBM; kept in shared memory until applied) ──▶ out

CTA (s, r) owns column slice s (W = 128 columns of every stream) and token range r; the S·R CTAs of the grid are
co-resident (a cooperative launch), one per SM. fn's slice stays in shared memory for the whole launch, so every
16-token sub-block reuses it. Six partitions share the CTA, handing sub-blocks on through mbarrier rings:
  load (1 warp):     cp.async of each sub-block's x, res, post, comb into a ring of ST stages;
  mix (8 warps):     new_res = post·x + combᵀ·res, the Gram matrix of the rounded row → workspace, the rounded
                     row → the row ring (SN slots in shared memory, one allocation per stream so that the stores
                     need no barriers between them), then new_res → HBM; a slot is refilled once
                     the gemv and the apply have both read it, so the mix runs at most SN sub-blocks ahead;
  gemv (4 warps):    the (2+n)·n partial mixes, rows from the row ring against fn's bf16 parts on mma_v2 (one
                     accumulator per part: independent mma chains) → workspace;
  release (1 warp):  once both are stored, a gpu-scope release increment of the sub-block's first flag;
  reduce (1 warp):   for the sub-blocks k of its range with k mod S == s: waits until all S slices released k,
                     sums their partials → r, pre, r_in (the norm's statistic from the Gram matrix: pre-weighted
                     Σ of the Gram pairs), releases k's second flag; then post and comb (softmax + Sinkhorn);
  apply (4 warps):   per sub-block, once its second flag is set: layer_in = Σ pre_j·new_res_j from the row ring (no
                     re-read of new_res from L2 or HBM), rounded, ·r_in·w → out. It polls the next flag ahead.
The flags are zeroed per launch by the launcher (mhc_single_pass.py), which also checks what the schedule needs.
Spins are bounded (≈ seconds): a broken schedule ends with wrong numbers instead of hanging the device.
docs/kernels/mhc.md, "Session 20" (the timelines), "Session 21" (the provider, the measurements), "Session 22"
(the row ring shared with the apply) and "Session 23" (the gemv's chains, the bounds measured by ablation).
"""

import functools

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .mhc_math import comb_from_logits, comb_logits

# the same operations under their triton 3.6 and 3.9 names
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

B = 16                          # tokens per sub-block: the M of the gemv's mma
W = 128                         # columns per slice and stream
MIX_WARPS = 8                   # the kernel's num_warps: the mix partition's warps


@gluon.jit
def _sigmoid(v):
    return 1.0 / (1.0 + gl.exp(-v))


@gluon.jit
def _wait_flag(flag_ptr, target):
    """Spin (acquire, gpu scope) until *flag_ptr >= target, for at most 4M reads."""
    seen = gl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < 4_000_000):
        seen = gl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
        spins += 1


@gluon.jit
def _load_partition(x_ptr, res_ptr, post_ptr, comb_ptr, x_s, res_s, post_s, comb_s, ready, empty, k0, K, s, T, D,
                    N: gl.constexpr, B: gl.constexpr, W: gl.constexpr, ST: gl.constexpr, LBLK: gl.constexpr,
                    LVEC: gl.constexpr):
    tb = gl.arange(0, B, layout=gl.SliceLayout(1, LBLK))
    cols = s * W + gl.arange(0, W, layout=gl.SliceLayout(0, LBLK))
    tv = gl.arange(0, B, layout=LVEC)
    for i in range(K):
        st = i % ST
        mbarrier.wait(empty.index(st), ((i // ST) & 1) ^ 1)
        tt = (k0 + i) * B + tb
        ok = (tt[:, None] < T) & (cols[None, :] < D)  # past T: zero-filled, never stored
        _async_load(x_s.index(st), x_ptr + tt[:, None] * D + cols[None, :], mask=ok)
        for q in gl.static_range(N):
            _async_load(res_s.index(st * N + q), res_ptr + tt[:, None] * (N * D) + q * D + cols[None, :], mask=ok)
        tvk = (k0 + i) * B + tv
        for j in gl.static_range(N):
            _async_load(post_s.index(st * N + j), post_ptr + tvk * N + j, mask=tvk < T)
        for q in gl.static_range(N * N):
            _async_load(comb_s.index(st * N * N + q), comb_ptr + tvk * (N * N) + q, mask=tvk < T)
        async_copy.mbarrier_arrive(ready.index(st), increment_count=False)


@gluon.jit
def _mix_partition(x_s, res_s, post_s, comb_s, ready, empty, nr_s, nr_ready, nr_free, ws_ptr, new_res_ptr,
                   k0, K, s, T, D, N: gl.constexpr, B: gl.constexpr, W: gl.constexpr, S: gl.constexpr,
                   ST: gl.constexpr, SN: gl.constexpr, BLK: gl.constexpr):
    NMIX: gl.constexpr = (2 + N) * N
    C: gl.constexpr = NMIX + N * (N + 1) // 2
    tb = gl.arange(0, B, layout=gl.SliceLayout(1, BLK))
    cols = s * W + gl.arange(0, W, layout=gl.SliceLayout(0, BLK))
    for i in range(K):
        st = i % ST
        k = k0 + i
        mbarrier.wait(ready.index(st), (i // ST) & 1)
        xc = x_s.index(st).load(BLK).to(gl.float32)
        nr = ()
        for j in gl.static_range(N):
            mix = post_s.index(st * N + j).load(gl.SliceLayout(1, BLK))[:, None] * xc
            for q in gl.static_range(N):
                comb_qj = comb_s.index(st * N * N + q * N + j).load(gl.SliceLayout(1, BLK))
                mix += comb_qj[:, None] * res_s.index(st * N + q).load(BLK).to(gl.float32)
            nr = nr + (mix.to(gl.bfloat16),)
        mbarrier.arrive(empty.index(st), count=1)
        tt = k * B + tb
        ok = (tt[:, None] < T) & (cols[None, :] < D)
        wk = ws_ptr + (k * C) * (S * B) + s * B  # workspace [sub-block, column, slice, token]
        for j in gl.static_range(N):
            fj = nr[j].to(gl.float32)
            for q in gl.static_range(j + 1):
                gl.store(wk + (N + j * (j + 1) // 2 + q) * (S * B) + tb, gl.sum(fj * nr[q].to(gl.float32), axis=1))
        sn = i % SN  # the slot's last reader, sub-block i − SN's apply, bounds how far the mix runs ahead
        mbarrier.wait(nr_free.index(sn), ((i // SN) & 1) ^ 1)
        for j in gl.static_range(N):
            nr_s[j].index(sn).store(nr[j])
        mbarrier.arrive(nr_ready.index(sn), count=1)
        for j in gl.static_range(N):  # after the hand-off, so the gemv starts first
            gl.store(new_res_ptr + tt[:, None] * (N * D) + j * D + cols[None, :], nr[j], mask=ok)


@gluon.jit
def _gemv_partition(nr_s, nr_ready, nr_free, part_ready, part_free, fn_smem, fnp_ptr, ws_ptr, k0, K, s, D,
                    opaque_zero, N: gl.constexpr, B: gl.constexpr, W: gl.constexpr, S: gl.constexpr,
                    P: gl.constexpr, SN: gl.constexpr, SP: gl.constexpr, MMA: gl.constexpr, FNL: gl.constexpr):
    NMIX: gl.constexpr = (2 + N) * N
    NG: gl.constexpr = N * (N + 1) // 2
    C: gl.constexpr = NMIX + NG
    NM: gl.constexpr = 32  # the mma's N: the mixes, padded
    tm = gl.arange(0, B, layout=gl.SliceLayout(1, MMA))
    qm = gl.arange(0, NM, layout=gl.SliceLayout(0, MMA))
    kk = gl.arange(0, W, layout=gl.SliceLayout(1, FNL))
    mm = gl.arange(0, NM, layout=gl.SliceLayout(0, FNL))
    for p in gl.static_range(P):  # fn's slice → shared memory, here: its only reader
        for j in gl.static_range(N):
            fn_smem[p].index(j).store(gl.load(fnp_ptr + (p * NM + mm[None, :]) * (N * D) + j * D + s * W + kk[:, None]))
    _barrier()
    for i in range(K):
        sn = i % SN
        mbarrier.wait(nr_ready.index(sn), (i // SN) & 1)
        accs = ()  # one accumulator per part of fn: P independent mma chains instead of one chain of P·N
        for p in gl.static_range(P):
            accs = accs + (gl.zeros([B, NM], gl.float32, MMA),)
        for j in gl.static_range(N):
            a = nr_s[j].index(sn).load(gl.DotOperandLayout(0, MMA, 2))
            chained = ()
            for p in gl.static_range(P):  # opaque_zero: fn's operands read in the loop, not hoisted into registers
                b = fn_smem[P - 1 - p].index(j + i * opaque_zero).load(gl.DotOperandLayout(1, MMA, 2))
                chained = chained + (mma_v2(a, b, accs[p]),)
            accs = chained
        acc = accs[0]
        for p in gl.static_range(1, P):
            acc += accs[p]
        mbarrier.arrive(nr_free.index(sn), count=1)
        mbarrier.wait(part_free.index(i % SP), ((i // SP) & 1) ^ 1)
        wk = ws_ptr + ((k0 + i) * C) * (S * B) + s * B
        col = gl.where(qm < N, qm, qm + NG)  # the workspace column of mix q: pre's mixes, the Gram pairs, the rest
        gl.store(wk + col[None, :] * (S * B) + tm[:, None], acc, mask=qm[None, :] < NMIX)
        mbarrier.arrive(part_ready.index(i % SP), count=1)


@gluon.jit
def _release_partition(flags_ptr, part_ready, part_free, k0, K, SP: gl.constexpr):
    """The release fence waits here, not in the mix or gemv partitions."""
    for i in range(K):
        mbarrier.wait(part_ready.index(i % SP), (i // SP) & 1)
        gl.atomic_add(flags_ptr + k0 + i, 1, sem="release", scope="gpu")
        mbarrier.arrive(part_free.index(i % SP), count=1)


@gluon.jit
def _column_sums(wr, rs, c_lo: gl.constexpr, c_hi: gl.constexpr, S: gl.constexpr, B: gl.constexpr,
                 CH: gl.constexpr):
    """Σ over the S slices of workspace columns c_lo … c_hi − 1 ([B] each), CH columns' loads in flight at once."""
    m = ()
    for c0 in gl.static_range(c_lo, c_hi, CH):
        vals = ()
        for c in gl.static_range(c0, c0 + CH):
            if c < c_hi:
                vals = vals + (gl.load(wr + c * (S * B), mask=rs[:, None] < S, other=0.0, cache_modifier=".cg"),)
        for v in gl.static_range(len(vals)):
            m = m + (gl.sum(vals[v], axis=0),)
    return m


@gluon.jit
def _reduce_partition(ws_ptr, coef_ptr, flags_ptr, base_ptr, scale_ptr, post_out_ptr, comb_out_ptr, k0, K, s,
                      num_blocks, T, D, rms_eps, hc_eps, norm_eps, iters, N: gl.constexpr, B: gl.constexpr,
                      S: gl.constexpr, SP2: gl.constexpr, RED: gl.constexpr, CH: gl.constexpr):
    NMIX: gl.constexpr = (2 + N) * N
    NG: gl.constexpr = N * (N + 1) // 2
    C: gl.constexpr = NMIX + NG
    rs = gl.arange(0, SP2, layout=gl.SliceLayout(1, RED))
    tr = gl.arange(0, B, layout=gl.SliceLayout(0, RED))
    s_pre = gl.load(scale_ptr)
    s_post = gl.load(scale_ptr + 1)
    first = (s - k0 % S + S) % S
    for kr in range(k0 + first, k0 + K, S):
        _wait_flag(flags_ptr + kr, S)
        wr = ws_ptr + (kr * C) * (S * B) + rs[:, None] * B + tr[None, :]
        m = _column_sums(wr, rs, 0, N + NG, S, B, CH)  # pre's mixes and the Gram pairs: all the apply needs
        ssq = m[N]
        for j in gl.static_range(1, N):
            ssq += m[N + j * (j + 1) // 2 + j]
        rr = gl.rsqrt(ssq / (N * D) + rms_eps)
        pre = ()
        for j in gl.static_range(N):
            pre = pre + (_sigmoid(m[j] * rr * s_pre + gl.load(base_ptr + j)) + hc_eps,)
        # Σ layer_in² = Σ_jq pre_j·pre_q·⟨new_res_j, new_res_q⟩
        quad = gl.zeros([B], gl.float32, gl.SliceLayout(0, RED))
        for j in gl.static_range(N):
            for q in gl.static_range(j + 1):
                quad += (1.0 if q == j else 2.0) * (pre[j] * pre[q]) * m[N + j * (j + 1) // 2 + q]
        for j in gl.static_range(N):
            gl.store(coef_ptr + (kr * (N + 1) + j) * B + tr, pre[j])
        gl.store(coef_ptr + (kr * (N + 1) + N) * B + tr, gl.rsqrt(quad / D + norm_eps))
        gl.atomic_xchg(flags_ptr + num_blocks + kr, 1, sem="release", scope="gpu")
        m2 = _column_sums(wr, rs, N + NG, C, S, B, CH)  # post's and comb's mixes: outputs only, after the release
        tok = kr * B + tr
        for j in gl.static_range(N):
            gl.store(post_out_ptr + tok * N + j, 2.0 * _sigmoid(m2[j] * rr * s_post + gl.load(base_ptr + N + j)),
                     mask=tok < T)
        mr = ()
        for q in gl.static_range(N * N):
            mr = mr + (m2[N + q] * rr,)
        comb_from_logits(comb_logits(mr, base_ptr, scale_ptr, N), hc_eps, iters, comb_out_ptr, tok, tok < T, N)


@gluon.jit
def _apply_partition(nr_s, nr_ready, nr_free, out_ptr, coef_ptr, norm_w_ptr, flags_ptr, k0, K, s, num_blocks, T, D,
                     N: gl.constexpr, B: gl.constexpr, W: gl.constexpr, SN: gl.constexpr, ABLK: gl.constexpr):
    """Sub-block i's new_res from the row ring (shared memory), once its second flag is set; i + 1's flag polled."""
    tb = gl.arange(0, B, layout=gl.SliceLayout(1, ABLK))
    cols = s * W + gl.arange(0, W, layout=gl.SliceLayout(0, ABLK))
    w_norm = gl.load(norm_w_ptr + cols).to(gl.float32)
    k_last = k0 + K - 1
    seen = gl.atomic_add(flags_ptr + num_blocks + k0, 0, sem="acquire", scope="gpu")
    for i in range(K):
        ka = k0 + i
        spins = 0
        while (seen < 1) & (spins < 4_000_000):  # sub-block ka's flag, polled one iteration ago
            seen = gl.atomic_add(flags_ptr + num_blocks + ka, 0, sem="acquire", scope="gpu")
            spins += 1
        co = ()
        for j in gl.static_range(N + 1):
            co = co + (gl.load(coef_ptr + (ka * (N + 1) + j) * B + tb, cache_modifier=".cg"),)
        seen = gl.atomic_add(flags_ptr + num_blocks + gl.minimum(ka + 1, k_last), 0, sem="acquire", scope="gpu")
        sn = i % SN
        mbarrier.wait(nr_ready.index(sn), (i // SN) & 1)
        li = gl.zeros([B, W], gl.float32, ABLK)
        for j in gl.static_range(N):
            li += co[j][:, None] * nr_s[j].index(sn).load(ABLK).to(gl.float32)
        mbarrier.arrive(nr_free.index(sn), count=1)
        li = li.to(gl.bfloat16).to(gl.float32)  # layer_in in the activation dtype, as the reference rounds it
        tt = ka * B + tb
        gl.store(out_ptr + tt[:, None] * D + cols[None, :], ((li * co[N][:, None]) * w_norm[None, :]).to(gl.bfloat16),
                 mask=(tt[:, None] < T) & (cols[None, :] < D))


@gluon.jit
def single_pass_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, fnp_ptr, base_ptr, scale_ptr, norm_w_ptr,
                       new_res_ptr, out_ptr, post_out_ptr, comb_out_ptr, ws_ptr, coef_ptr, flags_ptr,
                       T, D, num_blocks, ranges, rms_eps, hc_eps, norm_eps, iters,
                       N: gl.constexpr, B: gl.constexpr, W: gl.constexpr, S: gl.constexpr, SP2: gl.constexpr,
                       P: gl.constexpr, ST: gl.constexpr, SP: gl.constexpr, SN: gl.constexpr, CH: gl.constexpr,
                       REGS: gl.constexpr,
                       BLK: gl.constexpr, ABLK: gl.constexpr, FNL: gl.constexpr, MMA: gl.constexpr,
                       LBLK: gl.constexpr, LVEC: gl.constexpr, RED: gl.constexpr, SMEM: gl.constexpr,
                       FLAT: gl.constexpr, NRL: gl.constexpr):
    pid = gl.program_id(0)
    s = pid % S
    r = pid // S
    k0 = r * num_blocks // ranges
    K = (r + 1) * num_blocks // ranges - k0  # ≥ 1: the launcher keeps ranges ≤ num_blocks
    NM: gl.constexpr = 32
    fn_smem = ()  # P bf16 parts [N, W, NM] of fn's slice, filled by the gemv partition
    for p in gl.static_range(P):
        fn_smem = fn_smem + (gl.allocate_shared_memory(gl.bfloat16, [N, W, NM], SMEM),)
    opaque_zero = num_blocks // (num_blocks + 1)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [ST, B, W], FLAT)
    res_s = gl.allocate_shared_memory(gl.bfloat16, [ST * N, B, W], FLAT)
    post_s = gl.allocate_shared_memory(gl.float32, [ST * N, B], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    comb_s = gl.allocate_shared_memory(gl.float32, [ST * N * N, B], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    ready = gl.allocate_shared_memory(gl.int64, [ST, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [ST, 1], mbarrier.MBarrierLayout())
    part_ready = gl.allocate_shared_memory(gl.int64, [SP, 1], mbarrier.MBarrierLayout())
    part_free = gl.allocate_shared_memory(gl.int64, [SP, 1], mbarrier.MBarrierLayout())
    nr_s = ()  # one allocation per stream: stores to different allocations need no barrier between them
    for j in gl.static_range(N):
        nr_s = nr_s + (gl.allocate_shared_memory(gl.bfloat16, [SN, B, W], NRL),)
    nr_ready = gl.allocate_shared_memory(gl.int64, [SN, 1], mbarrier.MBarrierLayout())
    nr_free = gl.allocate_shared_memory(gl.int64, [SN, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(ST):
        mbarrier.init(ready.index(st), count=32)  # every lane of the load warp arrives once its copies land
        mbarrier.init(empty.index(st), count=1)
    for sp in gl.static_range(SP):
        mbarrier.init(part_ready.index(sp), count=1)
        mbarrier.init(part_free.index(sp), count=1)
    for sn in gl.static_range(SN):
        mbarrier.init(nr_ready.index(sn), count=1)
        mbarrier.init(nr_free.index(sn), count=2)  # the gemv and the apply read each slot

    gl.warp_specialize([
        (_mix_partition, (x_s, res_s, post_s, comb_s, ready, empty, nr_s, nr_ready, nr_free, ws_ptr, new_res_ptr,
                          k0, K, s, T, D, N, B, W, S, ST, SN, BLK)),
        (_load_partition, (x_ptr, res_ptr, post_ptr, comb_ptr, x_s, res_s, post_s, comb_s, ready, empty, k0, K, s,
                           T, D, N, B, W, ST, LBLK, LVEC)),
        (_release_partition, (flags_ptr, part_ready, part_free, k0, K, SP)),
        (_reduce_partition, (ws_ptr, coef_ptr, flags_ptr, base_ptr, scale_ptr, post_out_ptr, comb_out_ptr, k0, K,
                             s, num_blocks, T, D, rms_eps, hc_eps, norm_eps, iters, N, B, S, SP2, RED, CH)),
        (_apply_partition, (nr_s, nr_ready, nr_free, out_ptr, coef_ptr, norm_w_ptr, flags_ptr, k0, K, s, num_blocks,
                            T, D, N, B, W, SN, ABLK)),
        (_gemv_partition, (nr_s, nr_ready, nr_free, part_ready, part_free, fn_smem, fnp_ptr, ws_ptr, k0, K, s, D,
                           opaque_zero, N, B, W, S, P, SN, SP, MMA, FNL)),
    ], [1, 1, 1, 4, 4], REGS)  # warps of load, release, reduce, apply, gemv


@functools.cache
def layouts() -> dict:
    """The distributed and shared-memory layouts the partitions use (constexpr arguments of the kernel)."""
    return dict(
        BLK=gl.BlockedLayout([1, 8], [2, 16], [MIX_WARPS, 1], [1, 0]),    # mix: [B, W] over 8 warps
        ABLK=gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0]),           # apply
        FNL=gl.BlockedLayout([8, 1], [16, 2], [1, 4], [0, 1]),            # fn's [W, NM] fill (gemv)
        MMA=gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8]),
        LBLK=gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0]),           # load: [B, W] in one warp
        LVEC=gl.BlockedLayout([1], [32], [1], [0]),
        RED=gl.BlockedLayout([1, 1], [2, 16], [1, 1], [1, 0]),            # reduce: [slices, B] in one warp
        SMEM=gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2),
        FLAT=gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=1, order=[1, 0]),
        NRL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
    )
