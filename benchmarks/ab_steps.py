"""A/B of launch-config variants inside the runtime's own steps, interleaved (GPU; ≈ 1 min per variant on an H100).

    python -m torch_dflash.benchmarks.ab_steps --variant off:programmatic_launch.on=0 --variant on: [--steps ar]
    python -m torch_dflash.benchmarks.ab_steps --variant fused:qkv_gemm.decode.fused=1 --variant shipped:
    python -m torch_dflash.benchmarks.ab_steps --variant shipped: --variant writes_off:-kv_cache_writes

A variant is `NAME:ITEM[,ITEM…]`, each item `ROW.KEY=VALUE` — an override of compiler/triton/configs.TABLE for
this device's family — or `-PASS` — a pass of the pipeline left out (nothing after the colon: the table and the
pipeline as shipped). For each variant, in the order given, the runtime's steps are built with its table and
passes (benchmarks/e2e.py's models and turn: DFlashEngine with its default, CUDA-graphed
steps after a 1024-token prompt and one turn; AR = the target's one-token step through the same path;
draft_hidden = the draft step to its hidden states, no lm_head), so each
captured graph holds that variant's kernels and launches. Then every step of every variant is timed in
alternation — `--rounds` rounds, the variant order reversed every other round, each a median of `--reps` replays
(profile_steps.timed_us) — so drift between builds and over time falls on all variants alike; one machine
moved a step by 3 % between two builds of the same variant timed apart. Each round times a step twice: with
the host ahead (harness._cuda_time_ms: the step's GPU time, the numbers compared) and as one synchronous call
(`call`: the host's launch latency included, which moved the draft step by ±2-5 % between rounds before
session 18). Printed and written to DIR/ab_steps.json: per step ("draft", and "draft (call)" for the call
timing) and variant the median over rounds [min..max], the paired per-round difference to the first variant
with how many rounds were faster, and whether the step's outputs are bitwise equal to the first variant's. Each
variant holds its own engine and AR program (≈ 9 GB of merged weights each at the Qwen3-8B shape): two variants
with all three steps fit an 80 GB GPU. `--small` runs tiny shapes on CPU (a smoke test:
nothing meaningful timed).
"""

import argparse
import copy
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from torch_dflash.compiler.triton import configs
from torch_dflash.passes.pipeline import PASS_NAMES

from . import e2e, harness
from .profile_steps import timed_us


MODES = ("gpu", "call")   # each step timed with the host ahead (its GPU time), then as one synchronous call


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, int]], tuple[str, ...]]:
    """'name:row.key=value,-pass,…' → (name, {row: {key: value}}, passes left out); ValueError for a row or key the
    table lacks or a pass the pipeline lacks."""
    name, colon, spec = text.partition(":")
    if not name or not colon:
        raise ValueError(f"variant {text!r}: give NAME:ROW.KEY=VALUE,-PASS,… (nothing after ':' = as shipped)")
    changes: dict[str, dict[str, int]] = {}
    disabled = []
    for item in filter(None, spec.split(",")):
        if item.startswith("-"):
            if item[1:] not in PASS_NAMES:
                raise ValueError(f"variant {name!r}: {item!r} names no pass; passes: {', '.join(PASS_NAMES)}")
            disabled.append(item[1:])
            continue
        path, _, value = item.partition("=")
        row, _, key = path.rpartition(".")
        if row not in configs.TABLE or not value or all(key not in fam for fam in configs.TABLE[row].values()):
            raise ValueError(f"variant {name!r}: {item!r} names no ROW.KEY=VALUE of configs.TABLE")
        changes.setdefault(row, {})[key] = int(value)
    return name, changes, tuple(disabled)


@contextmanager
def table_with(changes: dict[str, dict[str, int]], family: str):
    saved = copy.deepcopy(configs.TABLE)
    for row, fields in changes.items():
        configs.TABLE[row][family] = {**configs.TABLE[row][family], **fields}
    try:
        yield
    finally:
        configs.TABLE.clear()
        configs.TABLE.update(saved)


def first_output(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float().clone()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME:ROW.KEY=VALUE,… (at least two)")
    parser.add_argument("--steps", default="draft,verify,ar")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--out", default=os.environ.get("OUT", "ab-out"))
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke)")
    args = parser.parse_args(argv)
    variants = {name: (changes, disabled) for name, changes, disabled in map(parse_variant, args.variant)}
    if len(variants) < 2:
        parser.error("give at least two variants with different names")
    kinds = args.steps.split(",")
    device = "cpu" if args.small else "cuda"
    family = "rocm" if device == "cuda" and torch.version.hip else "cuda"
    began = time.perf_counter()
    with torch.no_grad():
        target, draft, _, cfg = e2e._pair(device, torch.float32 if args.small else torch.bfloat16, args.small)
        prompt = e2e.random_prompt(target, device, args.small)
        steps, outputs = {}, {}
        for name, (changes, disabled) in variants.items():
            with table_with(changes, family):
                steps[name] = e2e.runtime_steps(target, draft, prompt, cfg["block_size"], device, kinds,
                                                disabled)[0]
                outputs[name] = {kind: first_output(call()) for kind, call in steps[name].items()}
            print(f"built {name} {changes} without passes {list(disabled)} [{time.perf_counter() - began:.0f} s]",
                  flush=True)
        names = list(variants)
        times = {name: {(kind, mode): [] for kind in kinds for mode in MODES} for name in names}
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                for kind, call in steps[name].items():
                    for mode in MODES:
                        times[name][kind, mode].append(timed_us(call, device, args.reps, host_ahead=mode == "gpu"))
    base = names[0]
    result = {"env": harness.environment(device), "command": harness.command_line("ab_steps", argv),
              "variants": {name: {"table": changes, "passes_off": list(disabled)}
                           for name, (changes, disabled) in variants.items()}, "steps": {}}
    for kind in kinds:
        for mode in MODES:
            rows = result["steps"][kind if mode == "gpu" else f"{kind} (call)"] = {}
            for name in names:
                t = times[name][kind, mode]
                diffs = [x - y for x, y in zip(t, times[base][kind, mode])]
                rows[name] = {"median_us": statistics.median(t), "min_us": min(t), "max_us": max(t), "rounds_us": t,
                              "paired_diff_us": statistics.median(diffs), "rounds_faster": sum(d < 0 for d in diffs),
                              "bitwise_equal": bool(torch.equal(outputs[name][kind], outputs[base][kind]))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_steps.json").write_text(json.dumps(result, indent=1))
    print(f"{result['env']}; {args.rounds} rounds × median of {args.reps}, µs per replay; difference to {base!r} "
          "paired per round" + (" (CPU smoke: nothing meaningful timed)" if args.small else ""))
    for kind, rows in result["steps"].items():
        for name, r in rows.items():
            print(f"  {kind:<19} {name:<16} {r['median_us']:9.1f} [{r['min_us']:.0f}..{r['max_us']:.0f}]"
                  + ("" if name == base else f"  {r['paired_diff_us']:+8.1f} ({r['rounds_faster']}/{args.rounds} "
                     f"rounds faster), outputs {'bitwise equal' if r['bitwise_equal'] else 'differ'}"))
    return result


if __name__ == "__main__":
    main()
