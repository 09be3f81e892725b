"""Helpers for pass tests (imported as `pass_testing`: pytest puts this package-less folder on the path).

`check_pass` is the shape of vLLM's tests/compile/backend.py: export, keep the graph before, run the passes,
assert the match counts, and assert the rewritten graph computes what the eager module computes on the
export-time arguments AND on a second set of a different shape (dynamic dims).
"""

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from torch_dflash.compiler.capture import VerifyStep, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.passes.manager import PassManager, PipelineReport


def export_graph(module: torch.nn.Module, args, dynamic_shapes=None) -> fx.GraphModule:
    """`torch.export` (non-strict) → the ATen graph module. `args` is a tuple of positionals or a dict of kwargs."""
    positional, kwargs = ((), args) if isinstance(args, dict) else (tuple(args), None)
    ep = torch.export.export(module, positional, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.module()


def call(fn, args):
    return fn(**args) if isinstance(args, dict) else fn(*args)


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many call_function nodes of each target the graph has (targets as printed, e.g. 'aten.linear.default')."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def op_diff(before: fx.GraphModule, after: fx.GraphModule) -> tuple[Counter, Counter]:
    """(ops that disappeared, ops that appeared) between two graphs, with multiplicities."""
    a, b = op_counts(before), op_counts(after)
    return a - b, b - a


def assert_same_outputs(expected, actual, atol=1e-5, rtol=1e-5) -> None:
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    assert len(want) == len(got) > 0, f"{len(want)} reference outputs vs {len(got)} from the graph"
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def demo_verify_program(block_size: int, kind: str, disabled=()):
    """Our demo target's verify step over `block_size` tokens (batch 1..2) through the default pipeline on CPU
    (less the `disabled` passes) → (target, program, its CompileReport)."""
    target, _ = build_demo_pair(seed=3, max_batch=2, max_seq_len=32)
    compile_step = pipeline_compile_step("cpu", disabled=disabled)
    program = compile_step(capture_verify(target, block_size=block_size, max_batch=2).module(), kind)
    return target, program, compile_step.reports[kind]


def assert_verify_program_matches(target, program, block_size: int) -> None:
    """`program` computes what the eager verify step computes, at batch 1 and 2 with ragged positions."""
    for batch in (1, 2):
        args = (torch.randint(0, 1000, (batch, block_size)),
                9 + torch.arange(batch)[:, None] + torch.arange(block_size))
        with torch.no_grad():
            assert_same_outputs(VerifyStep(target)(*args), program(*args))


def hf_through_backend_without_inductor(kind: str, disabled=()) -> tuple[int, list[dict]]:
    """transformers' tiny `kind` causal LM (tiny_models.hf_causal_lm) through backend="dflash" without Inductor
    (and without the `disabled` passes) at two lengths — the second recompiles (automatic dynamic) —, logits equal
    to eager each time (fp32, 1e-5) → (its layer count, the report's fusions of each compile)."""
    import torch_dflash as td
    from tiny_models import hf_causal_lm

    torch._dynamo.reset()
    model = hf_causal_lm(kind)
    fast = torch.compile(model, backend="dflash", options={"inductor": False, "disable": tuple(disabled)})
    fusions = []
    for length in (7, 4):
        ids = torch.randint(0, 128, (2, length))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       atol=1e-5, rtol=1e-5)
        fusions.append(td.last_report().fusions)
    return model.config.num_hidden_layers, fusions


def run_passes(gm: fx.GraphModule, passes) -> PipelineReport:
    return PassManager(passes).run(gm)


def check_pass(module, args, second_args, passes, expected: dict[str, int], dynamic_shapes=None, atol=1e-5,
               rtol=1e-5):
    """Export `module` on `args`, run `passes`, assert `report.fusions()[kind] == n` for every kind in
    `expected`, and assert the rewritten graph matches eager `module` on `args` and on `second_args`
    (fp32: atol = rtol = 1e-5; pass looser ones for bf16). Returns (gm_before, gm_after, report)."""
    module = module.eval()
    gm = export_graph(module, args, dynamic_shapes)
    before = copy.deepcopy(gm)
    report = run_passes(gm, passes)
    fusions = report.fusions()
    got = {kind: fusions.get(kind, 0) for kind in expected}
    reasons = [r.reason for r in report.rejections()]
    assert got == expected, f"fusions {got} != expected {expected}; rejections: {reasons}"
    with torch.no_grad():
        for inputs in (args, second_args):
            assert_same_outputs(call(module, inputs), call(gm, inputs), atol, rtol)
    return before, gm, report


# ── tiny attention blocks spelled like transformers (Qwen3Attention, z-lab Qwen3DFlashAttention) ──────────
class HFRMSNorm(torch.nn.Module):
    """Qwen3RMSNorm, or (style) `F.rms_norm`, or the plain product without casts."""

    def __init__(self, dim, eps, style="hf", dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(dim, dtype=dtype))
        self.eps, self.style = eps, style

    def forward(self, x):
        if self.style == "functional":
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if self.style == "plain":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x, style="slice"):
    if style == "chunk":
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """GPT-J's interleaved rotation: pairs (x0, x1), (x2, x3), …"""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope(x, cos, sin, head_axis, style="slice"):
    """HF apply_rotary_pos_emb on one tensor; partial (GLM/NeoX style cat) when cos is narrower than x."""
    cos, sin = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    if style == "interleaved":
        half = cos.shape[-1] // 2
        cos, sin = (t[..., :half].repeat_interleave(2, dim=-1) for t in (cos, sin))
        return x * cos + rotate_every_two(x) * sin
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x, style) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot, style) * sin, x_pass), dim=-1)


class ProjectionAttention(torch.nn.Module):
    """One attention site. forward(x, positions[, ctx]): q, k, v projections of x (separate linears or one
    fused linear + split), optional per-head q/k norm, neox rope on rot_dim channels, SDPA with GQA, o_proj.
    draft=True: the z-lab draft — k, v = cat(proj(ctx), proj(x)) on the seq dim, rope over ctx + block, q with
    the last b rows of cos / sin. layout: 'bhsd' norm → transpose → rope (HF Qwen3), 'bhsd_norm_last'
    transpose → norm → rope (DeepSeek-V4's q), 'bshd' norm → rope → transpose (ours).
    The k_eps / k_cos_shift / rope_style='interleaved' / norm_dtype / q_rows='first' knobs build the cases the
    passes refuse."""

    def __init__(self, hidden, nq, nkv, hd, *, bias=False, qk_norm=True, norm_style="hf", rot_dim=None,
                 theta=10000.0, eps=1e-6, fused=False, draft=False, layout="bhsd", rope_style="slice",
                 k_eps=None, k_cos_shift=0, norm_dtype=None, q_rows="last"):
        super().__init__()
        self.nq, self.nkv, self.hd, self.fused, self.draft, self.layout = nq, nkv, hd, fused, draft, layout
        self.rope_style, self.k_cos_shift, self.q_rows = rope_style, k_cos_shift, q_rows
        if fused:
            self.qkv_proj = torch.nn.Linear(hidden, (nq + 2 * nkv) * hd, bias=bias)
        else:
            self.q_proj = torch.nn.Linear(hidden, nq * hd, bias=bias)
            self.k_proj = torch.nn.Linear(hidden, nkv * hd, bias=bias)
            self.v_proj = torch.nn.Linear(hidden, nkv * hd, bias=bias)
        self.o_proj = torch.nn.Linear(nq * hd, hidden, bias=False)
        self.q_norm = HFRMSNorm(hd, eps, norm_style, norm_dtype) if qk_norm else None
        self.k_norm = HFRMSNorm(hd, eps if k_eps is None else k_eps, norm_style) if qk_norm else None
        rot_dim = rot_dim or hd
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, rot_dim, 2).float() / rot_dim),
                             persistent=False)

    def cos_sin(self, positions):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def project(self, x):
        if self.fused:
            return self.qkv_proj(x).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def heads(self, t, norm, cos, sin):
        t = t.view(*t.shape[:2], -1, self.hd)
        if self.layout == "bhsd_norm_last":
            t = t.transpose(1, 2)
        if norm is not None:
            t = norm(t)
        if cos is None:
            return t if self.layout == "bhsd_norm_last" else t.transpose(1, 2)
        if self.layout == "bshd":
            return rope(t, cos, sin, 2, self.rope_style).transpose(1, 2)
        return rope(t if self.layout == "bhsd_norm_last" else t.transpose(1, 2), cos, sin, 1, self.rope_style)

    def forward(self, x, positions, ctx=None):
        b = x.shape[1]
        cos, sin = self.cos_sin(positions)
        q, k, v = self.project(x)
        if self.draft:
            _, k_ctx, v_ctx = self.project(ctx)
            k, v = torch.cat([k_ctx, k], dim=1), torch.cat([v_ctx, v], dim=1)
        k_cos, k_sin = self.cos_sin(positions + self.k_cos_shift) if self.k_cos_shift else (cos, sin)
        rows = slice(-b, None) if self.q_rows == "last" else slice(0, b)
        q = self.heads(q, self.q_norm, cos[:, rows], sin[:, rows])
        k = self.heads(k, self.k_norm, k_cos, k_sin)
        v = self.heads(v, None, None, None)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=self.nq != self.nkv)
        return self.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))


def projection_args(module: ProjectionAttention, hidden: int, batch: int, seq: int, ctx: int = 0, start: int = 3):
    """(x, positions[, ctx]) for ProjectionAttention: positions start..start+ctx+seq (context first)."""
    positions = (start + torch.arange(ctx + seq)).expand(batch, -1)
    x = torch.randn(batch, seq, hidden)
    return (x, positions, torch.randn(batch, ctx, hidden)) if module.draft else (x, positions)


def projection_dims(module: ProjectionAttention, block: int):
    """dynamic_shapes for projection_args: the sequence length is dynamic; for the draft the context length
    (positions span context + the static block)."""
    if module.draft:
        ctx = torch.export.Dim("ctx", min=2, max=64)
        return (None, {1: ctx + block}, {1: ctx})
    seq = torch.export.Dim("seq", min=2, max=64)
    return ({1: seq}, {1: seq})
