"""Where the sm_90 single-pass provider of dflash.mhc_post_pre beats the Triton provider: configs "mhc.single_pass"
min_t.

python -m torch_dflash.benchmarks.crossover_mhc_single_pass [--out DIR] [--shapes D:T,D:T,...]   (H100, ≈ 1 min)

D 4096 and 7168 × T 256 … 16384, both providers in the same process on the same inputs (sweep_mhc's Problem: every
output checked against the reference first, error ≤ 1 passes), do_bench_cudagraph medians, the floor from the
measured copy bandwidth. Writes crossover_mhc_single_pass.json to --out (default $OUT or .).
"""

import argparse
import json
import os
from pathlib import Path

import torch
import triton

from torch_dflash.compiler.triton import mhc_single_pass

from .sweep_mhc import Problem, _run, copy_bandwidth

SHAPES = [(d, t) for d in (4096, 7168) for t in (256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)]


def measure(problem: Problem, floor_us: float) -> dict:
    """Both providers at one shape: errors, whether repeats are bitwise equal, times and their ratio."""
    row = {"D": problem.hidden, "T": problem.tokens, "floor_us": round(floor_us, 1)}
    triton = _run(problem, None)
    row.update(triton_err=triton.get("err"), triton_us=triton.get("us"), triton_error=triton.get("error"))

    def single_pass():
        return mhc_single_pass.mhc_post_pre(*problem.args)

    outs = single_pass()
    row["single_pass_err"] = round(problem.error(outs), 3)
    row["single_pass_repeats_bitwise"] = all(torch.equal(a, b) for a, b in zip(outs, single_pass()))
    row["single_pass_us"] = round(problem.time_us(single_pass), 1)
    if row["triton_us"]:
        row["single_pass_over_triton"] = round(row["single_pass_us"] / row["triton_us"], 3)
        row["triton_x_floor"] = round(row["triton_us"] / floor_us, 2)
    row["single_pass_x_floor"] = round(row["single_pass_us"] / floor_us, 2)
    return {k: v for k, v in row.items() if v is not None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="", help="D:T pairs, comma-separated (default: the full grid)")
    args = parser.parse_args()
    shapes = [tuple(map(int, pair.split(":"))) for pair in args.shapes.split(",") if pair] or SHAPES
    copy_bw = copy_bandwidth()
    rows = []
    for hidden, tokens in shapes:
        problem = Problem(hidden, tokens)
        rows.append(measure(problem, problem.floor_bytes / copy_bw * 1e6))
        print(rows[-1], flush=True)
        del problem
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossover_mhc_single_pass.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "triton": triton.__version__, "copy_GBps": round(copy_bw / 1e9),
         "min_t": mhc_single_pass.launch_config("mhc.single_pass", "cuda")["min_t"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
