"""The two step functions an engine runs, from eager modules or exported programs, optionally CUDA-graphed.

draft(context_features [B, b, F], context_positions [B, b], block_ids [B, b], block_positions [B, b])
    -> logits [B, b-1, V];  verify(block_ids [B, b], positions [B, b]) -> (logits [B, b, V], features [B, b, F]).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify

from .device import CUDAGraphStep, graph_pool


def identity_compile(graph_module, kind):
    """The default `compile_step` hook: run the exported graph module as it is."""
    return graph_module


@dataclass
class Steps:
    draft: Callable
    verify: Callable
    caches: list  # every KV cache tensor the steps write (rows are moved when the engine compacts its batch)


def _caches(*modules):
    return [buf for m in modules for name, buf in m.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def build_steps(target, draft, *, executor, block_size, max_batch, cuda_graphs, compile_step=None) -> Steps:
    """executor "eager": DraftStep / VerifyStep; "exported": capture_draft / capture_verify programs (`.module()`)
    passed through `compile_step(graph_module, "draft" | "verify") -> callable` (which must keep writing the
    graph module's cache buffers in place). cuda_graphs: wrap both in `CUDAGraphStep` (CUDA only)."""
    if executor == "eager":
        draft_module, verify_module = DraftStep(target, draft), VerifyStep(target)
        draft_fn, verify_fn = draft_module, verify_module
    else:
        compile_step = compile_step or identity_compile
        draft_module = capture_draft(target, draft, max_batch=max_batch, block_size=block_size).module()
        verify_module = capture_verify(target, block_size=block_size, max_batch=max_batch).module()
        draft_fn, verify_fn = compile_step(draft_module, "draft"), compile_step(verify_module, "verify")
    if cuda_graphs:
        pool = graph_pool()
        draft_fn, verify_fn = CUDAGraphStep(draft_fn, pool), CUDAGraphStep(verify_fn, pool)
    return Steps(draft_fn, verify_fn, _caches(draft_module, verify_module))
