"""Ascend providers of every dflash op (target "ascend"): run the op's Ascend lowering on torch_npu /
sgl_kernel_npu. Importing this module registers them; nothing here imports torch_npu until a call needs it."""

import functools
import importlib.util
from types import SimpleNamespace

import torch

from ..ops import OP_NAMES
from ..providers import Provider, register
from .codegen import bind, compile_module, module_source, render_function
from .lowerings import Lowered, Operand, lower

TORCH_NPU_OPS = ("npu_fused_infer_attention_score", "npu_rms_norm", "npu_add_rms_norm", "npu_swiglu",
                 "npu_apply_rotary_pos_emb", "npu_rotary_mul")


@functools.lru_cache(maxsize=None)
def hardware_namespace() -> SimpleNamespace:
    """The real ops under the names generated code calls: torch_npu's, plus sgl_kernel_npu's
    split_qkv_rmsnorm_rope when that package is installed."""
    import torch_npu

    npu = SimpleNamespace(**{name: getattr(torch_npu, name) for name in TORCH_NPU_OPS})
    if importlib.util.find_spec("sgl_kernel_npu") is not None:
        from sgl_kernel_npu.norm.split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope
        npu.split_qkv_rmsnorm_rope = split_qkv_rmsnorm_rope
    return npu


def _lowered(op: str, args: tuple, kwargs: dict) -> tuple[dict[str, Operand], Lowered]:
    operands = {n: Operand(n, v, isinstance(v, torch.Tensor)) for n, v in bind(op, args, kwargs).items()}
    return operands, lower(op, operands)


def run_op(op: str, npu, *args, **kwargs):
    """torch.ops.dflash.<op>(*args, **kwargs) through its Ascend lowering, calling the fused ops on `npu`."""
    operands, lowered = _lowered(op, args, kwargs)
    name = f"ascend_{op}"
    scope = compile_module(module_source("", False, [render_function(name, operands, lowered)], name))
    return scope["build"](npu)(*(o.value for o in operands.values() if o.runtime))


def run_on_hardware(op: str, *args, **kwargs):
    return run_op(op, hardware_namespace(), *args, **kwargs)


def supports(op: str, *args, **kwargs) -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed"
    _, lowered = _lowered(op, args, kwargs)
    if lowered.fallback:
        return lowered.fallback
    missing = sorted(name for name in lowered.npu_ops if not hasattr(hardware_namespace(), name))
    return f"{missing[0]} is unavailable (sgl_kernel_npu is not installed)" if missing else None


for _op in OP_NAMES:
    register(Provider(_op, "npu", ("ascend",), functools.partial(run_on_hardware, _op), priority=10,
                      supports=functools.partial(supports, _op)))
