"""Launch-config sweep of the head norm+rope epilogue (qkv_norm_rope) on the GPU: prints µs per config.

python -m torch_dflash.benchmarks.sweep_epilogue   (CUDA only; run inside the GPU session)
"""

import statistics

import torch

from torch_dflash.compiler.triton import configs
from torch_dflash.compiler.triton.norm_rope import launch_norm_rope_heads

from .harness import _cuda_time_ms, _graphed


def main():
    hidden, n_q, n_kv, hd = 4096, 32, 8, 128
    base = dict(configs.TABLE["norm_rope_heads"]["cuda"])
    for tokens in (512, 8192):
        proj = torch.randn(tokens, (n_q + 2 * n_kv) * hd, device="cuda", dtype=torch.bfloat16)
        cos, sin = (torch.randn(1, tokens, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qn, kn = (torch.rand(hd, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
        q = torch.empty(1, tokens, n_q, hd, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.empty(1, 1, tokens, n_kv, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        floor_us = 2 * proj.numel() * 2 / 3.0e12 * 1e6
        for elems in (1024, 2048, 4096, 8192):
            for max_warps in (2, 4, 8):
                for ept in (4, 8, 16):
                    configs.TABLE["norm_rope_heads"]["cuda"] = {**base, "elems": elems, "max_warps": max_warps,
                                                                "elems_per_thread": ept}
                    run = lambda: launch_norm_rope_heads(proj, cos, sin, qn, kn, 1e-6, n_q, n_kv, hd, q,  # noqa: E731
                                                         (k, v))
                    run()
                    us = statistics.median(_cuda_time_ms(_graphed(run), 50)) * 1e3
                    print(f"T={tokens} elems={elems} max_warps={max_warps} ept={ept}: {us:.1f} µs "
                          f"(bytes floor {floor_us:.1f} µs)", flush=True)
    configs.TABLE["norm_rope_heads"]["cuda"] = base


if __name__ == "__main__":
    main()
