"""How our kernels are launched: traced or not, and after the previous kernel of the stream.

`wrap_triton(kernel)`: `torch.library.wrap_triton(kernel)` while torch traces the call (a triton_op being
decomposed for Inductor, make_fx, export: a dispatch mode is active), so the launch becomes a graph node Inductor
compiles; the kernel itself in eager calls, where the traceable wrapper would dispatch a higher-order op per
launch — host time that shows as soon as a call is not CUDA-graphed (the mHC kernel at T 4096 went from 575 to
812 µs). Named `wrap_triton` because torch finds a triton_op's kernels (its cache key) by scanning the source for
calls of that name.

Programmatic dependent launch (sm_90+, configs.TABLE["programmatic_launch"]): a kernel launched with
`**programmatic_launch(device)` may start while the previous kernel of the stream finishes. Every kernel takes a
`PDL` constexpr and calls `await_previous_grid(PDL)` before its first access to memory: the grid may be resident
while the previous one drains, but it reads and writes nothing until that grid has completed and its writes are
visible. Each waited grid completed entirely, so the order holds through kernels launched without it (ATen's,
cuBLAS's: they start after the previous kernel as always).

    before: [GEMM ·······]  launch  [norm]  launch  [GEMM ·······]
    after:  [GEMM ·······][norm][GEMM ·······]      each grid launched while its predecessor drains,
                                                    waiting at griddepcontrol.wait
"""

import functools

import torch
import triton
import triton.language as tl

from .configs import launch_config


def traced() -> bool:
    """Whether torch is tracing this call (a dispatch mode is active: functionalization, fake tensors, make_fx)
    rather than running it on real tensors."""
    return torch._C._len_torch_dispatch_stack() > 0


def wrap_triton(kernel):
    return torch.library.wrap_triton(kernel) if traced() else kernel


@functools.cache
def device_facts(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, SM or CU count) of GPU `index`, asked once: the one place kernels learn them."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def programmatic(family: str, sm: int) -> bool:
    """The rule (configs.TABLE["programmatic_launch"]): NVIDIA ('cuda' family) at compute capability >= min_sm,
    with the row on."""
    row = launch_config("programmatic_launch", family)
    return family == "cuda" and bool(row["on"]) and sm >= row["min_sm"]


def programmatic_launch(device: torch.device) -> dict:
    """The launch arguments for `device`: {"PDL": True, "launch_pdl": True} where `programmatic` allows it and
    nothing traces (torch's traceable launch takes no launch options), else {"PDL": False} (ROCm, older GPUs,
    the CPU interpreter)."""
    if device.type != "cuda" or torch.version.hip or traced():
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = device_facts(index)[0]
    return {"PDL": True, "launch_pdl": True} if programmatic("cuda", 10 * major + minor) else {"PDL": False}


@triton.jit
def await_previous_grid(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel of the stream has completed and its writes are visible, then let
    the next kernel's programs launch (they wait in turn). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (NVIDIA `prefetch.global.L2`; nothing comes back). Meant for memory
    no kernel of the step writes (weights), issued before `await_previous_grid`: the lines arrive while the
    previous kernel drains, and the loads after the wait hit L2."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
