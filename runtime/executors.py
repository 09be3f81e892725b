"""The two step functions an engine runs, from eager modules or exported programs, optionally CUDA-graphed.

draft(context_features [B, b, F], context_positions [B, b], block_ids [B, b], block_positions [B, b])
    -> logits [B, b-1, V];  verify(block_ids [B, b], positions [B, b]) -> (logits [B, b, V], features [B, b, F]).
"""

from dataclasses import dataclass, field
from typing import Callable

from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import device_target, inductor_compile_step, pipeline_compile_step

from .checks import INDUCTOR, PIPELINE
from .device import CUDAGraphStep, graph_pool


@dataclass
class Steps:
    draft: Callable
    verify: Callable
    caches: list  # every KV cache tensor the steps write (rows are moved when the engine compacts its batch)
    reports: dict = field(default_factory=dict)  # "draft" / "verify" -> CompileReport, when the hook made them


def cache_buffers(*modules):
    """The KV cache tensors of modules (the models' names: ...k_cache / ...v_cache)."""
    return [buf for m in modules for name, buf in m.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def _as_captured(graph_module, kind):
    return graph_module


def build_steps(target, draft, *, executor, block_size, max_batch, compile_step=PIPELINE) -> Steps:
    """executor "eager": DraftStep / VerifyStep; "exported": capture_draft / capture_verify programs (`.module()`)
    passed through `compile_step(graph_module, "draft" | "verify") -> callable` (which must keep writing the
    graph module's cache buffers in place). compile_step "pipeline": `pipeline_compile_step` for the models'
    device (its CompileReports go to Steps.reports); "inductor": `inductor_compile_step` for that device (the
    same, then torch.compile with Inductor); None: the programs run as captured."""
    if executor == "eager":
        draft_module, verify_module = DraftStep(target, draft), VerifyStep(target)
        return Steps(draft_module, verify_module, cache_buffers(draft_module, verify_module))
    if compile_step in (PIPELINE, INDUCTOR):
        hook = pipeline_compile_step if compile_step == PIPELINE else inductor_compile_step
        compile_step = hook(device_target(next(target.parameters()).device))
    compile_step = compile_step or _as_captured
    draft_module = capture_draft(target, draft, max_batch=max_batch, block_size=block_size).module()
    verify_module = capture_verify(target, block_size=block_size, max_batch=max_batch).module()
    return Steps(compile_step(draft_module, "draft"), compile_step(verify_module, "verify"),
                 cache_buffers(draft_module, verify_module), getattr(compile_step, "reports", {}))


def with_cuda_graphs(steps: Steps) -> Steps:
    """Both steps replayed from CUDA graphs (one per batch size, `CUDAGraphStep`) sharing one memory pool."""
    pool = graph_pool()
    return Steps(CUDAGraphStep(steps.draft, pool), CUDAGraphStep(steps.verify, pool), steps.caches, steps.reports)
