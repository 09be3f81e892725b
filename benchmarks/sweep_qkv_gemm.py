"""Config sweep of the fused qkv GEMM + norm + rope kernel (compiler/triton/qkv_gemm.py) on the GPU.

python -m torch_dflash.benchmarks.sweep_qkv_gemm [--out DIR] [--budget-s 150]   (CUDA; inside the GPU session)
python -m torch_dflash.benchmarks.sweep_qkv_gemm --decode [--out DIR] [--budget-s 150]

--decode: the step token counts T = 1, 16, 32 (AR, a verify or draft block, two blocks) of the qkv_gemm.decode
and .small rows — split_k × block_k × num_stages × one_dot (block_m 16, group_m 4, 4 warps) — with the weight
rotating over WEIGHT_COPIES
copies (4 × 50 MB > 2 × L2), 20 calls per CUDA graph, µs per call, beside F.linear alone and dflash.linear's
skinny GEMM on the same rotation; writes sweep_qkv_gemm_decode.{json,md}.

At the Qwen3-8B draft shape (H 4096, 32/8 heads, hd 128, bf16) for T = 32, 512, 8192: every (block_m, block_k,
num_warps, num_stages) of a pruned grid (group_m 8, two half-head dots; then, for the best at each T, one
head-wide dot split in registers (one_dot), and group_m 4 and 16) is checked
against the reference op (max error ≤ 2e-2 · max |ref|) and timed (CUDA-graph replays, median of 50), beside the
GEMM alone (F.linear), the vendor GEMM + epilogue path, the table's choice ('dflash') and Inductor on transformers'
Qwen3 prologue. Prints a table and writes sweep_qkv_gemm.json to --out (default $OUT or .). Configs compile once
and serve all three T (T is a runtime argument); configs whose shared memory cannot fit are skipped, and the
grid stops at 70 % of --budget-s of wall time, the variations at 100 % (the JSON lists what was not run).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_dflash.compiler.ops import qkv_norm_rope_reference
from torch_dflash.compiler.triton import configs, qkv_gemm
from torch_dflash.compiler.triton.qkv_norm_rope import qkv_norm_rope

from .harness import _cuda_time_ms, _graphed
from .kernels_projections import EPS, QWEN3_8B_DRAFT, _rope_tables, hf_qkv_norm_rope

DEVICE = "cuda"
SMEM_BYTES = 220 * 1024          # H100: 227 KiB per block, minus the epilogue's scratch
TOKENS = (32, 512, 8192)
LARGE_GRID = [(bm, bk, warps, stages) for bm in (64, 128, 256) for bk in (64, 128) for warps in (4, 8)
              for stages in (3, 4) if not (bm == 256 and warps == 4)]
CONFIG_KEYS = ("block_m", "block_k", "group_m", "one_dot", "num_warps", "num_stages")
SMALL_GRID = [(bm, bk, 4, 4) for bm in (16, 32) for bk in (64, 128, 256)]


def _fits(block_m: int, block_k: int, stages: int, head_dim: int) -> bool:
    return stages * (block_m + head_dim) * block_k * 2 <= SMEM_BYTES


def _median_us(fn) -> float:
    return statistics.median(_cuda_time_ms(_graphed(fn), 50)) * 1e3


class Problem:
    """Inputs of one T (fresh random bf16, never zeros), the reference outputs and preallocated outputs."""

    def __init__(self, tokens: int, hidden: int, n_q: int, n_kv: int, head_dim: int):
        g = torch.Generator(DEVICE).manual_seed(tokens)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(torch.bfloat16)

        self.x = rand(1, tokens, hidden)
        self.w = rand((n_q + 2 * n_kv) * head_dim, hidden, scale=hidden ** -0.5)
        q_norm, k_norm = rand(head_dim, scale=0.1) + 1, rand(head_dim, scale=0.1) + 1
        cos, sin = _rope_tables(tokens, head_dim, DEVICE, torch.bfloat16)
        self.args = (self.x, self.w, None, q_norm, k_norm, EPS, cos, sin, n_q, n_kv, head_dim)
        wq, wk, wv = self.w.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim])
        self.hf_args = (self.x, wq, wk, wv, q_norm, k_norm, cos, sin, EPS, head_dim)
        self.refs = qkv_norm_rope_reference(*self.args)
        self.out = tuple(torch.empty_like(r) for r in self.refs)

    def error(self) -> float:
        """max |out − ref| / max |ref| over q, k, v of the last run."""
        return max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
                   for o, r in zip(self.out, self.refs))

    def run(self, path=None):
        return lambda: qkv_norm_rope(*self.args, out=self.out, path=path)


def _with_config(cfg: dict, fn):
    """Run fn with every qkv_gemm row of the cuda table set to cfg (max_t/fused kept)."""
    saved = {row: configs.TABLE[row]["cuda"] for row in qkv_gemm.ROWS}
    try:
        for row in qkv_gemm.ROWS:
            configs.TABLE[row]["cuda"] = {**saved[row], **cfg}
        return fn()
    finally:
        for row in qkv_gemm.ROWS:
            configs.TABLE[row]["cuda"] = saved[row]


def _time_config(problem: Problem, cfg: dict) -> dict:
    def measure():
        for value in problem.out:
            value.fill_(float("nan"))
        problem.run("fused_gemm")()
        err = problem.error()
        return {"us": _median_us(problem.run("fused_gemm")), "rel_err": err, "ok": err <= 2e-2}
    try:
        return _with_config(cfg, measure)
    except Exception as error:  # noqa: BLE001 — e.g. out of shared memory: reported, the sweep goes on
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def _baselines(problem: Problem, tokens: int) -> dict:
    compiled = torch.compile(hf_qkv_norm_rope, dynamic=False)
    compiled(*problem.hf_args)
    return {"gemm_only": _median_us(lambda: F.linear(problem.x, problem.w)),
            "gemm_epilogue": _median_us(problem.run("gemm_epilogue")),
            "dflash": _median_us(problem.run()),
            "inductor": _median_us(lambda: compiled(*problem.hf_args)),
            "dflash_path": "fused_gemm" if qkv_gemm.fused_gemm_chosen(problem.x, tokens, "cuda") else "gemm_epilogue"}


DECODE_TOKENS = (1, 16, 32)
DECODE_GRID = [dict(block_m=16, block_k=bk, group_m=4, one_dot=od, num_warps=4, num_stages=st, split_k=sp)
               for sp in (1, 2, 4, 8) for bk in (64, 128) for st in (3, 4) for od in (0, 1)]
WEIGHT_COPIES, CALLS_PER_GRAPH = 4, 20


def _rotated_us(calls) -> float:
    """µs per call of `calls` (one per weight copy) cycled CALLS_PER_GRAPH times in one CUDA graph."""
    sequence = [calls[i % len(calls)] for i in range(CALLS_PER_GRAPH)]
    return _median_us(lambda: [call() for call in sequence]) / CALLS_PER_GRAPH


def decode_sweep(opts) -> None:
    from torch_dflash.compiler.triton.linear import linear as skinny_linear

    start = time.perf_counter()
    shape = {k: v for k, v in QWEN3_8B_DRAFT.items() if k != "tokens"}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape, "T": {}}
    for tokens in DECODE_TOKENS:
        p = Problem(tokens, **shape)
        copies = [p.w.clone() for _ in range(WEIGHT_COPIES)]
        fused = [lambda w=w: qkv_norm_rope(p.args[0], w, *p.args[2:], out=p.out, path="fused_gemm") for w in copies]
        row = {"gemm_only": _rotated_us([lambda w=w: F.linear(p.x, w) for w in copies]),
               "skinny_gemm": _rotated_us([lambda w=w: skinny_linear(p.x, w, None) for w in copies]),
               "shipped": _rotated_us(fused), "configs": []}
        for cfg in DECODE_GRID:
            if time.perf_counter() - start > opts.budget_s * tokens_share(tokens):
                row.setdefault("not_run", []).append(cfg)
                continue
            def measure():
                for value in p.out:
                    value.fill_(float("nan"))
                fused[0]()
                err = p.error()
                return {"us": _rotated_us(fused), "rel_err": err, "ok": err <= 2e-2}
            try:
                timing = _with_config(cfg, measure)
            except Exception as error:  # noqa: BLE001 — reported, the sweep goes on
                timing = {"error": f"{type(error).__name__}: {error}"[:200]}
            row["configs"].append({**cfg, **timing})
        result["T"][tokens] = row
        best = min((c for c in row["configs"] if c.get("ok")), key=lambda c: c["us"], default=None)
        print(f"T {tokens}: GEMM alone {row['gemm_only']:.1f} µs, skinny {row['skinny_gemm']:.1f}, shipped fused "
              f"{row['shipped']:.1f}; best {best}", flush=True)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    lines = [f"sweep_qkv_gemm --decode — {result['device']}, torch {result['torch']}, {result['wall_s']} s; µs per "
             f"call, weights rotating over {WEIGHT_COPIES} copies", "",
             "| T | split_k | block_k | stages | one_dot | µs | rel err |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for tokens, row in result["T"].items():
        lines.append(f"| {tokens} | GEMM alone {row['gemm_only']:.1f}, skinny {row['skinny_gemm']:.1f}, "
                     f"shipped {row['shipped']:.1f} | | | | | |")
        for c in sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"]):
            lines.append(f"| {tokens} | {c['split_k']} | {c['block_k']} | {c['num_stages']} | {c['one_dot']} | "
                         f"{c['us']:.1f} | {c['rel_err']:.1e}{'' if c['ok'] else ' WRONG'} |")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_qkv_gemm_decode.json").write_text(json.dumps(result, indent=1))
    (out / "sweep_qkv_gemm_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def tokens_share(tokens: int) -> float:
    """The part of --budget-s spent once T is done (the budget is shared equally by DECODE_TOKENS)."""
    return (DECODE_TOKENS.index(tokens) + 1) / len(DECODE_TOKENS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--decode", action="store_true", help="T 1/16/32 with rotating weights (split_k grid)")
    opts = parser.parse_args()
    if opts.decode:
        return decode_sweep(opts)
    start = time.perf_counter()
    shape = {k: v for k, v in QWEN3_8B_DRAFT.items() if k != "tokens"}
    problems = {t: Problem(t, **shape) for t in TOKENS}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape,
              "baselines": {t: _baselines(p, t) for t, p in problems.items()}, "configs": [], "not_run": []}
    grid = [(c, TOKENS) for c in LARGE_GRID] + [(c, TOKENS[:2]) for c in SMALL_GRID]
    for (block_m, block_k, warps, stages), tokens in grid:
        cfg = dict(block_m=block_m, block_k=block_k, group_m=8, one_dot=0, num_warps=warps, num_stages=stages)
        if not _fits(block_m, block_k, stages, shape["head_dim"]):
            continue
        if time.perf_counter() - start > 0.7 * opts.budget_s:     # the rest is for the variations below
            result["not_run"].append(cfg)
            continue
        result["configs"].append({**cfg, "T": {t: _time_config(problems[t], cfg) for t in tokens}})
        print(_line(result["configs"][-1]), flush=True)
    for change in ({"one_dot": 1}, {"group_m": 4}, {"group_m": 16}):    # around the best config of each T
        for t in TOKENS:
            best = _best(result["configs"], t)
            if best and time.perf_counter() - start <= opts.budget_s:
                cfg = {**best, **change}
                result["configs"].append({**cfg, "T": {t: _time_config(problems[t], cfg)}})
                print(_line(result["configs"][-1]), flush=True)
    result["best"] = {t: _best(result["configs"], t) for t in TOKENS}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    table = _table(result)
    print(table)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_qkv_gemm.json").write_text(json.dumps(result, indent=1))
    (out / "sweep_qkv_gemm.md").write_text(table + "\n")


def _best(rows: list[dict], tokens: int) -> dict | None:
    timed = [(r["T"][tokens]["us"], r) for r in rows if r["T"].get(tokens, {}).get("ok")]
    if not timed:
        return None
    _, row = min(timed, key=lambda pair: pair[0])
    return {k: row[k] for k in CONFIG_KEYS}


def _line(row: dict) -> str:
    cells = ", ".join(f"T={t}: " + (f"{r['us']:.1f} µs err {r['rel_err']:.1e}{'' if r['ok'] else ' WRONG'}"
                                    if "us" in r else r["error"]) for t, r in row["T"].items())
    return (f"bm {row['block_m']} bk {row['block_k']} gm {row['group_m']} one_dot {row['one_dot']} "
            f"w {row['num_warps']} s {row['num_stages']}: {cells}")


def _table(result: dict) -> str:
    lines = [f"sweep_qkv_gemm — {result['device']}, torch {result['torch']}, {result['wall_s']} s",
             "", "| T | GEMM alone µs | vendor GEMM + epilogue µs | dflash (path) µs | inductor µs "
             "| best fused µs | × GEMM | inductor / best | best config (bm, bk, gm, one_dot, warps, stages) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in TOKENS:
        base, best = result["baselines"][t], result["best"][t]
        fused = min((r["T"][t]["us"] for r in result["configs"] if r["T"].get(t, {}).get("ok")), default=None)
        cfg = "—" if best is None else ", ".join(str(best[k]) for k in CONFIG_KEYS)
        lines.append(f"| {t} | {base['gemm_only']:.1f} | {base['gemm_epilogue']:.1f} | {base['dflash']:.1f} "
                     f"({base['dflash_path']}) | {base['inductor']:.1f} | "
                     + ("— | — | — | — |" if fused is None else
                        f"{fused:.1f} | {fused / base['gemm_only']:.2f} | {base['inductor'] / fused:.2f} | {cfg} |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
