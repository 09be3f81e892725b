"""Per-op Ascend lowerings: one dflash op call -> the body of a small Python function that calls the NPU fused
ops through `npu` (and layout helpers through `prelude`), or the reason the reference op is called instead.

A call's arguments are `Operand`s: constants are printed into the body; run-time tensors become parameters and
carry a tensor-like value (a FakeTensor from the graph, or the real tensor) for the dtype / static-dim decisions.
"""

import re
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from torch_dflash.compiler.ops import REFERENCES

HALF = (torch.float16, torch.bfloat16)
NORM_DTYPES = (*HALF, torch.float32)


@dataclass(frozen=True)
class Operand:
    name: str
    value: Any          # the constant, or a tensor-like describing the run-time argument
    runtime: bool

    @property
    def src(self) -> str:
        return self.name if self.runtime else repr(self.value)


@dataclass(frozen=True)
class Lowered:
    comment: str
    body: tuple[str, ...]
    fallback: str | None = None     # set when the body calls the reference op, with the reason

    @property
    def npu_ops(self) -> set[str]:
        return set(re.findall(r"\bnpu\.(\w+)", "\n".join(self.body)))


def lower(op: str, a: dict[str, Operand]) -> Lowered:
    """`a` maps every schema argument of torch.ops.dflash.<op> (in schema order) to its Operand."""
    schema = getattr(torch.ops.dflash, op).default._schema
    for arg in schema.arguments:
        if a[arg.name].runtime and not arg.type.isSubtypeOf(torch._C.OptionalType.ofTensor()):
            return reference(op, a, f"argument {arg.name} is only known at run time")
    return _LOWERINGS[op](op, a)


def reference(op: str, a: dict[str, Operand], reason: str) -> Lowered:
    args = ", ".join(o.src for o in a.values())
    return Lowered(f"dflash.{op} -> reference op: {reason}", (f"return torch.ops.dflash.{op}.default({args})",), reason)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


# ---------------------------------------------------------------------------------------------- attention


def _attention(op: str, a: dict[str, Operand]) -> Lowered:
    kind, dtype = a["kind"].value, a["q"].value.dtype
    if kind not in ("non_causal", "causal"):
        return reference(op, a, f"kind {kind!r} has no TND form (sparse_mode 0 without a mask, 3 with the causal one)")
    if dtype not in HALF:
        return reference(op, a, f"npu_fused_infer_attention_score takes float16/bfloat16, not {dtype}")
    q, k, v, q_pos = (a[n].src for n in ("q", "k", "v", "q_pos"))
    causal = kind == "causal"
    seq_kv = (f"prelude.kv_lengths({q_pos}, {k}.shape[2], causal={causal})" if a["q_pos"].runtime
              else f"[{k}.shape[2]] * {q}.shape[0]")
    mode = 3 if causal else 0
    body = (
        "out, _ = npu.npu_fused_infer_attention_score(",
        f"    prelude.to_tnd({q}), prelude.to_pages({k}), prelude.to_pages({v}),",
        f"    atten_mask={f'prelude.causal_mask({q}.device)' if causal else None},",
        f"    actual_seq_lengths=prelude.cumulative_lengths({q}.shape[0], {q}.shape[2]),",
        f"    actual_seq_lengths_kv={seq_kv},",
        f"    block_table=prelude.block_table({k}.shape[0], {k}.shape[2], {q}.device),",
        f"    num_heads={q}.shape[1], num_key_value_heads={k}.shape[1], scale={a['scale'].src},",
        f"    input_layout='TND', sparse_mode={mode}, block_size=prelude.BLOCK_SIZE)",
        f"return prelude.from_tnd(out, {q}.shape[0])",
    )
    return Lowered(f"dflash.attention {kind} -> npu_fused_infer_attention_score: TND queries, paged KV, "
                   f"sparse_mode {mode}", body)


# ---------------------------------------------------------------------------------------------- norm / rope


def _norm_line(t: str, weight: Operand, eps: Operand) -> tuple[str, ...]:
    if not weight.runtime:
        return ()
    return (f"{t} = npu.npu_rms_norm({t}, {weight.src}.to({t}.dtype), {eps.src})[0]",)


def _rope_lines(tensors: tuple[str, ...], cos: Operand, sin: Operand, head_dim: int, rot: int) -> tuple[str, ...]:
    """Neox rope of each 4-D-able tensor [..., N, head_dim] by per-token cos/sin [..., rot]: one in-place
    npu_apply_rotary_pos_emb for a (q, k) pair, out-of-place npu_rotary_mul for a lone tensor. Both want BSND
    with cos/sin as 1S1D and the rotated width equal to head_dim, so a partial rope rotates a slice."""
    first = tensors[0]
    lines = [f"{n}_r = {o.src}.expand(*{first}.shape[:-2], -1).reshape(1, -1, 1, {o.src}.shape[-1])"
             f".to({first}.dtype).contiguous()" for n, o in (("cos", cos), ("sin", sin))]
    part = f"[..., :{rot}]" if rot < head_dim else ""
    lines += [f"{t}_rot = {t}.reshape(1, -1, *{t}.shape[-2:]){part}.contiguous()" for t in tensors]
    if len(tensors) == 2:
        q, k = tensors
        lines.append(f"{q}_rot, {k}_rot = npu.npu_apply_rotary_pos_emb({q}_rot, {k}_rot, cos_r, sin_r, 'BSND', "
                     "'half')  # in place")
    else:
        lines.append(f"{first}_rot = npu.npu_rotary_mul({first}_rot, cos_r, sin_r, 'half')")
    for t in tensors:
        lines.append(f"{t} = torch.cat(({t}_rot.view(*{t}.shape[:-1], {rot}), {t}[..., {rot}:]), dim=-1)"
                     if part else f"{t} = {t}_rot.view({t}.shape)")
    return tuple(lines)


def _rope_dims(x: Operand, cos: Operand, head_dim: int | None = None) -> tuple[int, int] | str:
    """(head_dim, rot_dim) when both are static and the rotated dtype suits the NPU ops, else a reason."""
    head_dim = head_dim or _static(x.value.shape[-1])
    rot = _static(cos.value.shape[-1])
    if head_dim is None or rot is None:
        return "head_dim or rot_dim is symbolic"
    if x.value.dtype not in NORM_DTYPES:
        return f"the NPU norm/rope ops take float16/bfloat16/float32, not {x.value.dtype}"
    return head_dim, rot


def _gamma(x: str, weight: Operand) -> str:
    return (f"{weight.src}.to({x}.dtype)" if weight.runtime
            else f"torch.ones({x}.shape[-1], dtype={x}.dtype, device={x}.device)")


def _rms_norm(op: str, a: dict[str, Operand]) -> Lowered:
    x = a["x"].src
    if a["x"].value.dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_rms_norm takes float16/bfloat16/float32, not {a['x'].value.dtype}")
    return Lowered("dflash.rms_norm -> npu_rms_norm",
                   (f"return npu.npu_rms_norm({x}, {_gamma(x, a['weight'])}, {a['eps'].src})[0]",))


def _add_rms_norm(op: str, a: dict[str, Operand]) -> Lowered:
    x = a["x"].src
    if a["x"].value.dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_add_rms_norm takes float16/bfloat16/float32, not {a['x'].value.dtype}")
    return Lowered("dflash.add_rms_norm -> npu_add_rms_norm (the sum is its third output)",
                   (f"y, _, total = npu.npu_add_rms_norm({x}, {a['residual'].src}, {_gamma(x, a['weight'])}, "
                    f"{a['eps'].src})", "return y, total"))


def _embedding_rms_norm(op: str, a: dict[str, Operand]) -> Lowered:
    dtype = a["weight"].value.dtype
    if dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_rms_norm takes float16/bfloat16/float32, not {dtype}")
    return Lowered("dflash.embedding_rms_norm -> torch.nn.functional.embedding + npu_rms_norm (no fused gather and "
                   "norm on the NPU)",
                   (f"embeds = torch.nn.functional.embedding({a['ids'].src}, {a['weight'].src})",
                    f"return embeds, npu.npu_rms_norm(embeds, {_gamma('embeds', a['norm_weight'])}, "
                    f"{a['eps'].src})[0]"))


def _silu_mul(op: str, a: dict[str, Operand]) -> Lowered:
    gate, up = a["gate"].src, a["up"].src
    if a["gate"].value.dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_swiglu takes float16/bfloat16/float32, not {a['gate'].value.dtype}")
    return Lowered("dflash.silu_mul -> npu_swiglu over gate and up joined along the last dim",
                   (f"return npu.npu_swiglu(torch.cat(({gate}, {up}), dim=-1), dim=-1)",))


def _rope(op: str, a: dict[str, Operand]) -> Lowered:
    dims = _rope_dims(a["x"], a["cos"])
    if isinstance(dims, str):
        return reference(op, a, dims)
    body = (f"x_in = {a['x'].src}", *_rope_lines(("x_in",), a["cos"], a["sin"], *dims), "return x_in")
    return Lowered("dflash.rope -> npu_rotary_mul", body)


def _table_lines(positions: str, a: dict[str, Operand], *first: str) -> tuple[str, ...]:
    scaled = f" * {a['scale'].src}" if a["scale"].value != 1.0 else ""
    return (f"freqs = {positions}.float()[..., None] * {a['inv_freq'].src}.float()",
            "emb = torch.cat((freqs, freqs), dim=-1)",
            f"return {''.join(f'{f}, ' for f in first)}(emb.cos(){scaled}).to({a['dtype'].src}), "
            f"(emb.sin(){scaled}).to({a['dtype'].src})")


def _rope_cos_sin(op: str, a: dict[str, Operand]) -> Lowered:
    """The formula as torch ops (no NPU op builds rope tables; torch_npu runs them as a few elementwise kernels)."""
    return Lowered("dflash.rope_cos_sin -> torch ops (the reference formula: fp32 angles, cos/sin, one cast)",
                   _table_lines(a["positions"].src, a))


def _joined_rope_cos_sin(op: str, a: dict[str, Operand]) -> Lowered:
    return Lowered("dflash.joined_rope_cos_sin -> torch ops (torch.cat, then rope_cos_sin's formula)",
                   (f"joined = torch.cat(({a['front'].src}, {a['positions'].src}), dim=-1)",
                    *_table_lines("joined", a, "joined")))


def _split_qkv_unusable(a: dict[str, Operand]) -> str | None:
    """Why sgl_kernel_npu's split_qkv_rmsnorm_rope cannot compute this qkv_norm_rope exactly, or None."""
    head_dim, n_q, n_kv = (a[n].value for n in ("head_dim", "n_q", "n_kv"))
    dtype = a["x"].value.dtype
    if head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    if n_q % n_kv:
        return f"{n_q} q heads are not a multiple of {n_kv} kv heads"
    if a["q_norm_w"].runtime != a["k_norm_w"].runtime:
        return "only one of q and k has an RMSNorm"
    if dtype != torch.bfloat16:
        return f"the fused kernel rounds normalized q/k to bfloat16 and the activations are {dtype}"
    return None


def _qkv_lines(a: dict[str, Operand]) -> tuple[str, list[str], tuple[str, str, str]] | str:
    """(what runs, the lines computing q, k, v, their expressions) for a qkv_norm_rope's operands, or why the
    reference must run instead."""
    head_dim, n_q, n_kv = (a[n].value for n in ("head_dim", "n_q", "n_kv"))
    dims = _rope_dims(a["x"], a["cos"], head_dim)
    if isinstance(dims, str):
        return dims
    q_w, k_w, eps, cos, sin = (a[n] for n in ("q_norm_w", "k_norm_w", "eps", "cos", "sin"))
    linear = f"qkv = torch.nn.functional.linear({a['x'].src}, {a['w_qkv'].src}, {a['b_qkv'].src})"
    why_not = _split_qkv_unusable(a)
    if why_not is None:
        lines = [
            linear,
            "q, k, v = npu.split_qkv_rmsnorm_rope(",
            "    input=qkv.reshape(-1, qkv.shape[-1]),",
            *(f"    {n}={o.src}.expand(*qkv.shape[:-1], -1).reshape(-1, 1, 1, {o.src}.shape[-1]).contiguous(),"
              for n, o in (("sin", sin), ("cos", cos))),
            f"    q_hidden_size={n_q * head_dim}, kv_hidden_size={n_kv * head_dim}, head_dim={head_dim},",
            f"    eps={eps.src if q_w.runtime else None}, q_weight={q_w.src}, k_weight={k_w.src}, q_bias=None, "
            "k_bias=None)",
            "lead = qkv.shape[:-1]",
        ]
        return ("split_qkv_rmsnorm_rope (sgl_kernel_npu): split, per-head RMSNorm and rope in one kernel", lines,
                (f"q.view(*lead, {n_q}, {head_dim})", f"k.view(*lead, {n_kv}, {head_dim})",
                 f"v.view(*lead, {n_kv}, {head_dim})"))
    lines = [
        linear,
        f"q, k, v = qkv.split([{n_q * head_dim}, {n_kv * head_dim}, {n_kv * head_dim}], dim=-1)",
        f"q = q.unflatten(-1, ({n_q}, {head_dim}))",
        f"k = k.unflatten(-1, ({n_kv}, {head_dim}))",
        *_norm_line("q", q_w, eps),
        *_norm_line("k", k_w, eps),
        *_rope_lines(("q", "k"), cos, sin, *dims),
    ]
    return (f"npu_rms_norm + npu_apply_rotary_pos_emb, not split_qkv_rmsnorm_rope: {why_not}", lines,
            ("q", "k", f"v.unflatten(-1, ({n_kv}, {head_dim})).contiguous()"))


def _finished_x(a: dict[str, Operand]) -> tuple[tuple[str, ...], dict[str, Operand], str]:
    """With a run-time x_sumsq (linear_add_norm_stats's): the line applying the rows' 1/rms to x, the operands with
    x the finished rows, and a note for the comment; else nothing, a unchanged, ''."""
    if not a["x_sumsq"].runtime:
        return (), a, ""
    x, sumsq, eps = a["x"].src, a["x_sumsq"].src, a["x_eps"].src
    line = f"normed = ({x}.float() * torch.rsqrt({sumsq}.sum(-1, keepdim=True) / {x}.shape[-1] + {eps})).to({x}.dtype)"
    return (line,), {**a, "x": Operand("normed", a["x"].value, True)}, "x's RMSNorm finished from x_sumsq, then "


def _qkv_norm_rope(op: str, a: dict[str, Operand]) -> Lowered:
    finish, a, note = _finished_x(a)
    lowered = _qkv_lines(a)
    if isinstance(lowered, str):
        return reference(op, a, lowered)
    what, lines, (q, k, v) = lowered
    return Lowered(f"dflash.qkv_norm_rope -> {note}{what}", (*finish, *lines, f"return {q}, {k}, {v}"))


def _qkv_norm_rope_cache(op: str, a: dict[str, Operand]) -> Lowered:
    finish, a, note = _finished_x(a)
    lowered = _qkv_lines(a)
    if isinstance(lowered, str):
        return reference(op, a, lowered)
    what, lines, (q, k, v) = lowered
    return Lowered(f"dflash.qkv_norm_rope_cache -> {note}{what}; k, v written into the caches by index_put",
                   (*finish, *lines, *_cache_writes(a["x"].src, a, k, v), f"return {q}"))


def _cache_writes(x: str, a: dict[str, Operand], k: str = "k", v: str = "v") -> tuple[str, ...]:
    """Row b of k, v into cache row b at slots cache_positions[b] (the reference op's index assignment)."""
    positions = a["cache_positions"].src
    return (f"rows = torch.arange({x}.shape[0], device={x}.device)[:, None]",
            f"{a['k_cache'].src}[rows, :, {positions}] = {k}", f"{a['v_cache'].src}[rows, :, {positions}] = {v}")


def _kv_lines(a: dict[str, Operand]) -> tuple[str, ...] | str:
    """The kv_materialize body up to k (normed, roped) and v (a view of the projection), or why it cannot be."""
    head_dim, n_kv = a["head_dim"].value, a["n_kv"].value
    dims = _rope_dims(a["ctx"], a["cos"], head_dim)
    if isinstance(dims, str):
        return dims
    return (
        f"kv = torch.nn.functional.linear({a['ctx'].src}, {a['w_kv'].src}, {a['b_kv'].src})",
        f"k, v = kv.unflatten(-1, ({2 * n_kv}, {head_dim})).split([{n_kv}, {n_kv}], dim=-2)",
        *_norm_line("k", a["k_norm_w"], a["eps"]),
        *_rope_lines(("k",), a["cos"], a["sin"], *dims),
    )


_KV_WHAT = "npu_rms_norm + npu_rotary_mul (no q: split_qkv_rmsnorm_rope does not apply)"


def _kv_materialize(op: str, a: dict[str, Operand]) -> Lowered:
    lines = _kv_lines(a)
    if isinstance(lines, str):
        return reference(op, a, lines)
    return Lowered(f"dflash.kv_materialize -> {_KV_WHAT}", (*lines, "return k, v.contiguous()"))


def _kv_materialize_cache(op: str, a: dict[str, Operand]) -> Lowered:
    lines = _kv_lines(a)
    if isinstance(lines, str):
        return reference(op, a, lines)
    return Lowered(f"dflash.kv_materialize_cache -> {_KV_WHAT}; k, v written into the caches by index_put",
                   (*lines, *_cache_writes(a["ctx"].src, a), "return None"))


def _context_qkv_norm_rope_cache(op: str, a: dict[str, Operand]) -> Lowered:
    """The context and block rows through one projection (qkv_norm_rope's lowering over cat([ctx, x], 1); the
    context rows' q is computed and dropped), then the context's k/v into the caches before the block's."""
    finish, a, note = _finished_x(a)
    lowered = _qkv_lines({**a, "x": Operand("rows", a["x"].value, True)})
    if isinstance(lowered, str):
        return reference(op, a, lowered)
    what, lines, (q, k, v) = lowered
    ctx, x, positions = a["ctx"].src, a["x"].src, a["cache_positions"].src
    k_cache, v_cache = a["k_cache"].src, a["v_cache"].src
    writes = [f"{cache}[batch_rows, :, {positions}[:, {half}]] = {value}[:, {half}]"
              for half in (":c", "c:") for cache, value in ((k_cache, "k"), (v_cache, "v"))]
    return Lowered(f"dflash.context_qkv_norm_rope_cache -> {note}over cat(ctx, x): {what}; k, v written into the "
                   "caches by index_put, the context's first",
                   (*finish, f"rows, c = torch.cat([{ctx}, {x}], 1), {ctx}.shape[1]", *lines, f"k, v = {k}, {v}",
                    f"batch_rows = torch.arange({x}.shape[0], device={x}.device)[:, None]", *writes,
                    f"return {q}[:, c:].contiguous()"))


# ---------------------------------------------------------------------------------------------- linear


def _linear(op: str, a: dict[str, Operand]) -> Lowered:
    x, w, b = (a[n].src for n in ("x", "w", "b"))
    return Lowered("dflash.linear -> torch.nn.functional.linear (torch_npu's matmul; no skinny kernel on Ascend)",
                   (f"return torch.nn.functional.linear({x}, {w}, {b})",))


def _linear_silu_mul(op: str, a: dict[str, Operand]) -> Lowered:
    if a["x"].value.dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_swiglu takes float16/bfloat16/float32, not {a['x'].value.dtype}")
    finish, a, note = _finished_x(a)
    x, w, b = (a[n].src for n in ("x", "w", "b"))
    return Lowered(f"dflash.linear_silu_mul -> {note}torch.nn.functional.linear, then npu_swiglu over its [gate | up] "
                   "output", (*finish, f"return npu.npu_swiglu(torch.nn.functional.linear({x}, {w}, {b}), dim=-1)"))


def _add_rms_norm_linear_silu_mul(op: str, a: dict[str, Operand]) -> Lowered:
    x, w, b = (a[n].src for n in ("x", "w", "b"))
    if a["x"].value.dtype not in NORM_DTYPES:
        return reference(op, a, f"npu_add_rms_norm takes float16/bfloat16/float32, not {a['x'].value.dtype}")
    return Lowered("dflash.add_rms_norm_linear_silu_mul -> npu_add_rms_norm, torch.nn.functional.linear, then "
                   "npu_swiglu (no norm in the NPU's GEMM)",
                   (f"y, _, total = npu.npu_add_rms_norm({x}, {a['residual'].src}, {_gamma(x, a['norm_w'])}, "
                    f"{a['eps'].src})",
                    f"return npu.npu_swiglu(torch.nn.functional.linear(y, {w}, {b}), dim=-1), total"))


# ---------------------------------------------------------------------------------------------- mHC


def _traced_reference(op: str, a: dict[str, Operand]) -> Lowered:
    """The reference formula as torch ops, traced by torch.fx with the constants folded in: loops over a constant
    (Sinkhorn iterations) unroll; data-dependent control flow would make the trace fail."""
    runtime = [n for n, o in a.items() if o.runtime]
    reference_fn = REFERENCES[op]

    def call(values: dict) -> Any:
        return reference_fn(*(values[n] if o.runtime else o.value for n, o in a.items()))

    scope = {"_call": call}
    exec(f"def traced({', '.join(runtime)}):\n    return _call({{{', '.join(f'{n!r}: {n}' for n in runtime)}}})",
         scope)
    src = fx.symbolic_trace(scope["traced"]).code
    body = textwrap.dedent(src.split(":\n", 1)[1]).strip().splitlines()     # drop FX's `def forward(self, …):`
    iters = f", {a['iters'].value} Sinkhorn iterations unrolled" if "iters" in a else ""
    return Lowered(f"dflash.{op} -> torch ops (the reference formula traced by torch.fx{iters})", tuple(body))


_LOWERINGS = {
    "attention": _attention,
    "rms_norm": _rms_norm,
    "add_rms_norm": _add_rms_norm,
    "embedding_rms_norm": _embedding_rms_norm,
    "silu_mul": _silu_mul,
    "rope": _rope,
    "rope_cos_sin": _rope_cos_sin,
    "joined_rope_cos_sin": _joined_rope_cos_sin,
    "qkv_norm_rope": _qkv_norm_rope,
    "qkv_norm_rope_cache": _qkv_norm_rope_cache,
    "kv_materialize": _kv_materialize,
    "kv_materialize_cache": _kv_materialize_cache,
    "context_qkv_norm_rope_cache": _context_qkv_norm_rope_cache,
    "mhc_pre": _traced_reference,
    "mhc_post": _traced_reference,
    "mhc_post_pre": _traced_reference,
    "linear": _linear,
    "linear_silu_mul": _linear_silu_mul,
    "add_rms_norm_linear_silu_mul": _add_rms_norm_linear_silu_mul,
    "linear_add_norm_stats": _traced_reference,
}
