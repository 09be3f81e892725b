"""Interleaved A/B of dflash.mhc_post_pre's rows on the GPU: the table's rows (every cuda row on mhc_rows.py's path,
the last slice finishing) against session 11's rows (mhc.py's Gram design up to T 1024, mhc_rows with a finish
launch above), with the ablations that chose the new rows.

python -m torch_dflash.benchmarks.ab_mhc_finish_here [--out DIR]   (CUDA; inside the GPU session, ≈ 1 min)

Each (D, T) problem (sweep_mhc's Problem: fresh random inputs; every variant checked against the reference first)
times its variants in alternation, `--rounds` rounds of do_bench_cudagraph medians. Writes ab_mhc_finish_here.json
to --out (default $OUT or .).
"""

import argparse
import json
import os
from pathlib import Path

import torch

from torch_dflash.compiler.triton import mhc

from .sweep_mhc import Problem, _run, copy_bandwidth

_GRAM = {"apply_launch": 1, "fn_presplit": 0, "comb_launch": 1, "num_warps": 4}
SESSION11_ROWS = {  # (max_t, row) as configs.TABLE had them before session 12
    64: dict(_GRAM, block_t=16, block_d=64, split=64, apply_d=64, fn_parts=2, flat_loop=1, num_stages=1),
    1024: dict(_GRAM, block_t=16, block_d=64, split=16, apply_d=128, fn_parts=3, flat_loop=0, num_stages=2),
    0: {"block_t": 128, "block_d": 32, "split": 4, "apply_launch": 3, "apply_d": 0, "apply_rows": 1,
        "layout_barrier": 1, "fn_parts": 2, "fn_presplit": 1, "flat_loop": 0, "num_warps": 8, "num_stages": 3},
}
PROBLEMS = ((4096, 1), (4096, 16), (7168, 16), (4096, 32), (4096, 64), (4096, 128), (4096, 256), (4096, 512),
            (4096, 1024), (7168, 1024), (4096, 4096), (7168, 4096), (4096, 16384))


def session11_row(tokens: int) -> dict:
    return next(row for max_t, row in SESSION11_ROWS.items() if max_t == 0 or tokens <= max_t)


def variants(tokens: int) -> dict[str, dict]:
    """The table's row, session 11's row, and the table row's ablations: the other num_stages, half / double the
    slices, a finish launch instead of the last slice finishing (T 256–1024), no layout barrier (T 16), no L2
    eviction hints (rows with l2_hints)."""
    row = mhc.pick_config("mhc_post_pre", tokens, "cuda")
    out = {"table": row, "session 11": session11_row(tokens),
           "stages": dict(row, num_stages={1: 2, 2: 1, 3: 2}[row["num_stages"]]),
           "split / 2": dict(row, split=max(1, row["split"] // 2)), "split × 2": dict(row, split=row["split"] * 2)}
    if 256 <= tokens <= 1024:  # (above, session 11's row is the finish launch; below, its slice sums are slow)
        out["finish launch"] = dict(row, finish_here=0)
    if tokens == 16:
        out["no layout barrier"] = dict(row, layout_barrier=0)
    if row.get("l2_hints"):
        out["no l2 hints"] = dict(row, l2_hints=0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    copy_bw = copy_bandwidth()
    results = []
    for hidden, tokens in PROBLEMS:
        problem = Problem(hidden, tokens)
        floor = round(problem.floor_bytes / copy_bw * 1e6, 1)
        cases = variants(tokens)
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, cfg in cases.items():
                run = _run(problem, cfg)
                times[name].append(run.get("us", run.get("error")) if run.get("ok", True) else f"wrong: {run}")
        for name, ts in times.items():
            results.append({"D": hidden, "T": tokens, "what": name, "cfg": cases[name], "us": ts, "floor_us": floor})
            print(f"D {hidden:5} T {tokens:6} {name:<18} {ts} µs (floor {floor})", flush=True)
        del problem
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_mhc_finish_here.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": round(copy_bw / 1e9),
         "rows": results}, indent=1))


if __name__ == "__main__":
    main()
