"""Config sweep and ablations of dflash.mhc_post_pre's Triton kernels (compiler/triton/mhc.py) on the GPU.

python -m torch_dflash.benchmarks.sweep_mhc [--out DIR] [--budget-s 170]   (CUDA; inside the GPU session)

DeepSeek-V4 boundary shapes (n 4, bf16 activations, fp32 fn, Sinkhorn 20 iters) at D 4096 / 7168 × T 16, 256,
4096, 16384, fresh random inputs. Every run is first checked against the reference op (|out − ref| ≤ 2e-2 ·
max |ref| + 2e-2 · |ref| on all four outputs, after NaN-filling nothing: the launcher allocates fresh outputs)
and then timed with triton.testing.do_bench_cudagraph at every T (medians in µs; until session 9 T > 256 used
do_bench, which timed the launcher's host time where it exceeds the GPU's: 311 µs for the medium row at T 1024
against 108 µs replayed from a graph). Beside each number: the bytes floor (floor bytes / the copy
bandwidth measured in this run) and the ratio to it.

1. grid at D 4096 around the table row of each T (4 warps, num_stages 2): split (a runtime argument, no recompilation)
   × how fn reaches the tensor cores (fn_parts/fn_presplit: 3/0 = fp32 fn split into 3 bf16 parts in every program, as
   in round 1; 2/0 = 2 parts; 3/1 and 2/1 = the launcher's cached bf16 parts, no split ALU, 1.5× / 1× fn's bytes); at
   T 16 also block_d 32 with split 64/128 and loop form × stages × warps; at T 4096 phase 2 inline (apply_launch 0,
   apply_d 256) vs a second launch (1, 128) vs the finish and the apply as launches of their own (2, 128: the main
   kernel without a ticket and a finisher), × (block_t, num_warps) 16/4, 32/4, 64/8 (the fn traffic from L2 per token
   halves with each doubling of block_t) × splits 4/8/16, and mhc_rows' path (apply_launch 3: wide token tiles, a
   finish launch and a whole-row apply launch) at WIDE_TILES × splits 4/8.
   Each T gets its share of --budget-s (16: 20 %, 256: 20 %,
   4096: 35 %, 16384: 10 %, rescaled to the --tokens run); configs past it go to not_run.
2. D 7168: the table row and the best D-4096 config of each T.
3. ablations at D 4096 (best config of each T ≤ 4096): num_stages 1 (no cp.async prefetch), the other phase-1
   loop form (flat_loop 1 − best's: one flat (chunk, stream) loop vs round 1's nested loops), Sinkhorn iters 1, main
   launch alone and apply launch alone (apply_launch configs), mhc_pre (no post, no norm, no Gram), mhc_post
   (phase-1 streaming alone: no GEMV, no finish).
Prints one table (and the suggested configs rows, ready to paste into compiler/triton/configs.py), writes
sweep_mhc.json and sweep_mhc.md to --out (default $OUT or .). Written for mhc.py's Gram design (sessions 4–9): since
session 12 every cuda row is mhc_rows' (apply_launch 3, the last slice finishing), where the loop-form and
apply-mode variants above have no effect; benchmarks/ab_mhc_finish_here.py is the comparison that chose those rows.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

from torch_dflash.compiler.ops.mhc import mhc_post_pre_reference
from torch_dflash.compiler.triton import mhc
from torch_dflash.compiler.triton.configs import launch_config

from .harness import _cuda_time_ms

DEVICE = "cuda"
N, ITERS, EPS = 4, 20, 1e-6
HIDDEN = (4096, 7168)
TOKENS = (16, 256, 4096, 16384)
SPLITS = {16: (16, 32, 64), 256: (8, 16, 32), 4096: (4, 8, 16), 16384: (8, 16)}   # block_d 32 at T 16: 64, 128
FN_MODES = ((3, 0), (2, 0), (3, 1), (2, 1))           # (fn_parts, fn_presplit)
LARGE_T_MODES = ((0, 256), (1, 128), (2, 128))         # (apply_launch, apply_d)
SMALL_T_LOOPS = ((64, 1, 2, 4), (64, 0, 1, 4), (64, 0, 2, 4), (64, 1, 1, 2), (64, 1, 1, 8), (32, 1, 1, 2),
                 (32, 0, 2, 4))                          # (block_d, flat_loop, num_stages, num_warps) at T 16
LARGE_T_TILES = ((16, 4), (32, 4), (64, 8))            # (block_t, num_warps)
WIDE_TILES = ((128, 32, 8, 4), (128, 32, 8, 3), (64, 32, 8, 3), (32, 32, 4, 2))  # apply_launch 3: (block_t, block_d,
#                                                                                   num_warps, num_stages)
SHARE = {16: 0.2, 256: 0.2, 4096: 0.35, 16384: 0.1}    # of --budget-s, cumulative deadlines; D 7168 gets the rest
KEYS = ("block_t", "block_d", "split", "apply_launch", "apply_d", "apply_rows", "layout_barrier", "l2_hints",
        "comb_launch", "fn_parts", "fn_presplit", "flat_loop", "num_warps", "num_stages")


class Problem:
    """One (D, T): inputs at the benchmark's magnitudes, the reference outputs, the floor in bytes."""

    def __init__(self, hidden: int, tokens: int):
        g = torch.Generator(DEVICE).manual_seed(tokens * 7 + hidden)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=DEVICE)

        self.hidden, self.tokens = hidden, tokens
        x, res = rand(tokens, hidden).bfloat16(), rand(tokens, N, hidden).bfloat16()
        post, comb = 2 * torch.sigmoid(rand(tokens, N)), torch.softmax(rand(tokens, N, N), -1)
        fn, base = rand((2 + N) * N, N * hidden) * 0.02, rand((2 + N) * N) * 0.1
        scale, norm_w = 0.5 + torch.rand(3, generator=g, device=DEVICE), (1 + 0.1 * rand(hidden)).bfloat16()
        self.args = (x, res, post, comb, fn, base, scale, norm_w, EPS, EPS, ITERS, EPS)
        self.refs = mhc_post_pre_reference(*self.args)
        mixes = (2 + N) * N
        self.floor_bytes = (tokens * hidden * 2 * 2 + tokens * N * hidden * 2 * 2 + tokens * (N + N * N) * 4 * 2
                            + (mixes * N * hidden + mixes + 3) * 4 + hidden * 2)

    def error(self, outs) -> float:
        """max over the outputs of max(|out − ref| / (2e-2 · max|ref| + 2e-2 · |ref|)): ≤ 1 passes."""
        return max(((o.float() - r.float()).abs() / (2e-2 * r.float().abs().max() + 2e-2 * r.float().abs()))
                   .max().item() for o, r in zip(outs, self.refs))

    def time_us(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), the floors' bandwidth."""
    src = torch.randn(2 ** 28, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (statistics.median(_cuda_time_ms(lambda: dst.copy_(src), 20)) * 1e-3)


def _run(problem: Problem, cfg: dict, op="mhc_post_pre", iters=ITERS, launches=("main", "apply")) -> dict:
    x, res, post, comb, fn, base, scale, norm_w, *_ = problem.args
    if op == "mhc_post_pre":
        call = lambda: mhc._launch(op, res, x, post, comb, fn, base, scale, norm_w, EPS, EPS, iters, EPS,  # noqa
                                   config=cfg, launches=launches)
    elif op == "mhc_pre":
        call = lambda: mhc._launch(op, res, fn=fn, base=base, scale=scale, rms_eps=EPS, hc_eps=EPS,  # noqa
                                   iters=iters, config=cfg)
    else:
        call = lambda: mhc._launch(op, res, x, post, comb, config=cfg)  # noqa: E731
    try:
        row = {}
        if op == "mhc_post_pre" and iters == ITERS and len(launches) == 2:
            row["err"] = round(problem.error(call()), 3)
            row["ok"] = row["err"] <= 1
        row["us"] = round(problem.time_us(call), 1)
        return row
    except Exception as error:  # noqa: BLE001 — e.g. a config that cannot compile: reported, the sweep goes on
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def _grid(tokens: int, rows: list[dict]) -> list[dict]:
    """T 16: the table row × fn modes × splits, block_d 32 (splits up to 128) with fn 3/0 and 2/1, and the loop
    forms × stages × warps of SMALL_T_LOOPS with fn 2/0 at splits 64 / 128. T 256: the
    table row × fn modes × splits. T 4096: phase-2 mode × block_t × fn 3/0 and 2/1 × splits. T 16384: the best
    T-4096 config × fn modes × splits. Splits beyond D 4096's chunk count are left out."""
    base = dict(mhc.pick_config("mhc_post_pre", tokens, "cuda"), max_t=0)
    grid = [(base, FN_MODES, SPLITS[tokens])]
    if tokens == 16:
        grid.append((dict(base, block_d=32), FN_MODES[::3], (64, 128)))
        grid += [(dict(base, block_d=bd, flat_loop=flat, num_stages=stages, num_warps=warps), FN_MODES[1:2],
                  (64, 128)) for bd, flat, stages, warps in SMALL_T_LOOPS]
    elif tokens == 4096:
        grid = [(dict(base, block_t=bt, block_d=64, apply_launch=al, apply_d=ad, num_warps=w, num_stages=2),
                  FN_MODES[::3], SPLITS[tokens]) for bt, w in LARGE_T_TILES for al, ad in LARGE_T_MODES]
        grid += [(dict(base, block_t=bt, block_d=bd, apply_launch=3, num_warps=w, num_stages=st), FN_MODES[3:],
                  (4, 8)) for bt, bd, w, st in WIDE_TILES]
    elif tokens > 4096:
        grid = [(_best(rows, HIDDEN[0], 4096) or base, FN_MODES, SPLITS[tokens])]
    return [dict(shape, split=sp, fn_parts=fp, fn_presplit=pre)
            for shape, fn_modes, splits in grid for fp, pre in fn_modes for sp in splits
            if sp <= HIDDEN[0] // shape["block_d"]]


def _best(rows: list[dict], hidden: int, tokens: int) -> dict | None:
    timed = [r for r in rows if r["D"] == hidden and r["T"] == tokens and r.get("ok")
             and r["what"] in ("grid", "num_stages 1", "other loop")]
    return min(timed, key=lambda r: r["us"])["cfg"] if timed else None


def _line(r: dict) -> str:
    cfg = "/".join(str(r["cfg"].get(k, "-")) for k in KEYS)
    if "error" in r:
        return f"{r['D']:5} {r['T']:6} {r['what']:<14} {cfg:<30} {r['error']}"
    err = f"{r['err']:.2f}" if "err" in r else "-"
    return (f"{r['D']:5} {r['T']:6} {r['what']:<14} {cfg:<30} {r['us']:9.1f} µs {r['us'] / r['floor_us']:6.2f}× floor"
            f" (floor {r['floor_us']:.1f})  err/tol {err}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, choices=TOKENS,
                        help="token counts to run (their budget shares are scaled to fill --budget-s)")
    opts = parser.parse_args()
    tokens_run = [t for t in TOKENS if t in opts.tokens]
    shares = {t: SHARE[t] / sum(SHARE[u] for u in tokens_run) * 0.9 for t in tokens_run}
    start = time.perf_counter()
    copy_bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": round(copy_bw / 1e9),
              "keys": KEYS, "rows": [], "not_run": []}
    rows = result["rows"]

    def record(problem, what, cfg, **kw):
        row = {"D": problem.hidden, "T": problem.tokens, "what": what, "cfg": cfg,
               "floor_us": round(problem.floor_bytes / copy_bw * 1e6, 1), **_run(problem, cfg, **kw)}
        rows.append(row)
        print(_line(row), flush=True)

    share = 0.0
    for hidden in HIDDEN:
        for tokens in tokens_run:
            problem = Problem(hidden, tokens)
            record(problem, "table", mhc.pick_config("mhc_post_pre", tokens, "cuda"))
            if hidden == HIDDEN[0]:
                share += shares[tokens]
                for cfg in _grid(tokens, rows):
                    if time.perf_counter() - start > share * opts.budget_s:
                        result["not_run"].append({"T": tokens, **cfg})
                        continue
                    record(problem, "grid", cfg)
            best = _best(rows, HIDDEN[0], tokens)
            if best is None:
                continue
            if hidden != HIDDEN[0]:
                record(problem, "best of 4096", best)
            elif tokens <= 4096 and time.perf_counter() - start <= opts.budget_s:
                record(problem, "num_stages 1", dict(best, num_stages=1))
                record(problem, "other loop", dict(best, flat_loop=1 - best["flat_loop"]))
                record(problem, "iters 1", best, iters=1)
                if best["apply_launch"]:
                    record(problem, "main only", best, launches=("main",))
                    record(problem, "apply only", best, launches=("apply",))
                record(problem, "mhc_pre", best, op="mhc_pre")
                record(problem, "mhc_post", launch_config("mhc.post", "cuda"), op="mhc_post")
            del problem
            torch.cuda.empty_cache()
    result["best"] = {t: _best(rows, HIDDEN[0], t) for t in TOKENS}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = "\n".join([f"{result['device']}, torch {result['torch']}, copy {result['copy_GBps']} GB/s; config = "
                      + "/".join(KEYS), *map(_line, rows), "", _suggested_rows(result["best"])])
    print(text)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_mhc.json").write_text(json.dumps(result, indent=1))
    (out / "sweep_mhc.md").write_text("```\n" + text + "\n```\n")


def _suggested_rows(best: dict) -> str:
    """The cuda rows for configs.TABLE from the best D-4096 configs: small = T 16, medium = T 256, large = the
    better of T 4096's and T 16384's (by T 4096)."""
    lines = ["suggested cuda rows (compiler/triton/configs.py):"]
    for bucket, tokens, max_t in (("mhc.small", 16, 64), ("mhc.medium", 256, 1024), ("mhc.large", 4096, 0)):
        cfg = best.get(tokens) or best.get(16384)
        if cfg:
            row = {"max_t": max_t, **{k: cfg.get(k, 0) for k in KEYS}}
            lines.append(f'    "{bucket}": "cuda": {json.dumps(row)}')
    return "\n".join(lines)


if __name__ == "__main__":
    main()
