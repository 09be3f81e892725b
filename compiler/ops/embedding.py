"""dflash.embedding_rms_norm — the token embedding gather and the RMSNorm that reads it, in one op.

A decoder's first layer normalizes the step's token embeddings (its input_layernorm) and also reads them as the
residual: `embeds = W[ids]; normed = rms_norm(embeds, w, eps)`. One op returns both, so that a kernel gathers
each row once and normalizes it while it holds it.
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

from .norm_rope import rms_norm_reference


def _check(weight: Tensor, ids: Tensor, norm_weight: Tensor | None) -> None:
    if isinstance(weight, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, weight.dim() == 2,
                      lambda: f"embedding_rms_norm: weight must be [V, H], got {tuple(weight.shape)}.")
    torch._check_with(InputError, ids.dtype in (torch.int32, torch.int64),
                      lambda: f"embedding_rms_norm: ids must be int32 or int64, got {ids.dtype}.")
    if norm_weight is not None:
        torch._check_with(InputError, norm_weight.dim() == 1 and norm_weight.shape[0] == weight.shape[1],
                          lambda: f"embedding_rms_norm: norm_weight must be [{weight.shape[1]}], "
                                  f"got {tuple(norm_weight.shape)}.")


def embedding_rms_norm_reference(weight: Tensor, ids: Tensor, norm_weight: Tensor | None,
                                 eps: float) -> tuple[Tensor, Tensor]:
    """(embeds, rms_norm(embeds, norm_weight, eps)) with embeds = aten.embedding(weight, ids) [..., H] in weight's
    dtype: bitwise what the two ops compute. An id outside [0, V) raises as aten.embedding does."""
    _check(weight, ids, norm_weight)
    embeds = torch.nn.functional.embedding(ids, weight)
    return embeds, rms_norm_reference(embeds, norm_weight, eps)


@torch.library.custom_op("dflash::embedding_rms_norm", mutates_args=())
def embedding_rms_norm(weight: Tensor, ids: Tensor, norm_weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return embedding_rms_norm_reference(weight, ids, norm_weight, eps)


@embedding_rms_norm.register_fake
def _(weight, ids, norm_weight, eps):
    _check(weight, ids, norm_weight)
    shape = (*ids.shape, weight.shape[1])
    return weight.new_empty(shape), weight.new_empty(shape)
