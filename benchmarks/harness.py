"""Times benchmark cases: ceilings first (copy bandwidth, bf16 matmul rate), then every case's variants beside
its floor, with ratios to the floor and to inductor from the same run.

Method: correctness check before timing; warm-up; CUDA events around each call, or around a CUDA-graph replay
for launch-bound cases; median of >= 50 repetitions; fresh random inputs made by the case (never zeros).
A `smoke` run (CPU, tiny shapes) executes every variant once and times nothing meaningful: it keeps the harness
from rotting in CI.
"""

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .case import Case


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    bf16_flops_per_s: float


@dataclass
class Row:
    suite: str
    case: str
    variant: str
    median_us: float | None
    floor_us: float | None
    vs_floor: float | None
    vs_inductor: float | None
    graph: bool
    notes: str


def _cuda_time_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure_ceilings(device: str) -> Ceilings:
    """Device-to-device copy of 2 GiB (bytes read + written) and an 8192³ bf16 matmul on random data."""
    if device != "cuda":
        return Ceilings(0.0, 0.0)  # not measured: floors are shown as "—"
    src = torch.randn(2**29, device=device)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(_cuda_time_ms(lambda: dst.copy_(src), 20))
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.mm(a, b)
    mm_ms = statistics.median(_cuda_time_ms(lambda: torch.mm(a, b), 20))
    del src, dst, a, b
    return Ceilings(2 * 2**29 * 4 / (copy_ms * 1e-3), 2 * 8192**3 / (mm_ms * 1e-3))


def _graphed(fn):
    """A CUDA graph replaying fn (warmed up on a side stream first, as torch requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_variant(fn, device: str, reps: int, use_graph: bool) -> tuple[float, bool]:
    """Median µs of fn; (value, whether a CUDA graph was used)."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6, False
    for _ in range(5):
        fn()
    graphed = False
    if use_graph:
        try:
            fn, graphed = _graphed(fn), True
        except Exception:  # noqa: BLE001 — a variant that cannot be captured is timed as plain launches
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(_cuda_time_ms(fn, reps)) * 1e3, graphed


def floor_us(case: Case, ceilings: Ceilings) -> float | None:
    if not ceilings.copy_bytes_per_s:
        return None
    return max(case.floor_bytes / ceilings.copy_bytes_per_s, case.floor_flops / ceilings.bf16_flops_per_s) * 1e6


def run_cases(cases: list[Case], ceilings: Ceilings, device: str, reps: int = 100, log=print) -> list[Row]:
    rows = []
    for case in cases:
        try:
            found = case.check()
            if isinstance(found, str):  # a check may say what it measured (e.g. distances to the reference)
                case.notes = f"{found}; {case.notes}"
        except AssertionError as error:  # keep timing, but the table says the numbers are of a wrong result
            case.notes = f"CHECK FAILED: {error}; " + case.notes
            log(f"  {case.name}: check failed: {error}")
        floor = floor_us(case, ceilings)
        timings = {}
        for variant, fn in case.variants.items():
            try:
                timings[variant] = time_variant(fn, device, reps, case.use_cuda_graph)
            except Exception as error:  # noqa: BLE001 — report the failure in the table, keep going
                timings[variant] = (None, False)
                log(f"  {case.name} / {variant}: failed: {type(error).__name__}: {error}")
        inductor = timings.get("inductor", (None, False))[0]
        for variant, (us, graph) in timings.items():
            rows.append(Row(case.suite, case.name, variant, us, floor,
                            us / floor if us and floor else None,
                            inductor / us if us and inductor else None, graph, case.notes))
        log(f"  {case.name}: " + ", ".join(f"{v} {t[0]:.1f} µs" for v, t in timings.items() if t[0]))
    return rows


def markdown(rows: list[Row], ceilings: Ceilings, header: str) -> str:
    lines = [header, "",
             f"Ceilings measured in this run: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read + write), "
             f"bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s." if ceilings.copy_bytes_per_s else
             "Smoke run on CPU: nothing meaningful is timed and no floors are given.", "",
             "| suite | case | variant | median µs | floor µs | × floor | inductor / this | CUDA graph | notes |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r.suite} | {r.case} | {r.variant} | {fmt(r.median_us, '.1f')} | {fmt(r.floor_us, '.1f')} | "
                     f"{fmt(r.vs_floor, '.2f')} | {fmt(r.vs_inductor, '.2f')} | {'yes' if r.graph else 'no'} | {r.notes} |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(out_dir: Path, rows: list[Row], ceilings: Ceilings, env: dict, command: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"`{command}` — {env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
    table = markdown(rows, ceilings, header)
    (out_dir / "bench.json").write_text(json.dumps({"env": env, "command": command, "ceilings": asdict(ceilings),
                                                    "rows": [asdict(r) for r in rows]}, indent=1))
    (out_dir / "bench.md").write_text(table + "\n")
    return table
