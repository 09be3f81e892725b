"""Launch configurations per kernel and target family, in one table.

Keys: kernel name -> family ('cuda': warp 32, sm_80/sm_90; 'rocm': wavefront 64, gfx942/gfx950) -> params.
Kernel modules read their row with `launch_config(kernel, family)`; edit the numbers here, nowhere else.
"""

TABLE: dict[str, dict[str, dict[str, int]]] = {
    # rows are added by the kernel modules' authors: "kernel_name": {"cuda": {...}, "rocm": {...}},
    # launch.py: programmatic dependent launch of every kernel on GPUs of compute capability >= min_sm (each kernel
    # may start while the previous one finishes and waits for it before touching memory); `on` 0 turns it off.
    # H100, the runtime's steps built both ways and timed interleaved (benchmarks/ab_steps.py,
    # docs/kernels/launch.md): verify −0.16 to −0.22 ms, AR −0.18 to −0.20 ms, draft −0.03 ms
    "programmatic_launch": {
        "cuda": {"on": 1, "min_sm": 90},
        "rocm": {"on": 0, "min_sm": 0},
    },
    # mhc.py: dflash.mhc_post_pre / mhc_pre by token count T (first row with T <= max_t; 0 = no limit): block_t tokens
    # per program (>= 16: tensor-core GEMV against fn), D cut into `split` slices per token block (the last slice to
    # arrive finishes the block; with `programs`, fewer: the largest power of two keeping blocks × slices <= programs),
    # block_d columns per phase-1 step. fn_parts: fn as 3 bf16 parts (the fp32 product) or 2 (16 bits, <= 2^-17
    # relative), split in every program (fn_presplit 0: graph-safe, see mhc.fn_bf16_parts) or once per fn tensor by
    # the launcher (1, cached: the rocm prefill row; on the H100 the cuda large row was 1-2 % faster without it).
    # apply_launch 3 (mhc_rows.py): phase 1 without a Gram matrix; finish_here 1: the last slice finishes the block
    # (0: a finish launch); a rows launch (apply_rows tokens' whole rows per program: layer_in and its norm; with
    # finish_here its first programs run the comb's Sinkhorn);
    # layout_barrier 1 keeps new_res in one register layout (a PTX identity, cuda only); l2_hints 1 stores new_res
    # evict_last and loads x, res evict_first, so the rows launch finds more of new_res in L2 (H100, session 15: T 4096
    # -2.8 %, T 16384 -2.5 %, D 7168 T 4096 -2.4 %, T 1024 -2 to -3 %; off on the medium row, which lost 6 % at T 256).
    # cuda rows: session 12's H100 A/B against session 11's rows (benchmarks/ab_mhc_finish_here.py, docs/kernels/
    # mhc.md: D 4096 T 16 17.1 → 11.3 µs, T 256 42.2 → 23.6, T 1024 100.9 → 62.9, T 4096 237.5 → 217.0);
    # decode and small differ in num_stages only (2 wins at T 1 / 16, 1 at T 32 / 64). rocm rows: session 4's Gram
    # design (mhc.py's _mhc_kernel; apply_launch 1 = phase 2 in a second launch over [block_t, apply_d] tiles, 2 = the
    # finish too, 0 = the finisher does phase 2; flat_loop 1 = one loop over (chunk, stream) steps; comb_launch 1 = the
    # comb finished in the apply launch), untuned (wavefront 64; the layout barrier is PTX); its decode and wide rows
    # copy small and medium.
    # mhc.post (split 0 = one program per block_d chunk) serves mhc_post alone.
    "mhc.decode": {
        "cuda": {"max_t": 16, "block_t": 16, "block_d": 64, "split": 64, "apply_launch": 3, "finish_here": 1,
                 "apply_rows": 1, "layout_barrier": 1, "fn_parts": 2, "fn_presplit": 0, "num_warps": 4,
                 "num_stages": 2},
        "rocm": {"max_t": 16, "block_t": 16, "block_d": 32, "split": 32, "apply_launch": 1, "apply_d": 64,
                 "fn_parts": 3, "fn_presplit": 0, "flat_loop": 1, "comb_launch": 1,
                 "num_warps": 4, "num_stages": 2},
    },
    "mhc.small": {
        "cuda": {"max_t": 64, "block_t": 16, "block_d": 64, "split": 64, "apply_launch": 3, "finish_here": 1,
                 "apply_rows": 1, "layout_barrier": 1, "fn_parts": 2, "fn_presplit": 0, "num_warps": 4,
                 "num_stages": 1},
        "rocm": {"max_t": 64, "block_t": 16, "block_d": 32, "split": 32, "apply_launch": 1, "apply_d": 64,
                 "fn_parts": 3, "fn_presplit": 0, "flat_loop": 1, "comb_launch": 1,
                 "num_warps": 4, "num_stages": 2},
    },
    "mhc.medium": {
        "cuda": {"max_t": 256, "block_t": 16, "block_d": 64, "split": 64, "programs": 256, "apply_launch": 3,
                 "finish_here": 1, "apply_rows": 1, "layout_barrier": 1, "fn_parts": 2, "fn_presplit": 0,
                 "num_warps": 4, "num_stages": 1},
        "rocm": {"max_t": 256, "block_t": 16, "block_d": 32, "split": 16, "apply_launch": 1, "apply_d": 128,
                 "fn_parts": 3, "fn_presplit": 0, "flat_loop": 0, "comb_launch": 1,
                 "num_warps": 4, "num_stages": 2},
    },
    "mhc.wide": {
        "cuda": {"max_t": 1024, "block_t": 64, "block_d": 32, "split": 16, "programs": 128, "apply_launch": 3,
                 "finish_here": 1, "apply_rows": 1, "layout_barrier": 1, "l2_hints": 1, "fn_parts": 2,
                 "fn_presplit": 0, "num_warps": 8, "num_stages": 3},
        "rocm": {"max_t": 1024, "block_t": 16, "block_d": 32, "split": 16, "apply_launch": 1, "apply_d": 128,
                 "fn_parts": 3, "fn_presplit": 0, "flat_loop": 0, "comb_launch": 1,
                 "num_warps": 4, "num_stages": 2},
    },
    "mhc.large": {
        "cuda": {"max_t": 0, "block_t": 128, "block_d": 32, "split": 4, "apply_launch": 3, "finish_here": 1,
                 "apply_rows": 1, "layout_barrier": 1, "l2_hints": 1, "fn_parts": 2, "fn_presplit": 0,
                 "num_warps": 8, "num_stages": 3},
        "rocm": {"max_t": 0, "block_t": 64, "block_d": 32, "split": 8, "apply_launch": 3, "apply_d": 0,
                 "apply_rows": 1, "layout_barrier": 0, "fn_parts": 3, "fn_presplit": 1, "flat_loop": 0,
                 "num_warps": 4, "num_stages": 2},
    },
    # mhc_single_pass.py: the `gluon` provider of dflash.mhc_post_pre on sm_90, chosen for static T >= min_t. fn_parts
    # bf16 parts of fn in shared memory; stages: the load ring; partial_ring: the gemv's hand-off to the release;
    # row_ring: slots of rounded new_res rows in shared memory, read by the gemv and then by the apply, so it also
    # bounds how far the mix runs ahead of the apply (H100, session 22, T 4096, interleaved, against session 21's
    # re-read of new_res from L2: 6 slots D 4096 173 → 158.5–161 µs, D 7168 321–341 → 305–316; 4 / 5 slots 173–176 /
    # 165–166; 7 slots with stages 2 (the most that fit in 227 KiB) like 6); reduce_columns: workspace columns the
    # reducer loads at once; *_regs: each worker partition's register budget (session 21: gemv 88 / apply 168 against
    # 128 / 128 took D 4096 −1.5 %, D 7168 −3.5 %; session 22, with the row ring: apply 96–128, giving the mix 80–120,
    # no better).
    # min_t: H100, benchmarks/crossover_mhc_single_pass.py (2026-11-23 09:12 UTC, session 23's gemv chains,
    # docs/kernels/mhc.md), the single pass's time over the Triton provider's at D 4096 / 7168: T 512 0.99 / 1.08,
    # T 1024 0.89 / 0.91, T 1536 0.57 / 0.58, T 4096 0.73 / 0.82, T 16384 0.70 / 0.78 (one threshold for both D).
    "mhc.single_pass": {
        "cuda": {"min_t": 1024, "fn_parts": 2, "stages": 3, "partial_ring": 4, "row_ring": 6, "reduce_columns": 7,
                 "load_regs": 24, "release_regs": 24, "reduce_regs": 104, "apply_regs": 168, "gemv_regs": 88},
    },
    "mhc.post": {
        "cuda": {"max_t": 0, "block_t": 4, "block_d": 256, "split": 0, "flat_loop": 0, "num_warps": 4,
                 "num_stages": 2},
        "rocm": {"max_t": 0, "block_t": 4, "block_d": 256, "split": 0, "flat_loop": 0, "num_warps": 4,
                 "num_stages": 2},
    },
    # attention_*.py (16-bit rows; fp32 halves block_m/max_rows/block_n): decode packs a GQA group × all queries into
    # one tile, used while that tile has <= max_rows rows; the cache gets enough splits for programs_per_sm programs per
    # SM, at most `max_splits`, each dealt >= min_keys_per_split visible keys. prefill tiles block_m queries of one
    # head. Shared memory stays within sm_80's 163 KiB and gfx942's 64 KiB LDS (tests/kernels/test_triton_attention.py
    # checks).
    "attention_decode_hd64": {
        "cuda": {"block_n": 64, "num_warps": 4, "num_stages": 3, "max_rows": 64, "min_keys_per_split": 128,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 1, "prefetch_keys": 0},
        "rocm": {"block_n": 64, "num_warps": 4, "num_stages": 2, "max_rows": 64, "min_keys_per_split": 128,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 1, "prefetch_keys": 0},
    },
    "attention_decode_hd128": {
        # benchmarks/sweep_attention.py on the H100 (2026-11-21 23:10 UTC, its CUDA graphs of back-to-back calls):
        # block_n 32 and a 1-warp reduce take the steps' attention from 739 to 667 µs per verify + AR + draft
        # (36·verify + 36·AR + 5·draft), the 8192-key draft 19.6 → 20.6 µs; 2 or 4 programs per SM lost (the
        # ~1k-key draft 9.0 → 13.2 µs)
        "cuda": {"block_n": 32, "num_warps": 4, "num_stages": 3, "max_rows": 64, "min_keys_per_split": 32,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 1, "prefetch_keys": 128},
        "rocm": {"block_n": 32, "num_warps": 4, "num_stages": 2, "max_rows": 64, "min_keys_per_split": 128,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 2, "prefetch_keys": 0},
    },
    "attention_decode_hd256": {
        "cuda": {"block_n": 32, "num_warps": 8, "num_stages": 2, "max_rows": 64, "min_keys_per_split": 128,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 4, "prefetch_keys": 0},
        "rocm": {"block_n": 16, "num_warps": 8, "num_stages": 1, "max_rows": 64, "min_keys_per_split": 128,
                 "max_splits": 64, "programs_per_sm": 1, "reduce_num_warps": 4, "prefetch_keys": 0},
    },
    "attention_prefill_hd64": {
        "cuda": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3},
        "rocm": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 2},
    },
    "attention_prefill_hd128": {
        "cuda": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
        "rocm": {"block_m": 128, "block_n": 32, "num_warps": 8, "num_stages": 2},
    },
    "attention_prefill_hd256": {
        "cuda": {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2},
        "rocm": {"block_m": 64, "block_n": 16, "num_warps": 8, "num_stages": 1},
    },
    # norm_rope.py: tiles of `elems` elements (BLOCK_T tokens × head_dim, or BLOCK_M rows × BLOCK_N), about
    # `elems_per_thread` per lane, at most `max_warps` warps/wavefronts of `warp` lanes; the head epilogue shrinks
    # BLOCK_T until the grid has `min_programs` programs (≈ 4 per SM/CU: 132 on H100, 304 on MI300X) or BLOCK_T is 1.
    "norm_rope_heads": {
        "cuda": {"elems": 2048, "elems_per_thread": 8, "max_warps": 4, "warp": 32, "min_programs": 528},
        "rocm": {"elems": 4096, "elems_per_thread": 8, "max_warps": 4, "warp": 64, "min_programs": 1216},
    },
    "rms_norm_rows": {
        "cuda": {"elems": 4096, "elems_per_thread": 8, "max_warps": 8, "warp": 32},
        "rocm": {"elems": 4096, "elems_per_thread": 8, "max_warps": 8, "warp": 64},
    },
    # embedding.py: dflash.embedding_rms_norm, BLOCK_M token rows × next_pow2(H) per program (≤ `elems` elements: one
    # row per program at H 4096, so 16 tokens are 16 programs), about `elems_per_thread` per lane; untuned
    "embedding_rms_norm": {
        "cuda": {"elems": 4096, "elems_per_thread": 8, "max_warps": 8, "warp": 32},
        "rocm": {"elems": 4096, "elems_per_thread": 8, "max_warps": 8, "warp": 64},
    },
    # mlp.py: silu_mul tiles of `elems` outputs (BLOCK_M rows × BLOCK_N columns, BLOCK_N ≤ elems): 12 programs per
    # token at the Qwen3-8B width (I 12288), about `elems_per_thread` per lane
    "silu_mul": {
        "cuda": {"elems": 1024, "elems_per_thread": 8, "max_warps": 4, "warp": 32},
        "rocm": {"elems": 2048, "elems_per_thread": 8, "max_warps": 4, "warp": 64},
    },
    # rope_tables.py: dflash.rope_cos_sin, BLOCK_M positions × next_pow2(rot_dim/2) angles per program (≤ `elems`:
    # 16 positions at rot_dim 128), both tables stored per angle, about `elems_per_thread` per lane; untuned
    "rope_cos_sin": {
        "cuda": {"elems": 1024, "elems_per_thread": 4, "max_warps": 4, "warp": 32},
        "rocm": {"elems": 2048, "elems_per_thread": 4, "max_warps": 4, "warp": 64},
    },
    # qkv_gemm.py: dflash.qkv_norm_rope by token count T (first row with T <= max_t; 0 = no limit). fused 1: the
    # one-kernel GEMM + norm/rope (N tile = one head, block_m tokens × block_k of H per step, programs grouped
    # by group_m token tiles); fused 0: the vendor GEMM + norm_rope_heads epilogue (the tiles still serve
    # benchmarks that force the fused kernel). one_dot 1: one hd-wide dot split in registers (NVIDIA layouts only),
    # 0: two hd/2-wide dots. rocm tiles keep shared memory under gfx942's 64 KiB LDS.
    # cuda rows from the H100 sweep of 2026-11-21 (benchmarks/sweep_qkv_gemm.py, torch 2.11, triton 3.6; H 4096,
    # 32/8 heads, hd 128, bf16): fused 26.8 µs vs vendor GEMM + epilogue 29.5 at T 32; at T 512 61.8 vs 45.4 and at
    # T 8192 727 vs 632 (GEMM alone 540), so the fused kernel serves only T <= 32. medium/large keep the sweep's
    # best fused tiles for forced-fused runs. rocm rows: untuned, vendor GEMM + epilogue everywhere.
    # ar (T = 1: the AR step): the fused kernel with K in 2 slices (partials summed by the head's last slice).
    # decode (T <= 16: one verify/draft block): fused 0 — the skinny GEMM + the head epilogue, since programmatic
    # dependent launch (launch.py) hides the second launch. H100, the runtime's steps built both ways and timed
    # interleaved (docs/kernels/projections.md): verify −41 µs, draft −13 µs (with kv_materialize's GEMM on the
    # skinny kernel too), AR +13 µs — so T 1 keeps the fused kernel. Kernel alone, `python -m
    # torch_dflash.benchmarks.sweep_qkv_gemm --decode` (2026-11-22, weights rotating over 4 × 50 MB, µs per call,
    # before PDL): fused with 2 slices T 1 22.7, T 16 22.9 (cuBLAS alone 21.2 / 21.3); at T 32 two slices lose
    # (24.2 vs 22.8), so the small row keeps one. The decode row's tiles serve forced fused runs.
    "qkv_gemm.ar": {
        "cuda": {"max_t": 1, "fused": 1, "block_m": 16, "block_k": 128, "group_m": 4, "one_dot": 0,
                 "num_warps": 4, "num_stages": 3, "split_k": 2},
        "rocm": {"max_t": 1, "fused": 0, "block_m": 64, "block_k": 64, "group_m": 8, "one_dot": 0,
                 "num_warps": 4, "num_stages": 2, "split_k": 1},
    },
    "qkv_gemm.decode": {
        "cuda": {"max_t": 16, "fused": 0, "block_m": 16, "block_k": 128, "group_m": 4, "one_dot": 0,
                 "num_warps": 4, "num_stages": 3, "split_k": 2},
        "rocm": {"max_t": 16, "fused": 0, "block_m": 64, "block_k": 64, "group_m": 8, "one_dot": 0,
                 "num_warps": 4, "num_stages": 2, "split_k": 1},
    },
    "qkv_gemm.small": {
        "cuda": {"max_t": 32, "fused": 1, "block_m": 16, "block_k": 128, "group_m": 4, "one_dot": 0,
                 "num_warps": 4, "num_stages": 4, "split_k": 1},
        "rocm": {"max_t": 32, "fused": 0, "block_m": 64, "block_k": 64, "group_m": 8, "one_dot": 0,
                 "num_warps": 4, "num_stages": 2, "split_k": 1},
    },
    "qkv_gemm.medium": {
        "cuda": {"max_t": 2048, "fused": 0, "block_m": 128, "block_k": 64, "group_m": 4, "one_dot": 1,
                 "num_warps": 4, "num_stages": 3, "split_k": 1},
        "rocm": {"max_t": 2048, "fused": 0, "block_m": 64, "block_k": 64, "group_m": 8, "one_dot": 0,
                 "num_warps": 4, "num_stages": 2, "split_k": 1},
    },
    "qkv_gemm.large": {
        "cuda": {"max_t": 0, "fused": 0, "block_m": 256, "block_k": 64, "group_m": 8, "one_dot": 1,
                 "num_warps": 8, "num_stages": 3, "split_k": 1},  # the sweep's 4 stages exceed sm_80's shared memory
        "rocm": {"max_t": 0, "fused": 0, "block_m": 128, "block_k": 32, "group_m": 8, "one_dot": 0,
                 "num_warps": 8, "num_stages": 2, "split_k": 1},
    },
    # skinny_gemm.py: dflash.linear for M <= max_m token rows (skinny_gemm.serves, gemm_config): every weight up to
    # max_m_any_weight rows, above that only weights of >= min_weight_elems elements (H100, M 32: cuBLAS wins o
    # 4096² by 6 % and qkv 4096→6144 by 2 %; the kernel wins down 12288→4096 by 4 %). block_n: the widest power of
    # two in [min_block_n, max_block_n] giving >= `programs` N tiles; split_k: the largest power of two <= max_split
    # keeping tiles × split <= `programs` (≈ 2 per SM/CU: 132 on H100, 304 on MI300X). cuda row from the H100 sweep
    # of 2026-11-21 (benchmarks/sweep_skinny_gemm.py, torch 2.11, triton 3.6; docs/kernels/skinny_gemm.md), then
    # min_block_n 32 → 64 from the steps' interleaved A/B (2026-11-22, ab_steps: draft −43 µs, AR −43, verify +2);
    # rocm: untuned (block_n <= 64 and 2 stages for gfx942's 64 KiB LDS).
    "skinny_gemm": {
        "cuda": {"max_m": 32, "max_m_any_weight": 16, "min_weight_elems": 1 << 25, "programs": 264,
                 "min_block_n": 64, "max_block_n": 128, "block_k": 128, "max_split": 8, "num_warps": 4,
                 "num_stages": 4, "prefetch_k": 256},
        "rocm": {"max_m": 32, "max_m_any_weight": 16, "min_weight_elems": 1 << 25, "programs": 608,
                 "min_block_n": 32, "max_block_n": 64, "block_k": 128, "max_split": 8, "num_warps": 4,
                 "num_stages": 2, "prefetch_k": 0},
    },
}


def launch_config(kernel: str, family: str) -> dict[str, int]:
    try:
        return TABLE[kernel][family]
    except KeyError:
        raise KeyError(f"no launch config for kernel {kernel!r} on {family!r}; add a row to configs.TABLE") from None
