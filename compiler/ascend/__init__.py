"""Ascend (NPU) lowering: codegen of dflash graphs to torch_npu / sgl_kernel_npu fused ops, a CPU emulation of
those ops built from their documentation, and the "ascend" providers (registered on import)."""

from . import emulation
from .codegen import generate_ascend_module, load_generated
from .providers import hardware_namespace, run_op

__all__ = ["emulation", "generate_ascend_module", "hardware_namespace", "load_generated", "run_op"]
