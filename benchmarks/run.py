"""`torch-dflash bench`: ceilings, then the chosen suites' cases; writes bench.json + bench.md, returns the table."""

import importlib
import os
import shlex
import sys
from pathlib import Path

import torch

from . import harness

SUITES = {
    "kernels": ("kernels_projections", "kernels_mhc", "kernels_attention"),
    "steps": ("steps.draft_cases", "steps.target_cases"),
}


def collect(suite: str, device: str, small: bool, log, only: tuple[str, ...] = ()):
    names = [m for s in (SUITES if suite == "all" else {suite: SUITES[suite]}).values() for m in s]
    names = [m for m in names if not only or m in only or m.split(".")[0] in only]
    cases = []
    for name in names:
        module_name, _, function = name.partition(".")
        module = importlib.import_module(f"{__package__}.{module_name}")
        log(f"building {name} cases …")
        cases += getattr(module, function or "cases")(device, small=small)
    return cases


def main(suite: str = "all", out: str = "bench-out", smoke: bool = False, reps: int = 100, log=print,
         only: tuple[str, ...] = ()) -> str:
    """Run on CUDA (timed) or, with smoke=True, once on CPU at tiny shapes (nothing meaningful timed)."""
    device = "cpu" if smoke else "cuda"
    if smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before they import
    if device == "cuda" and not torch.cuda.is_available():
        from torch_dflash.errors import InputError

        raise InputError("torch-dflash bench times GPU kernels and needs a CUDA/ROCm GPU; use --smoke on a CPU.")
    env = harness.environment(device)
    log(f"measuring ceilings on {env.get('gpu', device)} …")
    ceilings = harness.measure_ceilings(device)
    rows = harness.run_cases(collect(suite, device, smoke, log, only), ceilings, device, reps=1 if smoke else reps, log=log)
    command = " ".join(["torch-dflash", *map(shlex.quote, sys.argv[1:])])
    return harness.write(Path(out), rows, ceilings, env, command)
