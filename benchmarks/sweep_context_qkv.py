"""One draft layer's projections at the e2e shape, two cache-writing ops vs context_qkv_norm_rope_cache (GPU).

python -m torch_dflash.benchmarks.sweep_context_qkv [--out DIR]   (CUDA; ≈ 30 s)

The Qwen3-8B draft's layer (H 4096, 32/8 heads, hd 128, bf16) with a 16-row context in front of a 16-row block,
as the runtime's draft step has it: kv_materialize_cache + qkv_norm_rope_cache with their own weight copies (session
7's steps) and with w_kv a view of w_qkv (pass kv_materialize since session 8, without context_qkv: the second read
of the k|v rows can hit L2) against context_qkv_norm_rope_cache (after), then the GEMMs alone — the block's and the context's at 16 rows, the joined
32 rows, the same 32 rows as one tensor (plain kernel, cuBLAS) and both at other block_n / split_k — and the
epilogue with context rows in front. triton.testing.do_bench_cudagraph (median) over calls that cycle through 6
copies of the weight (300 MB), so each streams it from HBM as in a step. Writes sweep_context_qkv.json to --out
(default $OUT or .). Results: docs/kernels/projections.md.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from torch_dflash.compiler.triton import context_qkv, kv_materialize, qkv_norm_rope
from torch_dflash.compiler.triton import skinny_gemm as sg
from torch_dflash.compiler.triton.norm_rope import launch_norm_rope_heads

from .harness import command_line, environment

H, N_Q, N_KV, HD, CTX, BLOCK, SLOTS, COPIES, EPS = 4096, 32, 8, 128, 16, 16, 2048, 6, 1e-6
KV_ROWS = N_Q * HD


def cases() -> dict:
    """name -> a call with a fresh weight copy each time."""
    dev, dt = "cuda", torch.bfloat16
    weights = [torch.randn((N_Q + 2 * N_KV) * HD, H, device=dev, dtype=dt) * 0.02 for _ in range(COPIES)]
    turn = iter(range(1 << 62))

    def w():
        return weights[next(turn) % COPIES]

    ctx, x = torch.randn(1, CTX, H, device=dev, dtype=dt), torch.randn(1, BLOCK, H, device=dev, dtype=dt)
    joined_rows = torch.cat([ctx, x], 1)[0].contiguous()
    norm = torch.ones(HD, device=dev, dtype=dt)
    angles = torch.rand(1, CTX + BLOCK, HD // 2, device=dev) * 3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dt) for f in (torch.cos, torch.sin))
    positions = (1000 + torch.arange(CTX + BLOCK, device=dev))[None]
    k_cache, v_cache = (torch.zeros(2, N_KV, SLOTS, HD, device=dev, dtype=dt) for _ in range(2))
    caches = (k_cache, v_cache)
    proj = torch.randn(CTX + BLOCK, (N_Q + 2 * N_KV) * HD, device=dev, dtype=dt)
    q = torch.empty(1, BLOCK, N_Q, HD, device=dev, dtype=dt)

    def two_ops(w_kv, w_qkv):
        kv_materialize.kv_materialize_cache(ctx, w_kv, None, norm, EPS, cos[:, :CTX], sin[:, :CTX], N_KV, HD,
                                            *caches, positions[:, :CTX])
        qkv_norm_rope.qkv_norm_rope_cache(x, w_qkv, None, norm, norm, EPS, cos[:, CTX:], sin[:, CTX:], N_Q, N_KV, HD,
                                          *caches, positions[:, CTX:])

    def one_copy():
        weight = w()
        two_ops(weight[KV_ROWS:], weight)

    found = {
        "kv_materialize_cache + qkv_norm_rope_cache": lambda: two_ops(w()[KV_ROWS:], w()),
        "the same, w_kv a view of w_qkv (re-read from L2)": one_copy,
        "context_qkv_norm_rope_cache": lambda: context_qkv.context_qkv_norm_rope_cache(
            ctx, x, w(), None, norm, norm, EPS, cos, sin, N_Q, N_KV, HD, *caches, positions),
        "gemm block 16 rows": lambda: sg.skinny_gemm(x[0], w()),
        "gemm context k|v 16 rows": lambda: sg.skinny_gemm(ctx[0], w()[KV_ROWS:]),
        "gemm joined 32 rows": lambda: sg.skinny_gemm_joined(ctx, x, w()),
        "gemm plain 32 rows": lambda: sg.skinny_gemm(joined_rows, w()),
        "cuBLAS 32 rows": lambda: torch.nn.functional.linear(joined_rows, w()),
        "epilogue, 16 context rows in front": lambda: launch_norm_rope_heads(
            proj, cos, sin, norm, norm, EPS, N_Q, N_KV, HD, q,
            (k_cache[None, :1].transpose(2, 3), v_cache[None, :1].transpose(2, 3)), positions, front=CTX),
    }
    for block_n, split in ((32, 2), (64, 1), (64, 2), (128, 1), (128, 2)):
        config = {"block_n": block_n, "split_k": split}
        found[f"gemm joined 32 rows, block_n {block_n} split {split}"] = \
            lambda config=config: sg.skinny_gemm_joined(ctx, x, w(), config=config)
        found[f"gemm plain 32 rows, block_n {block_n} split {split}"] = \
            lambda config=config: sg.skinny_gemm(joined_rows, w(), config=config)
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    result = {"env": environment("cuda"), "command": command_line("sweep_context_qkv", argv), "us": {}}
    for name, call in cases().items():
        call()

        def copies(call=call):
            for _ in range(COPIES):
                call()
        result["us"][name] = do_bench_cudagraph(copies, rep=200) * 1000 / COPIES
        print(f"{name:52s} {result['us'][name]:7.2f} µs", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sweep_context_qkv.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
