"""Launch-config sweep of dflash.attention's split-KV decode path (attention_decode_kernel + reduce_splits_kernel,
compiler/triton/attention_decode.py) at the call sites of the DFLASH steps, on the GPU.

python -m torch_dflash.benchmarks.sweep_attention [--out DIR] [--budget-s 150] [--smoke]   (CUDA; ≤ budget + 20 s)

Cases (Qwen3-8B: 32/8 heads, hd 128, bf16; q strided [1, Sq, Hq, D] as the steps' q; a contiguous static cache
[1, Hkv, slots, D]; q_pos = the last Sq visible positions, as the runtime passes them):
  verify     16 queries, causal, 1024 cached + 16 = 1040 visible keys of 1041 slots (steps.py's target cache); 36 calls
             per verify step
  ar         1 query, causal, 1025 visible of 1041 slots; 36 per AR step
  draft      16 queries, non_causal, 1024 cached + 16 context + 16 block = 1056 visible of 1057 slots (steps.py's
             draft cache); 5 per draft step
  draft8192  16 queries, non_causal, 8192 visible of 8272 slots (kernels_attention's case, 17.8 µs in
             docs/benchmarks.md): a guard, outside the objective.
Configs: rows of configs.TABLE["attention_decode_hd128"]["cuda"], applied by profile_steps.decode_config (the row is
restored afterwards, also on error). 1. the shipped row, then the full product programs_per_sm × min_keys_per_split ×
block_n of SPACE with the shipped rest; 2. coordinate descent from the best row over every key of SPACE until a
pass changes nothing or --budget-s (counted from the start) is spent — rows past it are listed as not run; 3. the
shipped and the winning row re-timed side by side (CONFIRM_ROUNDS interleaved rounds, medians): the table's numbers;
the winner's row is suggested for configs.py only if it still beats the shipped row there.
Objective: µs of attention per verify + AR + draft step, 36·verify + 36·ar + 5·draft; a row qualifies when every
case passes its check and draft8192 ≤ GUARD_SLACK × the shipped row's. A row whose decode_plan at a case equals one
timed before (e.g. max_splits, which cannot bind while 8 kv heads × 16 splits fill the 132 SMs) reuses that timing.
Method: each launch is checked first against attention_reference on the visible keys (allclose, atol = rtol = 2e-2
as the kernel tests) on input set 0, whose stale slots hold NaN and whose output is poisoned with NaN; then one
CUDA graph of N calls back to back, each on its own input set (N ≥ MIN_CALLS and the sets ≥ 2 × L2 of reads,
harness.rotation_count) is replayed REPS times: µs per call = median / N (decode + reduce + the gap between
launches, as inside a step; the graph's launch latency is spread over N calls). Before the search, worker processes
run every (case, tile) of SPACE once, so that Triton's on-disk cache holds each kernel specialization: compiling
them one after another would take most of the budget.
Output: sweep_attention.json (every row, launch and the confirmation) and sweep_attention.md in --out (default $OUT
or .); the markdown table is printed last. --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (on the GPU if there
is one), the shipped row and one other, nothing meaningful timed.
"""

import argparse
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():   # --smoke on a CPU: Triton reads this when the kernels are decorated (import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch_dflash.compiler.ops.attention import attention_reference  # noqa: E402
from torch_dflash.compiler.triton import attention_decode as ad  # noqa: E402
from torch_dflash.compiler.triton.attention import uses_decode  # noqa: E402
from torch_dflash.compiler.triton.attention_common import family  # noqa: E402
from torch_dflash.compiler.triton.configs import TABLE  # noqa: E402

from . import harness  # noqa: E402
from .profile_steps import decode_config  # noqa: E402

DTYPE, TOLERANCE = torch.bfloat16, 2e-2
KEYS = ("programs_per_sm", "min_keys_per_split", "block_n", "num_warps", "num_stages", "max_splits",
        "reduce_num_warps")
SPACE = {"programs_per_sm": (1, 2, 4), "min_keys_per_split": (32, 64, 128, 256), "block_n": (16, 32, 64),
         "num_warps": (2, 4, 8), "num_stages": (1, 2, 3), "max_splits": (32, 64, 128), "reduce_num_warps": (1, 2, 4)}
PRODUCT_KEYS = KEYS[:3]
TILE_KEYS = ("block_n", "num_warps", "num_stages")      # constexprs / launch options: each tile is its own kernel
GUARD_SLACK = 1.05
MIN_CALLS, REPS, CONFIRM_ROUNDS = 20, 100, 3
MAX_WORKERS = 15


@dataclass(frozen=True)
class Shape:
    """One call site: `sq` queries of `kind` at the last `visible` positions of a static cache of `slots`; `calls`
    per step in the objective (0: a guard the winner must not slow down)."""
    name: str
    sq: int
    kind: str
    visible: int
    slots: int
    calls: int


@dataclass(frozen=True)
class Setup:
    heads: tuple[int, int, int]     # q heads, kv heads, head_dim
    shapes: tuple[Shape, ...]
    min_calls: int                  # calls per timed CUDA graph, at least
    reps: int                       # graph replays per timing
    rounds: int                     # confirmation rounds


FULL = Setup((32, 8, 128), (Shape("verify", 16, "causal", 1024 + 16, 1024 + 16 + 1, 36),
                            Shape("ar", 1, "causal", 1024 + 1, 1024 + 16 + 1, 36),
                            Shape("draft", 16, "non_causal", 1024 + 16 + 16, 1024 + 16 + 16 + 1, 5),
                            Shape("draft8192", 16, "non_causal", 8192, 8192 + 16 + 64, 0)), MIN_CALLS, REPS,
             CONFIRM_ROUNDS)
SMOKE = Setup((4, 2, 64), (Shape("verify", 4, "causal", 28, 29, 36), Shape("ar", 1, "causal", 25, 29, 36),
                           Shape("draft", 4, "non_causal", 32, 33, 5),
                           Shape("draft_long", 4, "non_causal", 70, 138, 0)), 1, 1, 1)


class Problem:
    """One shape's input sets (set 0 with NaN in the stale slots), its reference output and bytes floor."""

    def __init__(self, shape: Shape, heads: tuple[int, int, int], device: str, min_calls: int | None, l2: int = 0):
        """min_calls: at least that many input sets, and enough that the calls read ≥ 2 × `l2`; None: set 0 only."""
        n_q, n_kv, hd = heads
        g = torch.Generator(device).manual_seed(shape.visible)
        self.shape, self.heads, self.device, self.scale = shape, heads, device, hd ** -0.5

        def make():
            q = torch.randn(1, shape.sq, n_q, hd, generator=g, device=device).to(DTYPE).transpose(1, 2)
            return (q, *(torch.randn(1, n_kv, shape.slots, hd, generator=g, device=device).to(DTYPE) for _ in range(2)))

        first = make()
        q, k, v = first
        assert uses_decode(q, k), f"{shape.name} would not run the decode kernel"
        self.q_pos = torch.arange(shape.visible - shape.sq, shape.visible, device=device)[None]
        self.ref = attention_reference(q, k[:, :, :shape.visible], v[:, :, :shape.visible], shape.kind, self.scale,
                                       q_pos=self.q_pos)
        for cache in (k, v):
            cache[:, :, shape.visible:] = float("nan")
        self.floor_bytes = (2 * shape.visible * n_kv + 2 * shape.sq * n_q) * hd * DTYPE.itemsize
        set_bytes = sum(t.untyped_storage().nbytes() for t in first)
        count = 1 if min_calls is None else max(
            min_calls, harness.rotation_count(set_bytes, self.floor_bytes, l2))
        self.sets = [first] + [make() for _ in range(count - 1)]

    def plan(self) -> ad.DecodePlan:
        """What attention_decode launches at this shape under the current TABLE row."""
        n_q, n_kv, hd = self.heads
        dev = torch.device(self.device)
        return ad.decode_plan(1, n_q, n_kv, self.shape.sq, self.shape.slots, hd, DTYPE, family(dev),
                              ad.multiprocessor_count(dev))

    def call(self, q, k, v, out=None):
        return ad.attention_decode(q, k, v, self.shape.kind, self.scale, q_pos=self.q_pos, out=out)

    def check(self) -> tuple[bool, float]:
        """(close to the reference, max |out − ref|) on set 0: NaN if a row was not written or a stale slot read."""
        out = self.call(*self.sets[0], out=torch.full_like(self.ref, float("nan"))).float()
        return (torch.allclose(out, self.ref.float(), atol=TOLERANCE, rtol=TOLERANCE),
                (out - self.ref.float()).abs().max().item())

    def time_us(self, reps: int) -> tuple[float, bool]:
        """µs per call: a CUDA graph of one call per input set, median of `reps` replays / sets; whether graphed."""
        us, graphed = harness.time_variant(lambda: [self.call(*s) for s in self.sets], self.device, reps, True)
        return us / len(self.sets), graphed

    def measure(self, reps: int) -> dict:
        """The current row at this shape: its plan, then the check, then (if it passed) the timing."""
        plan = self.plan()
        result = {"splits": plan.num_splits, "grid": list(plan.grid), "block_m": plan.block_m}
        try:
            ok, err = self.check()
            result.update(ok=ok, max_abs_err=None if math.isnan(err) else round(err, 5))
            if result["ok"]:
                us, graphed = self.time_us(reps)
                result.update(us=round(us, 3), graphed=graphed)
        except Exception as error:  # noqa: BLE001 — e.g. out of shared memory: reported, the sweep goes on
            result.update(ok=False, error=f"{type(error).__name__}: {error}"[:200])
        return result


def _row_key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in KEYS)


def _label(cfg: dict) -> str:
    return "pp{}/mk{}/bn{}/w{}/s{}/ms{}/rw{}".format(*_row_key(cfg))


class Sweep:
    """Rows (configs) evaluated on every problem, launches timed once per (case, plan), and the objective."""

    def __init__(self, problems: list[Problem], head_dim: int, setup: Setup, deadline: float):
        self.problems, self.head_dim, self.setup, self.deadline = problems, head_dim, setup, deadline
        self.family = family(torch.device(problems[0].device))
        self.rows: dict[tuple, dict] = {}
        self.launches: dict[tuple, dict] = {}
        self.not_run: list[dict] = []
        self.guard_limit: dict[str, float] = {}     # guard case -> µs a qualifying row may take (set by `search`)

    def run(self, cfg: dict, phase: str, always: bool = False) -> dict | None:
        """The row `cfg` on every problem (each launch checked, then timed); the earlier result of a row done before;
        None past the deadline (unless `always`)."""
        key = _row_key(cfg)
        if key in self.rows:
            return self.rows[key]
        if not always and time.perf_counter() > self.deadline:
            self.not_run.append(cfg)
            return None
        cases = {}
        with decode_config(self.family, self.head_dim, **cfg):
            for p in self.problems:
                launch = (p.shape.name, p.plan())
                if launch not in self.launches:
                    self.launches[launch] = p.measure(self.setup.reps)
                cases[p.shape.name] = self.launches[launch]
        self.rows[key] = row = {"phase": phase, "cfg": cfg, "cases": cases}
        print(self.line(row), flush=True)
        return row

    def objective(self, row: dict) -> float | None:
        """36·verify + 36·ar + 5·draft µs, or None when a case failed or a guard got slower than allowed."""
        cases = row["cases"]
        if not all(c["ok"] for c in cases.values()):
            return None
        if any(cases[name]["us"] > limit for name, limit in self.guard_limit.items()):
            return None
        return sum(p.shape.calls * cases[p.shape.name]["us"] for p in self.problems)

    def best(self) -> dict | None:
        """The qualifying row of the smallest objective (the earliest of equals)."""
        scored = [(score, i, row) for i, row in enumerate(self.rows.values())
                  if (score := self.objective(row)) is not None]
        return min(scored, key=lambda s: s[:2])[2] if scored else None

    def line(self, row: dict) -> str:
        score = self.objective(row)
        return (f"{row['phase']:<8} {_label(row['cfg']):<28} "
                + "  ".join(f"{name} {_us(c)}" for name, c in row["cases"].items())
                + (f"  → {score:.1f} µs" if score is not None else "  → disqualified"))


def _us(case: dict) -> str:
    return f"{case['us']:.2f}" if "us" in case else ("error" if "error" in case else "WRONG")


def search(sweep: Sweep, shipped: dict, space: dict) -> dict | None:
    """The shipped row (it sets the guards' limits), the product of PRODUCT_KEYS, then coordinate descent over
    every key from the best row; returns the best qualifying row."""
    first = sweep.run(shipped, "shipped", always=True)
    guards = {p.shape.name: first["cases"][p.shape.name] for p in sweep.problems if not p.shape.calls}
    sweep.guard_limit = {name: GUARD_SLACK * case["us"] for name, case in guards.items() if case["ok"]}
    for values in itertools.product(*(space[k] for k in PRODUCT_KEYS)):
        sweep.run({**shipped, **dict(zip(PRODUCT_KEYS, values))}, "product")
    best, changed = sweep.best(), True
    while best is not None and changed:
        changed = False
        for key in KEYS:
            for value in space[key]:
                sweep.run({**best["cfg"], key: value}, "descent")
            if (new := sweep.best()) is not best:
                best, changed = new, True
    return best


def confirm(sweep: Sweep, rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each named (checked) row re-timed on every problem, rounds interleaved; median µs per call."""
    times = {name: {p.shape.name: [] for p in sweep.problems} for name in rows}
    for _ in range(sweep.setup.rounds):
        for name, cfg in rows.items():
            with decode_config(sweep.family, sweep.head_dim, **cfg):
                for p in sweep.problems:
                    times[name][p.shape.name].append(p.time_us(sweep.setup.reps)[0])
    return {name: {case: round(statistics.median(ts), 3) for case, ts in by_case.items()}
            for name, by_case in times.items()}


def case_bests(sweep: Sweep) -> dict[str, dict | None]:
    """Per case the fastest passing row over every row evaluated: its µs and config."""
    bests = {}
    for p in sweep.problems:
        timed = [(row["cases"][p.shape.name]["us"], row["cfg"]) for row in sweep.rows.values()
                 if row["cases"][p.shape.name]["ok"]]
        bests[p.shape.name] = dict(zip(("us", "cfg"), min(timed, key=lambda t: t[0]))) if timed else None
    return bests


_WORKER_PROBLEMS: dict[str, Problem] = {}


def _warm(task: tuple[Shape, tuple, str, dict, dict]) -> int:
    """In a worker process: launch one case under every row of `space` with this tile (each distinct plan once),
    so that Triton compiles (and caches on disk) every specialization the sweep will launch; returns launches."""
    shape, heads, device, tile, space = task
    if shape.name not in _WORKER_PROBLEMS:
        _WORKER_PROBLEMS[shape.name] = Problem(shape, heads, device, None)
    p, seen = _WORKER_PROBLEMS[shape.name], set()
    rest = [k for k in KEYS if k not in tile]
    for values in itertools.product(*(space[k] for k in rest)):
        with decode_config(family(torch.device(device)), heads[2], **tile, **dict(zip(rest, values))):
            if (plan := p.plan()) not in seen:
                seen.add(plan)
                try:
                    p.call(*p.sets[0])
                except Exception:  # noqa: BLE001 — the sweep's own launch of this plan reports it
                    pass
    if device == "cuda":
        torch.cuda.synchronize()
    return len(seen)


def precompile(setup: Setup, space: dict, device: str) -> dict:
    """Every (case, tile) of `space` launched once in worker processes (spawned: no CUDA state is inherited)."""
    start = time.perf_counter()
    tasks = [(shape, setup.heads, device, dict(zip(TILE_KEYS, tile)), space) for shape in setup.shapes
             for tile in itertools.product(*(space[k] for k in TILE_KEYS))]
    workers = max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1, len(tasks)))
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            outcome = {"launches": sum(pool.map(_warm, tasks))}
    except Exception as error:  # noqa: BLE001 — the sweep still runs, compiling as it goes
        outcome = {"error": f"{type(error).__name__}: {error}"[:200]}
    outcome.update(tasks=len(tasks), workers=workers, s=round(time.perf_counter() - start, 1))
    print(f"precompile: {outcome}", flush=True)
    return outcome


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 configs, nothing meaningful timed")
    argv = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = SMOKE if opts.smoke else FULL
    fam, head_dim = family(torch.device(device)), setup.heads[2]
    table_row = dict(TABLE[f"attention_decode_hd{head_dim}"][fam])
    shipped = {k: table_row[k] for k in KEYS}
    space = SPACE if not opts.smoke else {**{k: (shipped[k],) for k in KEYS},
                                          "min_keys_per_split": (shipped["min_keys_per_split"], 16)}
    ceilings = harness.measure_ceilings(device)
    result = {"env": harness.environment(device), "command": "python -m torch_dflash.benchmarks.sweep_attention "
              + " ".join(argv), "copy_GBps": round(ceilings.copy_bytes_per_s / 1e9, 1), "heads": setup.heads,
              "shapes": [asdict(s) for s in setup.shapes], "space": space, "table_row": table_row,
              "guard_slack": GUARD_SLACK}
    if not opts.smoke:
        result["precompile"] = precompile(setup, space, device)
    l2 = harness.l2_bytes("cpu" if opts.smoke else device)     # smoke: a pretend 64 KiB, a few sets on any device
    problems = [Problem(shape, setup.heads, device, setup.min_calls, l2) for shape in setup.shapes]
    sweep = Sweep(problems, head_dim, setup, start + opts.budget_s)
    winner = search(sweep, shipped, space)
    compared = {name: row["cfg"] for name, row in (("shipped", sweep.rows[_row_key(shipped)]), ("winner", winner))
                if row is not None and sweep.objective(row) is not None}
    result.update(rows=list(sweep.rows.values()), not_run=sweep.not_run, launches_timed=len(sweep.launches),
                  guard_limit_us=sweep.guard_limit, case_bests=case_bests(sweep), winner=winner and winner["cfg"],
                  confirmed_us=confirm(sweep, compared), floor_us={
                      p.shape.name: round(p.floor_bytes / ceilings.copy_bytes_per_s * 1e6, 2)
                      for p in problems} if ceilings.copy_bytes_per_s else {})
    result["wall_s"] = round(time.perf_counter() - start, 1)
    table = markdown(result, sweep)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_attention.json").write_text(json.dumps(result, indent=1))
    (out / "sweep_attention.md").write_text(table + "\n")
    print(table)
    return result


def markdown(result: dict, sweep: Sweep) -> str:
    """The shipped and winning rows per case (confirmation medians), each case's own best, the objective, and the
    configs.py row to paste."""
    env, confirmed, winner = result["env"], result["confirmed_us"], result["winner"]
    shipped_row = sweep.rows[_row_key(result["table_row"])]
    winner_row = sweep.rows.get(_row_key(winner)) if winner else None
    ungraphed = sum(launch.get("graphed") is False for launch in sweep.launches.values())
    lines = [f"sweep_attention — {env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}; "
             f"{len(sweep.rows)} rows, {len(sweep.launches)} distinct launches ({ungraphed} timed without a CUDA "
             f"graph), {len(sweep.not_run)} rows not run (budget); {result['wall_s']} s", "",
             "config = pp programs_per_sm / mk min_keys_per_split / bn block_n / w num_warps / s num_stages / "
             "ms max_splits / rw "
             f"reduce_num_warps. shipped {_label(shipped_row['cfg'])}, winner {_label(winner) if winner else '—'}. "
             "µs per call (decode + reduce): CUDA graphs of back-to-back calls on rotating inputs; the shipped and "
             f"winner columns re-timed side by side (median of {sweep.setup.rounds} round(s)), the case's best from "
             "the search.", "",
             "| case | Sq, kind | visible / slots | calls per step | floor µs | shipped µs (splits) "
             "| winner µs (splits) | case's best µs | case's best config |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for p in sweep.problems:
        s, name = p.shape, p.shape.name
        best = result["case_bests"][name]
        cells = [f"{confirmed[who][name]:.2f} ({row['cases'][name]['splits']})" if who in confirmed else
                 (_us(row["cases"][name]) if row else "—")
                 for who, row in (("shipped", shipped_row), ("winner", winner_row))]
        best_us, best_cfg = (f"{best['us']:.2f}", _label(best["cfg"])) if best else ("—", "—")
        lines.append(f"| {name} | {s.sq}, {s.kind} | {s.visible} / {s.slots} | {s.calls or 'guard'} | "
                     f"{result['floor_us'].get(name, '—')} | {cells[0]} | {cells[1]} | {best_us} | {best_cfg} |")
    lines.append("")
    if not winner:
        return "\n".join(lines + ["no row qualified (every row failed a check or its guard): nothing to suggest."])
    totals = {who: sum(p.shape.calls * confirmed[who][p.shape.name] for p in sweep.problems) for who in confirmed}
    lines.append("objective 36·verify + 36·ar + 5·draft (µs of attention per verify + AR + draft step), re-timed: "
                 + ", ".join(f"{who} {us:.1f}" for who, us in totals.items()) + "; guard: "
                 + ", ".join(f"{name} ≤ {GUARD_SLACK} × shipped" for name in sweep.guard_limit) + ".")
    if "shipped" in confirmed and not (totals["winner"] < totals["shipped"] and all(
            confirmed["winner"][name] <= GUARD_SLACK * confirmed["shipped"][name] for name in sweep.guard_limit)):
        return "\n".join(lines + ["re-timed, the winner does not beat the shipped row (objective or guard): keep the "
                                  "shipped row."])
    return "\n".join(lines + ["suggested row (compiler/triton/configs.py): "
                              f'"attention_decode_hd{sweep.head_dim}": "{sweep.family}": '
                              + json.dumps({**result["table_row"], **winner})])


if __name__ == "__main__":
    main()
