"""Where the time of a compiled DFLASH step goes, kernel by kernel (GPU; ≤ 4 min on an H100).

    python -m torch_dflash.benchmarks.profile_steps [--out DIR] [--steps draft,verify,ar] [--backends dflash,inductor]
    python -m torch_dflash.benchmarks.profile_steps --runtime [--steps draft,verify,ar]

Builds the steps of benchmarks/steps.py (its builders, so the same models, caches and inputs: Qwen3-8B-shape
target and the 5-layer Qwen3-8B-DFlash-b16 draft, random bf16 weights, 1024 cached tokens), compiles each with
torch.compile(backend=…, dynamic=False), captures it in a CUDA graph and prints, per step and backend:
  - the step time (median of CUDA events around graph replays, with the host ahead as the e2e step cases:
    harness._cuda_time_ms; a whole turn without) beside its floor (weight + KV bytes / copy bandwidth measured in
    the same run);
  - the kernels of one replay from torch.profiler: grouped (GEMM, attention, cache writes, norms, …) and the top
    kernels by time, with launches per step and µs per launch;
then the attention kernel alone at each step's exact shapes (its cache, its positions, q strided as the step's
q), 20 calls per CUDA graph: the launch plan (attention_decode.decode_plan), µs per call, and the decode /
reduce kernel split, for the shipped config and for forced split counts and other tiles — what to tune next.
Everything goes to DIR/profile_steps.json (default $OUT or ./profile-out), rewritten after each part.
`--runtime` profiles the runtime's own steps instead (benchmarks/e2e.py's models and turn: `DFlashEngine` with its
default steps — captured, pass pipeline, lowered, CUDA-graphed — after a 1024-token prompt and one turn; AR = the
target's one-token step through the same path), backend "runtime"; there `--steps turn` profiles a whole turn
(`iterate`: both steps' graph replays and the loop's own kernels, its host work in between): its wall time less
its kernel time (with `--no-pdl`) is the time the GPU waits for the host; and `--steps draft_hidden` the draft
step up to its hidden states (no lm_head: what the draft goal's weight floor covers).
`--small` runs tiny shapes on CPU (nothing meaningful timed; CPU op times stand in for kernels).
With programmatic dependent launch (docs/kernels/launch.md: on by default on sm_90+) a kernel's profiled interval
starts at its early launch and includes its wait for the previous grid, so per-kernel times overlap and their sum
exceeds the step; `--no-pdl` builds the steps without it, for per-kernel GPU times (the step time is then that of
the slower, serialized launch).
"""

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from . import harness, steps

GROUPS = (  # (group, pattern on the kernel name); the first match wins
    ("memcpy / memset", r"^Memcpy|^Memset|memcpy|memset"),
    ("cache write (index_put)", r"index_put"),
    ("attention: decode", r"attention_decode_kernel"),
    ("attention: reduce splits", r"reduce_splits_kernel"),
    ("attention: other", r"attention|flash|fmha|cudnn|sdpa|scaled_dot"),
    ("GEMM", r"nvjet|gemm|cutlass|xmma|cublas|^sm\d\d_|ampere|hopper|aten::(mm|addmm|bmm|linear)$"),
    ("qkv norm+rope epilogue", r"norm_rope|qkv_gemm"),
    ("RMSNorm (Inductor)", r"rsqrt|mean|rms"),
    ("layout copies", r"clone|transpose|cat"),
    ("other Inductor kernels", r"^triton_|^cpp_fused"),
)
# issue #6, CUDA-graph step time on the H100 (no turn goal); the draft's 0.85 ms sits on a floor without the lm_head
GOALS_MS = {"draft_hidden": 0.85, "verify": 6.3, "ar": 6.0}
# attention calls per CUDA graph (graph-launch latency does not count), each on its own copy of the cache
# (20 × 4.3 MB at the Qwen3-8B shapes > L2: every call reads cold K/V, as in a step)
ATTENTION_REPEAT = 20
SPLITS = (1, 2, 4, 8, 16, 32)
TILES = ({"block_n": 32}, {"block_n": 128, "num_stages": 2}, {"num_warps": 8}, {"num_stages": 2},
         {"min_keys_per_split": 64}, {"min_keys_per_split": 256})


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), "other")


def kernel_times(prof, device: str, reps: int) -> dict[str, dict]:
    """name -> {us, calls} per step: CUDA kernels and copies (device events) on a GPU; self CPU time of ops on CPU."""
    totals = defaultdict(lambda: [0.0, 0])
    if device == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name][0] += event.time_range.elapsed_us()
                totals[event.name][1] += 1
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0 and avg.key.startswith("aten::"):
                totals[avg.key] = [avg.self_cpu_time_total, avg.count]
    return {name: {"us": us / reps, "calls": calls / reps} for name, (us, calls) in totals.items()}


def profile(run, device: str, reps: int) -> dict[str, dict]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    run()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            run()
        if device == "cuda":
            torch.cuda.synchronize()
    return kernel_times(prof, device, reps)


def timed_us(run, device: str, reps: int, host_ahead: bool = False) -> float:
    if device != "cuda":
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e6
    return statistics.median(harness._cuda_time_ms(run, reps, host_ahead)) * 1e3


def replayable(fn, device: str):
    """fn replayed from a CUDA graph (warmed up first), or fn itself on CPU."""
    return harness._graphed(fn) if device == "cuda" else fn


def grouped(kernels: dict[str, dict]) -> dict[str, dict]:
    groups = defaultdict(lambda: {"us": 0.0, "calls": 0.0})
    for name, k in kernels.items():
        groups[group_of(name)]["us"] += k["us"]
        groups[group_of(name)]["calls"] += k["calls"]
    return dict(sorted(groups.items(), key=lambda item: -item[1]["us"]))


def step_cases(device: str, small: bool, kinds) -> dict:
    """kind -> (model, step(module), floor bytes, attention args (q, k, v, kind, q_pos)) for the chosen kinds."""
    cases = {}
    if "draft" in kinds:
        d = steps.shared_draft(device, small)
        attn = d.model.layers[0].self_attn
        floor = steps.weight_bytes(d.model) + steps.kv_bytes(d.cfg, d.ctx_cached + d.features.shape[1]
                                                             + d.block.shape[1], d.features.dtype)
        cases["draft"] = (d.model, d.step, floor, (attn, d.block_positions, "non_causal"))
    for kind in ("verify", "ar"):
        if kind in kinds:
            t = steps.shared_target(device, small)
            ids, positions = t.inputs[kind]
            floor = steps.weight_bytes(t.model) + steps.kv_bytes(t.cfg, t.ctx_cached + ids.shape[1],
                                                                 t.model.lm_head.weight.dtype)
            cases[kind] = (t.model, lambda module, kind=kind, t=t: t.step(module, kind), floor,
                           (t.model.model.layers[0].self_attn, positions, "causal"))
    return cases


def runtime_cases(device: str, small: bool, kinds) -> dict:
    """kind -> (the engine's CUDA-graphed step on a real turn's inputs, floor bytes), e2e.py's set-up."""
    from . import e2e

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target, draft, target_cfg, cfg = e2e._pair(device, dtype, small)
    b = cfg["block_size"]
    calls, ctx = e2e.runtime_steps(target, draft, e2e.random_prompt(target, device, small), b, device, kinds)
    floors = {"draft": steps.weight_bytes(draft) + steps.weight_bytes(target.lm_head)
              + steps.kv_bytes(cfg, ctx + b, dtype),
              "verify": steps.weight_bytes(target) + steps.kv_bytes(target_cfg, ctx + b, dtype),
              "ar": steps.weight_bytes(target) + steps.kv_bytes(target_cfg, ctx + 1, dtype)}
    floors["turn"] = floors["draft"] + floors["verify"]
    floors["draft_hidden"] = floors["draft"] - steps.weight_bytes(target.lm_head)
    return {kind: (call, floors[kind]) for kind, call in calls.items()}


def profile_step(kind, model, step, floor_bytes, backend, compiled, device, reps, ceilings, graphed=False) -> dict:
    fn = steps.no_grad(lambda: step(compiled))
    start = time.perf_counter()
    fn()                                    # compiles
    compile_s = time.perf_counter() - start
    run = fn if graphed else replayable(fn, device)
    us = timed_us(run, device, reps, host_ahead=kind != "turn")   # a turn's interval holds its host work
    kernels, profiled = profile(run, device, reps=5), "CUDA-graph replays" if device == "cuda" else "CPU ops"
    if not kernels:     # a profiler that does not see the kernels inside graphs: profile plain launches
        kernels, profiled = profile(fn, device, reps=5), "plain launches (no kernels seen in graph replays)"
    floor_us = floor_bytes / ceilings.copy_bytes_per_s * 1e6 if ceilings.copy_bytes_per_s else None
    return {"step": kind, "backend": backend, "step_us": us, "floor_us": floor_us, "compile_s": compile_s,
            "kernel_us": sum(k["us"] for k in kernels.values()),
            "launches": sum(k["calls"] for k in kernels.values()), "profiled": profiled, "groups": grouped(kernels),
            "kernels": dict(sorted(kernels.items(), key=lambda item: -item[1]["us"]))}


@contextmanager
def decode_config(fam: str, head_dim: int, **changes):
    """configs.TABLE's attention_decode row with `changes`, restored afterwards."""
    from torch_dflash.compiler.triton import configs

    key = f"attention_decode_hd{head_dim}"
    row = configs.TABLE[key][fam]
    configs.TABLE[key][fam] = {**row, **changes}
    try:
        yield
    finally:
        configs.TABLE[key][fam] = row


def attention_variants(step_kind, attn, positions, mask_kind, device, reps, ceilings) -> list[dict]:
    """The attention call of one step at its shapes, shipped config and the sweep; µs per call."""
    from torch_dflash.compiler.triton.attention import attention_triton
    from torch_dflash.compiler.triton.attention_common import family
    from torch_dflash.compiler.triton.attention_decode import attention_decode, decode_plan, multiprocessor_count

    from torch_dflash.compiler.triton.attention import supports

    k, v = attn.k_cache, attn.v_cache
    n_kv, head_dim = k.shape[1], k.shape[-1]
    n_q, sq = attn.q_proj.out_features // head_dim, positions.shape[1]
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, sq, n_q, head_dim, generator=g, device=device).to(k.dtype).transpose(1, 2)  # as the step's
    scale, fam, sms = head_dim ** -0.5, family(q.device), multiprocessor_count(q.device)
    if reason := supports(q, k, v, mask_kind, scale, q_pos=positions):
        print(f"\n== attention alone, {step_kind} shapes: the Triton provider declines: {reason}")
        return []
    caches = [(k.clone(), v.clone()) for _ in range(ATTENTION_REPEAT)]
    visible = int(positions.max()) + 1
    floor = (2 * visible * n_kv + 2 * sq * n_q) * head_dim * k.element_size()
    variants = [("shipped", {}, None)] + [(f"splits={n}", {}, n) for n in SPLITS] + \
        [(", ".join(f"{a}={b}" for a, b in tile.items()), tile, None) for tile in TILES]
    rows = []
    for name, tile, splits in variants:
        with decode_config(fam, head_dim, **tile):
            plan = decode_plan(1, n_q, n_kv, sq, k.shape[2], head_dim, k.dtype, fam, sms, splits)
            call = (lambda k, v: attention_triton(q, k, v, mask_kind, scale, q_pos=positions)) if splits is None \
                else (lambda k, v: attention_decode(q, k, v, mask_kind, scale, q_pos=positions, num_splits=splits))
            run = replayable(lambda: [call(*kv) for kv in caches], device)
            us = timed_us(run, device, reps) / ATTENTION_REPEAT
            kernels = grouped(profile(run, device, reps=3))
        rows.append({"step": step_kind, "variant": name, "plan": dataclasses.asdict(plan),
                     "us_per_call": us, "visible_keys": visible, "cache_len": k.shape[2],
                     "floor_us": floor / ceilings.copy_bytes_per_s * 1e6 if ceilings.copy_bytes_per_s else None,
                     "kernel_us_per_call": {g: x["us"] / ATTENTION_REPEAT for g, x in kernels.items()}})
    return rows


def print_step(row: dict, top: int = 15) -> None:
    floor = f", floor {row['floor_us'] / 1e3:.2f} ms ({row['step_us'] / row['floor_us']:.2f}× floor)" \
        if row["floor_us"] else " (CPU: nothing meaningful timed)"
    goal = f", goal {GOALS_MS[row['step']]} ms" if row["step"] in GOALS_MS else ""
    print(f"\n== {row['step']} step, backend={row['backend']}: {row['step_us'] / 1e3:.3f} ms per replay{goal}"
          f"{floor}; kernels {row['kernel_us'] / 1e3:.3f} ms in {row['launches']:.0f} "
          f"launches, profiled over {row['profiled']} (compile {row['compile_s']:.0f} s)")
    print(f"  {'group':<28} {'µs/step':>9} {'launches':>9} {'share':>6}")
    for group, g in row["groups"].items():
        print(f"  {group:<28} {g['us']:9.1f} {g['calls']:9.0f} {g['us'] / row['kernel_us']:6.1%}")
    print(f"  top {top} kernels: {'µs/step':>9} {'launches':>9} {'µs/launch':>10}  name")
    for name, k in list(row["kernels"].items())[:top]:
        print(f"  {'':17}{k['us']:9.1f} {k['calls']:9.0f} {k['us'] / k['calls']:10.2f}  {name[:90]}")


def print_attention(rows: list[dict]) -> None:
    first = rows[0]
    floor = f", floor {first['floor_us']:.2f} µs (visible K+V + q + out bytes)" if first["floor_us"] else ""
    print(f"\n== attention alone, {first['step']} shapes: {first['visible_keys']} visible keys in a cache of "
          f"{first['cache_len']}{floor}; {ATTENTION_REPEAT} calls per CUDA graph")
    print(f"  {'variant':<34} {'grid':>9} {'block_m×n':>10} {'warps/stages':>12} {'µs/call':>8}  kernels µs/call")
    for r in rows:
        p = r["plan"]
        split = ", ".join(f"{g.removeprefix('attention: ')} {us:.2f}" for g, us in r["kernel_us_per_call"].items())
        print(f"  {r['variant']:<34} {str(tuple(p['grid'])):>9} {p['block_m']:>4}×{p['block_n']:<5} "
              f"{p['num_warps']:>6}/{p['num_stages']:<5} {r['us_per_call']:8.2f}  {split}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "profile-out"))
    parser.add_argument("--steps", default="draft,verify,ar")
    parser.add_argument("--backends", default="dflash,inductor")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--runtime", action="store_true", help="the runtime's default steps (backend 'runtime')")
    parser.add_argument("--small", action="store_true", help="tiny shapes on CPU (smoke)")
    parser.add_argument("--no-pdl", action="store_true", help="build the steps without programmatic dependent "
                        "launch: per-kernel times that do not overlap")
    args = parser.parse_args(argv)
    from torch_dflash.compiler.triton import configs, launch

    if args.no_pdl:
        configs.TABLE["programmatic_launch"] = {fam: {**row, "on": 0}
                                                for fam, row in configs.TABLE["programmatic_launch"].items()}
    device = "cpu" if args.small else "cuda"
    kinds, backends = args.steps.split(","), args.backends.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = {"env": harness.environment(device), "command": harness.command_line("profile_steps", argv),
              "steps": [], "attention": []}
    ceilings = harness.measure_ceilings(device)
    result["ceilings"] = ceilings.__dict__
    save = lambda: (out / "profile_steps.json").write_text(json.dumps(result, indent=1))  # noqa: E731
    result["programmatic_launch"] = launch.programmatic_launch(torch.device(device))["PDL"]
    pdl = "on: kernel intervals overlap (--no-pdl for per-kernel times)" if result["programmatic_launch"] else "off"
    print(f"{result['env']}; copy bandwidth {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s; programmatic dependent "
          f"launch {pdl}")
    if args.runtime:
        for kind, (call, floor) in runtime_cases(device, args.small, kinds).items():
            row = profile_step(kind, None, lambda _: call(), floor, "runtime", None, device, args.reps, ceilings,
                               graphed=True)
            result["steps"].append(row)
            print_step(row)
            save()
        return result
    compiled = {}
    for kind, (model, step, floor, attention_args) in step_cases(device, args.small, kinds).items():
        if id(model) not in compiled:
            compiled[id(model)] = steps.compile_backends(model, args.small)
        for backend in backends:
            row = profile_step(kind, model, step, floor, backend, compiled[id(model)][backend], device, args.reps,
                               ceilings)
            result["steps"].append(row)
            print_step(row)
            print(f"  [{time.perf_counter() - began:.0f} s]", flush=True)
            save()
        rows = attention_variants(kind, *attention_args, device, args.reps, ceilings)
        if rows:
            result["attention"] += rows
            print_attention(rows)
            print(f"  [{time.perf_counter() - began:.0f} s]", flush=True)
            save()
    result["elapsed_s"] = time.perf_counter() - began
    save()
    return result


if __name__ == "__main__":
    main()
