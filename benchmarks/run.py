"""`torch-dflash bench`: ceilings, then each chosen suite's case modules in turn; every case is built, checked,
timed and dropped before the next (so its inputs are freed). bench.json + bench.md are rewritten after every
case, so a run cut short still leaves its table; returns the table. Progress lines carry the elapsed time;
bench.json's `run` holds the time log (ceilings, each case's check — where compiles happen — and timing).
"""

import importlib
import importlib.util
import os
import shlex
import sys
import traceback
from pathlib import Path

import torch

from torch_dflash.errors import InputError

from . import harness

SUITES = {
    "kernels": ("kernels_projections", "kernels_mhc", "kernels_attention"),
    "e2e": ("e2e",),
    "steps": ("steps_backend.draft_cases", "steps_backend.verify_cases", "steps_backend.ar_cases",
              "steps.draft_cases"),
}
# `all`: every case issue #8 names, in one ≤ 10-minute device call, cheap and most wanted first so that a spent
# --budget falls on the extras at the end (no case starts once it is spent; each case compiles inside its own
# check). H100, 21:35 UTC run: kernels 131 s; e2e 387 s with its dflash+inductor variant, of which ≈ 210 s are
# that variant's Inductor compiles of the 36-layer target (verify 86 s, AR 94 s) and the draft (31 s) — so `all`
# runs e2e.core_cases (dflash, the inductor peer, z-lab: ≈ 175 s) and `--suite e2e` the full set; then the
# backends on z-lab's draft and transformers' verify step (≈ 155 s, issue #5); then the extras (transformers' AR
# step, our own draft under the backends). The steps cases share two big models, built once (steps.shared_*) and
# dropped after the suite; the e2e cases share theirs through the generator.
ALL = (("kernels", "kernels_projections"), ("kernels", "kernels_mhc"), ("kernels", "kernels_attention"),
       ("e2e", "e2e.core_cases"), ("steps", "steps_backend.draft_cases"), ("steps", "steps_backend.verify_cases"),
       ("steps", "steps_backend.ar_cases"), ("steps", "steps.draft_cases"))
REPS = {"kernels": 100, "steps": 50, "e2e": 50}  # steps take ms each and their medians are stable at 50


def plan(suite: str, only: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(suite, module entry) pairs to run, in order; `only` keeps entries named by module or module.function."""
    entries = list(ALL) if suite == "all" else [(suite, entry) for entry in SUITES[suite]]
    unknown = [name for name in only if not any(name in (entry, entry.split(".")[0]) for _, entry in entries)]
    if unknown:
        known = sorted({entry.split(".")[0] for _, entry in entries})
        raise InputError(f"--only names no case module of suite {suite}: {', '.join(unknown)} "
                         f"(known: {', '.join(known)}).")
    return [(s, entry) for s, entry in entries if not only or entry in only or entry.split(".")[0] in only]


def _one_by_one(cases):
    """Each case in turn, keeping no reference to the ones already handed out (lists and generators alike)."""
    if isinstance(cases, list):
        cases.reverse()
        while cases:
            yield cases.pop()
    else:
        yield from cases


def _run_entry(entry: str, device: str, smoke: bool, reps: int, ceilings, l2: int, clock, log, rows: list,
               budget_s: float, save) -> str | None:
    """Every case of one module entry, appended to `rows` (and saved) as it completes; no case starts once the
    budget is spent. Returns why cases were left out, or None."""
    module_name, _, function = entry.partition(".")
    module = importlib.import_module(f"{__package__}.{module_name}")
    for case in _one_by_one(getattr(module, function or "cases")(device, small=smoke)):
        if budget_s and clock.elapsed > budget_s and not case.follow_up:
            return f"from {case.name} on: the {budget_s:.0f} s budget was spent"
        rows += harness.run_case(case, ceilings, device, reps, l2, clock, log)
        save()
    return None


def _release(entries) -> None:
    """After a suite: its modules drop what they share between cases (steps.py's big models), and Dynamo's caches
    go too (a dflash-compiled graph holds its model's frozen weights; no later suite reuses a compiled graph)."""
    for entry in entries:
        module = sys.modules.get(f"{__package__}.{entry.split('.')[0]}")
        if hasattr(module, "release"):
            module.release()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(suite: str = "all", out: str = "bench-out", smoke: bool = False, reps: int | None = None, log=print,
         only: tuple[str, ...] = (), budget_s: float = 0) -> str:
    """Run on CUDA (timed) or, with smoke=True, once on CPU at tiny shapes (nothing meaningful timed). `reps`
    overrides REPS; with `budget_s`, no case starts after that many seconds (what did not run is listed)."""
    device = "cpu" if smoke else "cuda"
    if smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before they import
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("torch-dflash bench times GPU kernels and needs a CUDA/ROCm GPU; use --smoke on a CPU.")
    entries = plan(suite, only)
    clock = harness.Clock()
    env = harness.environment(device)
    log(f"measuring ceilings on {env.get('gpu', device)} …")
    ceilings = harness.measure_ceilings(device)
    clock.lap("ceilings")
    l2 = harness.l2_bytes(device)
    command = " ".join(["torch-dflash", *map(shlex.quote, sys.argv[1:])])
    rows, not_run = [], []

    def save() -> str:
        run = {"l2_bytes": l2, "budget_s": budget_s or None, "elapsed_s": round(clock.elapsed, 1),
               "times": clock.laps, "not_run": not_run}
        return harness.write(Path(out), rows, ceilings, env, command, run)

    for index, (suite_name, entry) in enumerate(entries):
        if index == 0 or entries[index - 1][0] != suite_name:
            log(f"[{clock.elapsed:4.0f} s] suite {suite_name}")
        skipped = _why_not_run(entry, budget_s, clock.elapsed)
        if not skipped:
            log(f"[{clock.elapsed:4.0f} s] {entry} …")
            try:
                skipped = _run_entry(entry, device, smoke, 1 if smoke else reps or REPS[suite_name], ceilings, l2,
                                     clock, log, rows, budget_s, save)
            except Exception as error:  # noqa: BLE001 — one module failing must not cost the run's other results
                log(traceback.format_exc())
                skipped = f"failed: {type(error).__name__}: {error}"
        if skipped:
            not_run.append(f"{entry} ({skipped})")
            log(f"[{clock.elapsed:4.0f} s] not run: {not_run[-1]}")
            save()
        if index + 1 == len(entries) or entries[index + 1][0] != suite_name:
            _release([e for s, e in entries if s == suite_name])
    log(f"[{clock.elapsed:4.0f} s] done")
    return save()


def _why_not_run(entry: str, budget_s: float, elapsed: float) -> str | None:
    module_name = entry.split(".")[0]
    if budget_s and elapsed > budget_s:
        return f"the {budget_s:.0f} s budget was spent"
    if importlib.util.find_spec(f"{__package__}.{module_name}") is None:
        return f"benchmarks/{module_name}.py does not exist yet"
    return None
