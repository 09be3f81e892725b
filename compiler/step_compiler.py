"""The runtime's `compile_step` hook that makes captured steps pass-optimized, lowered programs (the engine's
default):

exported step (ep.module()) ─ pass pipeline ─ lowering for the target ─▶ the same GraphModule, rewritten in
place (it keeps its KV-cache buffers, which the runtime writes and compacts), with a CompileReport per step.
"""

import torch

from torch_dflash.passes.pipeline import default_pass_manager

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
