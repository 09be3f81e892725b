"""dflash.silu_mul — SwiGLU's gate: silu(gate) · up in one op.

In a SwiGLU MLP (Llama, Qwen3, the DFlash draft) `down(silu(gate(x)) * up(x))`: two pointwise kernels between the
merged gate|up GEMM and down, each re-reading the [T, I] activations (strided halves of the merged output).
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError


def _check(gate: Tensor, up: Tensor) -> None:
    if isinstance(gate, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, gate.shape == up.shape and gate.dtype == up.dtype,
                      lambda: f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                              "must have one shape and dtype.")


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up computed in fp32, stored once in gate's dtype, contiguous."""
    _check(gate, up)
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype).contiguous()


@torch.library.custom_op("dflash::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return silu_mul_reference(gate, up)


@silu_mul.register_fake
def _(gate, up):
    _check(gate, up)
    return gate.new_empty(gate.shape)
