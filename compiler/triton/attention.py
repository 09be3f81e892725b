"""The Triton provider of dflash.attention for CUDA and ROCm: split-KV decode for short query blocks, flash
prefill for long ones (attention_decode.py, attention_prefill.py; shared pieces in attention_common.py).

Importing this module registers `Provider("attention", "triton", ("cuda", "rocm"), ...)`.
"""

import torch
from triton.runtime.interpreter import InterpretedFunction

from ..ops.attention import KINDS, check_args
from ..providers import Provider, register
from .aot import KernelSpec
from .attention_common import family, launch_params
from .attention_decode import attention_decode, attention_decode_kernel, decode_block_m, reduce_splits_kernel
from .attention_prefill import attention_prefill, attention_prefill_kernel

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_decode(q, k) -> bool:
    """Decode (split-KV) when the GQA group × all queries fit one tile of the decode kernel, else prefill."""
    max_rows = launch_params("decode", q.shape[-1], q.dtype, family(q.device))["max_rows"]
    return decode_block_m(q.shape[1] // k.shape[1], q.shape[2]) <= max_rows


def attention_triton(q, k, v, kind, scale, window=0, mask=None, q_pos=None):
    """dflash.attention on CUDA/ROCm (or CPU under TRITON_INTERPRET=1)."""
    check_args(q, k, v, kind, window, mask)
    run = attention_decode if uses_decode(q, k) else attention_prefill
    return run(q, k, v, kind, scale, window, mask, q_pos)


def supports(q, k, v, kind, scale, window=0, mask=None, q_pos=None) -> str | None:
    """None, or the one reason these arguments cannot run on the Triton kernels."""
    if q.device.type != "cuda" and not isinstance(attention_decode_kernel, InterpretedFunction):
        return f"{q.device} tensors run the Triton kernels only when TRITON_INTERPRET=1 was set before import."
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-d [batch, heads, seq, head_dim]."
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {HEAD_DIMS}."
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "k and v must have the head_dim of q."
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}."
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {KINDS}."
    if mask is not None and not (mask.dtype == torch.bool or mask.is_floating_point()):
        return f"a custom mask must be bool or floating point, got {mask.dtype}."
    if mask is not None and not _broadcasts(mask.shape, (*q.shape[:-1], k.shape[2])):
        return f"the mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Sq, Sk]."
    if q_pos is not None and (q_pos.dim() != 2 or q_pos.shape[0] not in (1, q.shape[0])
                              or q_pos.shape[1] != q.shape[2] or q_pos.is_floating_point()):
        return f"q_pos must be an integer [batch or 1, Sq] tensor, got {q_pos.dtype} {tuple(q_pos.shape)}."
    return None


def _broadcasts(shape, target) -> bool:
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


register(Provider("attention", "triton", ("cuda", "rocm"), attention_triton, priority=10, supports=supports,
                  traceable=True))


def _signature(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Every argument of `kernel`: its pointer type, 'constexpr', 'fp32' for qk_scale, else 'i32'."""
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        return pointers.get(name, "fp32" if name == "qk_scale" else "i32")
    return {name: arg_type(name) for name in kernel.arg_names}


def _attention_spec(path, kind, fam, head_dim=128, dtype="bf16", mask_bool=True, split_kv=True) -> KernelSpec:
    cfg = launch_params(path, head_dim, torch.float32 if dtype == "fp32" else torch.bfloat16, fam)
    custom = kind == "custom"
    mask_type = ("*u8" if mask_bool else f"*{dtype}") if custom else None
    pointers = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "OUT": f"*{dtype}", "QPOS": "*i64",
                "WS_O": "*fp32", "WS_LSE": "*fp32"}
    constexprs = {"KIND": kind, "MASK_BOOL": custom and mask_bool, "HAS_QPOS": True,
                  "BLOCK_N": cfg["block_n"], "HEAD_DIM": head_dim, "WIDEN_DOT": False}
    if mask_type:
        pointers["MASK"] = mask_type
    else:
        constexprs["MASK"] = None
    if path == "decode":
        kernel = attention_decode_kernel
        constexprs.update(SPLIT_KV=split_kv, BLOCK_M=cfg["max_rows"], PREFETCH_KEYS=cfg["prefetch_keys"],
                          KV_LINE=128 // (4 if dtype == "fp32" else 2))
        if not split_kv:
            constexprs.update(WS_O=None, WS_LSE=None)
    else:
        kernel = attention_prefill_kernel
        constexprs["BLOCK_M"] = cfg["block_m"]
    mask_name = ("bool" if mask_bool else "float") if custom else ""
    name = f"attention_{path}.{kind}{mask_name}.hd{head_dim}.{dtype}{'' if split_kv else '.nosplit'}.{fam}"
    return KernelSpec(name, kernel, _signature(kernel, pointers, constexprs), constexprs,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _reduce_spec(fam, head_dim=128, dtype="bf16", max_splits=16) -> KernelSpec:
    cfg = launch_params("decode", head_dim, torch.bfloat16, fam)
    constexprs = {"SPLITS_P2": max_splits, "HEAD_DIM": head_dim}
    pointers = {"WS_O": "*fp32", "WS_LSE": "*fp32", "OUT": f"*{dtype}"}
    return KernelSpec(f"attention_reduce.hd{head_dim}.{dtype}.{fam}", reduce_splits_kernel,
                      _signature(reduce_splits_kernel, pointers, constexprs), constexprs,
                      num_warps=cfg["reduce_num_warps"], num_stages=1)


def aot_specs(families=("cuda", "rocm")) -> list[KernelSpec]:
    """Per family: decode and prefill × every mask kind (bf16, hd 128; custom with a bool mask, and the decode
    kernel also with a float mask), decode without splits, the reduce, and hd 64 / 256 for one kind each.

    A spec's name ends with its family; compile it for that family's archs (aot.family(arch)).
    """
    specs = []
    for fam in families:
        specs += [_attention_spec(path, kind, fam) for path in ("decode", "prefill") for kind in KINDS]
        specs += [_attention_spec("decode", "custom", fam, mask_bool=False),
                  _attention_spec("decode", "non_causal", fam, split_kv=False), _reduce_spec(fam)]
        for head_dim in (64, 256):
            specs += [_attention_spec("decode", "non_causal", fam, head_dim=head_dim),
                      _attention_spec("prefill", "causal", fam, head_dim=head_dim), _reduce_spec(fam, head_dim)]
    return specs
