"""Times benchmark cases: ceilings first (copy bandwidth, bf16 matmul rate), then every case's variants beside
its floor, with ratios to the floor and to inductor from the same run.

Method: correctness check before timing (on input set 0); warm-up; CUDA events around each call, or around a
CUDA-graph replay for launch-bound cases — for kernel cases (`Case.graph_calls`) a graph of many calls back to back,
timed per call, as a kernel runs inside a step's graph; the median of `reps` (>= 50) calls or replays; fresh random
inputs made by the case (never zeros). A case with a `Rotation` gets as many input sets as make every timed call
read data that is not in L2 (the bytes a call reads × sets >= 2 × L2, <= 1 GiB in all), and the calls (or the CUDA
graphs, one per set) cycle through them. A `smoke` run (CPU, tiny shapes) executes every variant once and times
nothing meaningful: it keeps the harness from rotting in CI.
"""

import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .case import Case, Rotation

H100_L2_BYTES = 50 * 2**20
SMOKE_L2_BYTES = 64 * 2**10
ROTATION_CAP_BYTES = 2**30


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


class Clock:
    """Wall time since the start and of each stage since the previous one: the progress lines and bench.json's
    time log."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: list[dict] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self, what: str) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.laps.append({"what": what, "s": round(seconds, 2)})
        return seconds


HOST_LEAD_CYCLES = 2_000_000   # the GPU-side sleep in front of a host-ahead call: ≈ 1 ms at an H100's 1980 MHz
MAX_LEAD_CYCLES = 64_000_000   # ≈ 32 ms: the longest lead a call is retried with


def _cuda_time_ms(fn, reps: int, host_ahead: bool = False) -> list[float]:
    """ms of each of `reps` calls of fn between two CUDA events. With `host_ahead` each call sits behind a GPU-side
    sleep queued first, so that its host work (argument copies, the graph's launch) is submitted before the GPU
    reaches the start event: the call's GPU time, as inside the runtime's loop, where a step is queued while the
    one before it runs. Checked per call: the start event must still be pending once fn has returned; a call that
    outran its lead is timed again behind a lead twice as long (up to MAX_LEAD_CYCLES, after which its time, idle
    GPU included, is kept: never less than its GPU time). Without `host_ahead` the time includes the host's launch
    latency (≈ 45 µs for the runtime's draft step)."""
    times, lead = [], HOST_LEAD_CYCLES
    while len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if host_ahead:
            torch.cuda._sleep(lead)
        start.record()
        fn()
        outran = host_ahead and start.query()
        end.record()
        end.synchronize()
        if outran and lead < MAX_LEAD_CYCLES:
            lead *= 2
            continue
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


def _cycle(calls):
    """One callable that makes the next of `calls` on each call, round and round."""
    if len(calls) == 1:
        return calls[0]
    order = itertools.cycle(calls)
    return lambda: next(order)()


def _graphed(fn, rotation: Rotation | None = None, calls: int = 1):
    """CUDA graphs replaying fn, replayed in turn. calls == 1: one graph per input set of the rotation (each
    captures its set's tensors); calls > 1: ONE graph of max(calls, sets) calls back to back, each on the next set,
    so a replay's launch latency is spread over its calls (`calls_per_replay`). Warmed up
    on a side stream first, as torch requires, on every set (nothing compiles or allocates lazily inside a
    capture); the graphs share one memory pool and replay in capture order, as sharing requires."""
    count = len(rotation.sets) if rotation else 1
    select = rotation.use if rotation else (lambda index: None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for index in [0, 0, *range(count)]:
            select(index)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    per_graph = [[index] for index in range(count)] if calls == 1 else [
        [index % count for index in range(calls_per_replay(calls, rotation))]]
    graphs = []
    for indices in per_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graphs[0].pool() if graphs else None):
            for index in indices:
                select(index)
                fn()
        graphs.append(graph)
    return _cycle([graph.replay for graph in graphs])


def calls_per_replay(graph_calls: int, rotation: Rotation | None) -> int:
    """Calls in each CUDA graph `_graphed` captures: 1, or max(graph_calls, input sets)."""
    return 1 if graph_calls == 1 else max(graph_calls, len(rotation.sets) if rotation else 1)


def _rotating(fn, rotation: Rotation | None):
    """fn on input set 0, 1, ..., n-1, 0, ... on successive calls (fn itself without a rotation)."""
    if rotation is None:
        return fn

    def on_set(index):
        def call():
            rotation.use(index)
            return fn()
        return call
    return _cycle([on_set(index) for index in range(len(rotation.sets))])


def time_variant(fn, device: str, reps: int, use_graph: bool, rotation: Rotation | None = None,
                 graph_calls: int = 1, per_call: int = 1, host_ahead: bool = False) -> tuple[float, bool]:
    """Median µs of fn over `reps` calls (or graph replays of `graph_calls` calls, per call) over `per_call` (the
    iterations one call runs), cycling through the rotation's input sets, each call behind a GPU-side lead with
    `host_ahead` (`_cuda_time_ms`); (value, whether CUDA graphs were used). On CPU (smoke) nothing is warmed up and
    the time means nothing."""
    us, graphed = _time_variant(fn, device, reps, use_graph, rotation, graph_calls, host_ahead)
    return us / per_call, graphed


def _time_variant(fn, device, reps, use_graph, rotation, graph_calls, host_ahead=False) -> tuple[float, bool]:
    plain = _rotating(fn, rotation)
    try:
        if device != "cuda":
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                plain()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e6, False
        for _ in range(max(5, len(rotation.sets) if rotation else 0)):
            plain()
        run, graphed, per_replay = plain, False, 1
        if use_graph:
            try:
                run, graphed = _graphed(fn, rotation, graph_calls), True
                per_replay = calls_per_replay(graph_calls, rotation)
            except Exception:  # noqa: BLE001 — a variant that cannot be captured is timed as plain launches
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return statistics.median(_cuda_time_ms(run, reps, host_ahead)) * 1e3 / per_replay, graphed
    finally:
        if rotation is not None:
            rotation.use(0)


def l2_bytes(device: str) -> int:
    """The device's L2 cache (CUDA's L2_cache_size where torch reports it, else an H100's 50 MB). On CPU (smoke)
    a pretend 64 KiB, so that tiny cases rotate too and the smoke run exercises that path."""
    if device != "cuda":
        return SMOKE_L2_BYTES
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(properties, "L2_cache_size", 0) or H100_L2_BYTES


def rotation_count(set_bytes: int, call_bytes: int, l2: int, cap: int = ROTATION_CAP_BYTES) -> int:
    """Input sets that make every timed call read cold data: the bytes one call reads (its floor bytes, at most a
    whole set) times the sets reach 2 × L2; all sets together stay within `cap`; at least one."""
    per_call = max(1, min(set_bytes, call_bytes or set_bytes))
    return max(1, min(-(-2 * l2 // per_call), cap // max(1, set_bytes)))


def floor_us(case: Case, ceilings: Ceilings) -> float | None:
    if not ceilings.copy_bytes_per_s:
        return None
    return max(case.floor_bytes / ceilings.copy_bytes_per_s, case.floor_flops / ceilings.bf16_flops_per_s) * 1e6


def _rotate(case: Case, l2: int) -> None:
    rotation = case.rotation
    if rotation is None:
        return
    size = rotation.set_bytes()
    count = rotation_count(size, case.floor_bytes, l2)
    if count > 1:
        rotation.grow(count)
        case.notes = f"inputs rotate over {count} sets of {size / 1e6:.3g} MB (L2 {l2 / 1e6:.3g} MB); {case.notes}"


def run_case(case: Case, ceilings: Ceilings, device: str, reps: int, l2: int, clock: Clock, log=print) -> list[Row]:
    """Check, then time every variant of one case; its extra input sets are dropped afterwards."""
    _rotate(case, l2)
    try:
        found = case.check()
        if isinstance(found, str):  # a check may say what it measured (e.g. distances to the reference)
            case.notes = f"{found}; {case.notes}"
    except AssertionError as error:  # keep timing, but the table says the numbers are of a wrong result
        case.notes = f"CHECK FAILED: {error}; " + case.notes
        log(f"  {case.name}: check failed: {error}")
    checked_s = clock.lap(f"{case.suite} / {case.name}: build + check")
    floor = floor_us(case, ceilings)
    timings, synchronous = {}, {}
    for variant, fn in case.variants.items():
        try:
            timings[variant] = time_variant(fn, device, reps, case.use_cuda_graph, case.rotation, case.graph_calls,
                                            case.per_call, case.host_ahead)
            if case.host_ahead:
                synchronous[variant] = time_variant(fn, device, reps, case.use_cuda_graph, case.rotation,
                                                    case.graph_calls, case.per_call)[0]
        except Exception as error:  # noqa: BLE001 — report the failure in the table, keep going
            timings[variant] = (None, False)
            log(f"  {case.name} / {variant}: failed: {type(error).__name__}: {error}")
    if synchronous:
        case.notes = ("timed with the host ahead (harness._cuda_time_ms, checked per call); as one synchronous "
                      "call, host launch included: " + ", ".join(f"{v} {us:.1f} µs" for v, us in synchronous.items())
                      + f"; {case.notes}")
    if case.rotation is not None:
        case.rotation.shrink()
    timed_s = clock.lap(f"{case.suite} / {case.name}: timing")
    inductor = timings.get("inductor", (None, False))[0]
    rows = [Row(case.suite, case.name, variant, us, floor, us / floor if us and floor else None,
                inductor / us if us and inductor else None, graph, case.notes)
            for variant, (us, graph) in timings.items()]
    log(f"  [{clock.elapsed:4.0f} s] {case.name} (check {checked_s:.1f} s, timing {timed_s:.1f} s): "
        + ", ".join(f"{v} {t[0]:.1f} µs" for v, t in timings.items() if t[0]))
    return rows


def markdown(rows: list[Row], ceilings: Ceilings, header: str, not_run: tuple[str, ...] | list[str] = ()) -> str:
    """The table; a case's notes are shown on its first row only (bench.json has them on every row)."""
    lines = [header, "",
             f"Ceilings measured in this run: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read + write), "
             f"bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s." if ceilings.copy_bytes_per_s else
             "Smoke run on CPU: nothing meaningful is timed, no floors are given, and the step cases' compiled "
             "variants skip Inductor's code generation (inductor runs as aot_eager, dflash with inductor=False).", ""]
    lines += [f"Not run: {', '.join(not_run)}.", ""] if not_run else []
    lines += ["| suite | case | variant | median µs | floor µs | × floor | inductor / this | CUDA graph | notes |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    previous = None
    for r in rows:
        notes, previous = (r.notes if (r.suite, r.case) != previous else ""), (r.suite, r.case)
        lines.append(f"| {r.suite} | {r.case} | {r.variant} | {fmt(r.median_us, '.1f')} | {fmt(r.floor_us, '.1f')} | "
                     f"{fmt(r.vs_floor, '.2f')} | {fmt(r.vs_inductor, '.2f')} | {'yes' if r.graph else 'no'} | {notes} |")
    return "\n".join(lines)


def command_line(module: str, argv) -> str:
    """How a benchmark module was run: its -m line with the arguments given (argv None: the process's own)."""
    return f"python -m torch_dflash.benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def environment(device: str) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(out_dir: Path, rows: list[Row], ceilings: Ceilings, env: dict, command: str, run: dict) -> str:
    """bench.json (rows, ceilings, environment and `run`: L2, budget, wall time, time log, what did not run) and
    bench.md; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"`{command}` — {env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
    table = markdown(rows, ceilings, header, run.get("not_run", ()))
    (out_dir / "bench.json").write_text(json.dumps({"env": env, "command": command, "ceilings": asdict(ceilings),
                                                    "run": run, "rows": [asdict(r) for r in rows]}, indent=1))
    (out_dir / "bench.md").write_text(table + "\n")
    return table
