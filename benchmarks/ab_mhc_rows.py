"""Interleaved A/B of dflash.mhc_post_pre's many-token paths on the GPU: the mhc.large row (mhc_rows.py: wide token
tiles, a finish launch, a whole-row norm launch) against session 4's row (16-token blocks, Gram statistic, finish and
apply launches), with the row's ablations.

python -m torch_dflash.benchmarks.ab_mhc_rows [--out DIR]   (CUDA; inside the GPU session, < 1 min)

D 4096 T 4096 / 16384 and D 7168 T 4096, each variant twice in alternation, do_bench_cudagraph medians (sweep_mhc's
Problem: fresh random inputs, every run checked against the reference first). At D 4096 T 4096 also: phase 1 + the
finish alone, the rows launch alone, the row without its layout barrier, mhc_pre on both rows, mhc_post. Writes
ab_mhc_rows.json to --out (default $OUT or .).
"""

import argparse
import json
import os
from pathlib import Path

import torch

from torch_dflash.compiler.triton import mhc
from torch_dflash.compiler.triton.configs import launch_config

from .sweep_mhc import Problem, _run, copy_bandwidth

SESSION4_ROW = {"max_t": 0, "block_t": 16, "block_d": 64, "split": 8, "apply_launch": 2, "apply_d": 128,
                "fn_parts": 2, "fn_presplit": 1, "flat_loop": 0, "num_warps": 4, "num_stages": 2}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    out = Path(parser.parse_args().out)
    copy_bw = copy_bandwidth()
    rows = []
    row = launch_config("mhc.large", "cuda")

    def record(problem, what, cfg, **kw):
        result = {"D": problem.hidden, "T": problem.tokens, "what": what, "cfg": cfg,
                  "floor_us": round(problem.floor_bytes / copy_bw * 1e6, 1), **_run(problem, cfg, **kw)}
        rows.append(result)
        print(f"D {result['D']:5} T {result['T']:6} {what:<24} {result.get('us', result.get('error'))} µs "
              f"(floor {result['floor_us']})", flush=True)

    for hidden, tokens in ((4096, 4096), (4096, 16384), (7168, 4096)):
        problem = Problem(hidden, tokens)
        for _ in range(2):
            record(problem, "mhc.large row", row)
            record(problem, "session-4 row", SESSION4_ROW)
        if (hidden, tokens) == (4096, 4096):
            record(problem, "phase 1 + finish", row, launches=("main",))
            record(problem, "rows launch", row, launches=("apply",))
            record(problem, "no layout barrier", dict(row, layout_barrier=0))
            record(problem, "mhc_pre", row, op="mhc_pre")
            record(problem, "mhc_pre session-4 row", SESSION4_ROW, op="mhc_pre")
            record(problem, "mhc_post", mhc.launch_config("mhc.post", "cuda"), op="mhc_post")
        del problem
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_mhc_rows.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": round(copy_bw / 1e9),
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
