"""The runtime's `compile_step` hooks that make captured steps pass-optimized, lowered programs (the engine's
default) and, opt-in, Inductor-compiled ones:

exported step (ep.module()) ─ pass pipeline ─ lowering for the target ─▶ the same GraphModule, rewritten in
place (it keeps its KV-cache buffers, which the runtime writes and compacts), with a CompileReport per step
─ torch.compile(backend="inductor") ─▶ (inductor hook only) that module compiled, writing the same buffers.

`plain_compile_step` skips our passes and lowering: the captured step straight under torch.compile — what
Inductor alone makes of the same program (benchmarks/e2e.py's "inductor" peer).
"""

import torch

from torch_dflash.passes.pipeline import default_pass_manager, skipped_before_inductor

from . import lowering, report


def device_target(device) -> str:
    """The lowering target of models on `device`: cuda or rocm (ROCm GPUs are 'cuda' in torch), ascend for an
    npu, else cpu — the models' device decides, not what the machine has (CPU models on a GPU host stay cpu)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "ascend" if kind == "npu" else "cpu"


def pipeline_compile_step(target: str = "auto", disabled=(), keep_snapshots: bool = False):
    """A `compile_step(graph_module, kind)` for `DFlashEngine` / `td.generate`; the reports go to `reports`."""
    resolved = lowering.resolve_target(target)
    reports: dict[str, report.CompileReport] = {}

    def compile_step(graph_module, kind):
        pipeline = default_pass_manager(disabled=disabled, keep_snapshots=keep_snapshots).run(graph_module)
        choices = lowering.lower(graph_module, resolved)
        reports[kind] = report.CompileReport.build(resolved, pipeline, choices, graph=kind)
        report.record(reports[kind])
        return graph_module

    compile_step.reports = reports
    return compile_step


def _compiled(step, backend: str):
    return torch.compile(step, backend=backend, fullgraph=True, dynamic=None)


def inductor_compile_step(target: str = "auto", disabled=(), keep_snapshots: bool = False,
                          backend: str = "inductor"):
    """`pipeline_compile_step`, then the rewritten graph module under `torch.compile(backend="inductor",
    fullgraph=True)`: Inductor fuses the ATen ops between our kernels (norms, SwiGLU, residual adds, cache
    writes). Compiles lazily on the first call of each batch size — the engine's warm-up runs, before any CUDA
    graph capture. dynamic=None (automatic): the first batch size compiles static, a second one recompiles with
    only the changed dims (the batch) dynamic, and batch 1 is specialised — at most 3 compiles per step, under
    dynamo's recompile limit (8). `backend` = "aot_eager" skips Inductor's code generation (CPU smoke runs).
    The passes of INDUCTOR_FUSES are skipped: Inductor fuses those ops with their neighbours itself."""
    pipeline = pipeline_compile_step(target, skipped_before_inductor(disabled), keep_snapshots)

    def compile_step(graph_module, kind):
        return _compiled(pipeline(graph_module, kind), backend)

    compile_step.reports = pipeline.reports
    return compile_step


def plain_compile_step(backend: str = "inductor"):
    """The captured step as it is — no passes, no lowering — under torch.compile(backend=…, fullgraph=True),
    lazily and dynamic=None like `inductor_compile_step` (so on CUDA it compiles in the engine's graph warm-up,
    before capture). The graph module writes its cache buffers in place (index_put_), and so does the compiled
    step. No CompileReport: none of our passes ran."""
    def compile_step(graph_module, kind):
        return _compiled(graph_module, backend)

    return compile_step
