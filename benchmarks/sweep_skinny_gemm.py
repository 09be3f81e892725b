"""Weight-bandwidth efficiency of decode-sized GEMMs (M = 1, 16, 32 rows) at the Qwen3-8B shapes, on the GPU.

python -m torch_dflash.benchmarks.sweep_skinny_gemm [--out DIR] [--budget-s 150]   (CUDA; inside the GPU session)

Shapes (bf16, y = x @ wᵀ, w [N, K]): qkv 4096 → 6144, o 4096 → 4096, gate_up 4096 → 24576 (gate and up merged,
what merge_sibling_projections emits) beside gate, up as two 4096 → 12288 GEMMs, down 12288 → 4096, lm_head
4096 → 151936. Variants: torch.mm(x, w.t()) (cuBLAS, what torch picks), F.linear, the split-K Triton kernel
(compiler/triton/skinny_gemm.py) over a small config grid (the best is reported), and Inductor's max-autotune GEMM
(mode="max-autotune-no-cudagraphs" on a one-GEMM function) while the wall-time budget lasts. Every variant is
checked against the fp32 product first (max error ≤ 1e-2 · max |ref|) and timed with
triton.testing.do_bench_cudagraph (median). Each timed call cycles through enough copies of w to span 3× the L2
cache, so the weight comes from HBM as in a real step. Achieved GB/s counts w + x + y bytes; the ratio is to the
device-to-device copy bandwidth (read + write) measured in the same run. Prints a table; writes
sweep_skinny_gemm.json and .md to --out (default $OUT or .).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from torch_dflash.compiler.triton import skinny_gemm as sg

from .harness import measure_ceilings

DEVICE, DTYPE = "cuda", torch.bfloat16
ROWS = (16, 1, 32)                                                         # 16 (the draft) first
SHAPES = {"qkv": (4096, 4096 + 2 * 1024), "o": (4096, 4096), "gate_up": (4096, 2 * 12288), "down": (12288, 4096),
          "lm_head": (4096, 151936)}                                       # name -> (K, N)
GRID = [dict(block_n=bn, block_k=bk, split_k=s, num_warps=4, num_stages=4)
        for bn in (32, 64, 128) for bk in (128, 256) for s in (1, 2, 4, 8)]
MIN_PROGRAMS = 132                                                         # H100 SMs: fewer leaves SMs idle
SMEM_BYTES = 227 * 1024                                                    # H100 shared memory per block
TOLERANCE = 1e-2


def _bench_us(fn) -> float:
    """Median µs per call of fn under a CUDA graph. fn runs once on torch.cuda.graph's capture stream first, so
    per-stream state (the Triton kernel's arrival tickets) is allocated outside the capture."""
    torch.cuda.graph(torch.cuda.CUDAGraph())          # creates torch.cuda.graph.default_capture_stream
    with torch.cuda.stream(torch.cuda.graph.default_capture_stream):
        fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3


class Problem:
    """x [m, K] and `copies` random weights [N, K] (never zeros) spanning 3× L2; the fp32 reference of copy 0."""

    def __init__(self, m: int, k: int, n: int, l2_bytes: int):
        g = torch.Generator(DEVICE).manual_seed(m * 7 + n)
        self.m, self.k, self.n = m, k, n
        self.x = torch.randn(m, k, generator=g, device=DEVICE).to(DTYPE)
        self.copies = max(1, math.ceil(3 * l2_bytes / (n * k * 2)))
        self.ws = [(torch.randn(n, k, generator=g, device=DEVICE) * k ** -0.5).to(DTYPE) for _ in range(self.copies)]
        self.ref = self.x.float() @ self.ws[0].float().t()
        self.bytes = (n * k + m * k + m * n) * 2

    def error(self, y: torch.Tensor | tuple) -> float:
        y = torch.cat(y, dim=1) if isinstance(y, tuple) else y
        return ((y.float() - self.ref).abs().max() / self.ref.abs().max()).item()

    def timed(self, gemm) -> dict:
        """gemm(x, w) → y: checked on copy 0, then timed cycling through the copies; µs per GEMM."""
        err = self.error(gemm(self.x, self.ws[0]))
        if not err <= TOLERANCE:
            return {"rel_err": err, "ok": False}
        us = _bench_us(lambda: [gemm(self.x, w) for w in self.ws]) / self.copies
        return {"us": round(us, 2), "rel_err": err, "ok": True}


def _twice(x, w):
    """gate and up as two GEMMs over the two row halves of the merged weight (what the graph had before)."""
    half = w.shape[0] // 2
    return torch.mm(x, w[:half].t()), torch.mm(x, w[half:].t())


def _grid(p: Problem) -> list[dict]:
    """Configs that keep ≥ MIN_PROGRAMS programs busy (or split 1 when N alone does) with ≥ 2 K steps a slice,
    whose stages of w and x tiles fit shared memory (sm_90: stages × (BLOCK_N + BLOCK_M) × BLOCK_K × 2 bytes)."""
    keep = []
    block_m = sg.plan(p.m, p.n, p.k, GRID[0])["BLOCK_M"]
    for cfg in GRID:
        if cfg["num_stages"] * (cfg["block_n"] + block_m) * cfg["block_k"] * 2 > SMEM_BYTES:
            continue
        tiles = triton.cdiv(p.n, cfg["block_n"])
        if tiles >= MIN_PROGRAMS and cfg["split_k"] > 1:
            continue
        if tiles * cfg["split_k"] < MIN_PROGRAMS or p.k // cfg["split_k"] < 2 * cfg["block_k"]:
            continue
        keep.append(cfg)
    return keep


def _triton(p: Problem, deadline: float) -> dict:
    runs, skipped = [], []
    for cfg in _grid(p):
        if time.perf_counter() > deadline:
            skipped.append(cfg)
            continue
        try:
            runs.append({**cfg, **p.timed(lambda x, w, c=cfg: sg.skinny_gemm(x, w, c))})
        except Exception as error:  # noqa: BLE001 — e.g. out of shared memory: reported, the sweep goes on
            runs.append({**cfg, "error": f"{type(error).__name__}: {error}"[:200]})
    ok = [r for r in runs if r.get("ok")]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    return {"best": best, "configs": runs, "not_run": skipped}


def _inductor(p: Problem) -> dict:
    torch._dynamo.reset()    # a fresh compile per shape (the recompile limit would fall back to eager)
    compiled = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
    start = time.perf_counter()
    result = p.timed(compiled)
    return {**result, "compile_and_time_s": round(time.perf_counter() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=150.0)
    opts = parser.parse_args()
    start = time.perf_counter()
    ceilings = measure_ceilings(DEVICE)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_GBps": round(ceilings.copy_bytes_per_s / 1e9, 1), "l2_bytes": l2, "rows": [], "inductor_not_run": []}
    problems = []
    for m in ROWS:
        for name, (k, n) in SHAPES.items():
            p = Problem(m, k, n, l2)
            row = {"shape": name, "M": m, "K": k, "N": n, "copies": p.copies, "bytes": p.bytes,
                   "floor_us": round(p.bytes / ceilings.copy_bytes_per_s * 1e6, 2),
                   "mm": p.timed(lambda x, w: torch.mm(x, w.t())), "linear": p.timed(F.linear)}
            if name == "gate_up":
                row["mm_twice"] = p.timed(_twice)
            row["triton"] = _triton(p, start + 0.6 * opts.budget_s)
            result["rows"].append(row)
            problems.append((p, row))
            print(_line(row, ceilings.copy_bytes_per_s), flush=True)
            del p.ws
    for p, row in problems:
        if time.perf_counter() - start > opts.budget_s:
            result["inductor_not_run"].append(f"{row['shape']} M={row['M']}")
            continue
        p.ws = [(torch.randn(p.n, p.k, device=DEVICE) * p.k ** -0.5).to(DTYPE) for _ in range(p.copies)]
        p.ref = p.x.float() @ p.ws[0].float().t()
        try:
            row["inductor"] = _inductor(p)
        except Exception as error:  # noqa: BLE001 — reported in the table
            row["inductor"] = {"error": f"{type(error).__name__}: {error}"[:200]}
        del p.ws
    result["wall_s"] = round(time.perf_counter() - start, 1)
    table = _table(result, ceilings.copy_bytes_per_s)
    print(table)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_skinny_gemm.json").write_text(json.dumps(result, indent=1))
    (out / "sweep_skinny_gemm.md").write_text(table + "\n")


def _cell(timing: dict | None, nbytes: int, copy_bps: float) -> str:
    if not timing:
        return "—"
    if "error" in timing:
        return "error"
    if not timing.get("ok"):
        return f"WRONG ({timing['rel_err']:.1e})"
    return f"{timing['us']:.1f} ({nbytes / (timing['us'] * 1e-6) / copy_bps:.0%})"


def _line(row: dict, copy_bps: float) -> str:
    best = row["triton"]["best"]
    return (f"{row['shape']} M={row['M']}: mm {_cell(row['mm'], row['bytes'], copy_bps)}, triton "
            f"{_cell(best, row['bytes'], copy_bps)}")


def _table(result: dict, copy_bps: float) -> str:
    lines = [f"sweep_skinny_gemm — {result['device']}, torch {result['torch']}, triton {result['triton']}; copy "
             f"bandwidth {result['copy_GBps']} GB/s (read + write); {result['wall_s']} s", "",
             "µs per GEMM (achieved GB/s of w + x + y as a share of copy bandwidth)", "",
             "| shape | M | K → N | floor µs | torch.mm | F.linear | mm twice (gate, up) | triton best | inductor "
             "max-autotune | triton config (bn, bk, split, warps, stages) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        best = row["triton"]["best"]
        cfg = "—" if best is None else ", ".join(str(best[k]) for k in
                                                 ("block_n", "block_k", "split_k", "num_warps", "num_stages"))
        cells = [_cell(row.get(v), row["bytes"], copy_bps) for v in ("mm", "linear", "mm_twice")]
        lines.append(f"| {row['shape']} | {row['M']} | {row['K']} → {row['N']} | {row['floor_us']:.1f} | "
                     + " | ".join(cells) + f" | {_cell(best, row['bytes'], copy_bps)} | "
                     f"{_cell(row.get('inductor'), row['bytes'], copy_bps)} | {cfg} |")
    if result["inductor_not_run"]:
        lines += ["", f"inductor not run (budget): {', '.join(result['inductor_not_run'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
