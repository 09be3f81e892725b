"""deferred_rms_norm: the down linear, the residual add + RMSNorm after it and the next qkv projection → the linear
storing the sum, the weighted rows and their sums of squares (dflash.linear_add_norm_stats), the projection finishing
the norm (x_sumsq). deferred_mlp_norm: the same for the o linear, the post-attention norm and the gate|up GEMM
(dflash.linear_silu_mul's x_sumsq). Counts and numerics on our verify and draft steps (default pipeline, fp32 1e-5),
on transformers Qwen3 / Llama through backend="dflash" without Inductor, on a down → norm → attention block and an
o → norm → MLP block in fp32 and bf16 (also when the projection spells its defaults); the guards (normed rows read
elsewhere, a bias, a width that is no multiple of 64), each with its reason; CUDA lowerings under the interpreter."""

import os

import pytest
import torch
from pass_testing import (HFRMSNorm, assert_same_outputs, assert_verify_program_matches, check_pass,
                          demo_verify_program, export_graph, hf_through_backend_without_inductor, op_counts, run_passes)
from test_capture_passes import _assert_same, _ragged
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from torch_dflash.compiler import lowering
from torch_dflash.compiler.capture import DraftStep, capture_draft
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.passes import (add_rms_norm, canonicalize, cleanup, deferred_mlp_norm, deferred_rms_norm,
                                 linear_silu_mul, qkv_norm_rope, rms_norms, sibling_projections, silu_mul,
                                 weight_linears)

KIND, MLP_KIND = deferred_rms_norm.NAME, deferred_mlp_norm.NAME
PASSES = [canonicalize.PASS, qkv_norm_rope.PASS, rms_norms.PASS, add_rms_norm.PASS, cleanup.PASS,
          weight_linears.PASS, deferred_rms_norm.PASS]
MLP_PASSES = [canonicalize.PASS, sibling_projections.PASS, rms_norms.PASS, add_rms_norm.PASS, silu_mul.PASS,
              cleanup.PASS, weight_linears.PASS, linear_silu_mul.PASS, deferred_mlp_norm.PASS]
STATS, NORM = "dflash.linear_add_norm_stats.default", "dflash.add_rms_norm.default"
GLU, GLU_NORM = "dflash.linear_silu_mul.default", "dflash.add_rms_norm_linear_silu_mul.default"


def _finishing_glu(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is torch.ops.dflash.linear_silu_mul.default
            and n.kwargs.get("x_sumsq") is not None]


def test_our_verify_step_finishes_each_layers_input_norm_in_its_qkv_epilogue():
    target, program, report = demo_verify_program(4, "verify")
    boundaries = target.config.num_hidden_layers - 1  # the first norm reads the embedding, the last feeds lm_head
    assert report.fusions[KIND] == boundaries and not [r for r in report.rejections if r[0] == KIND]
    layers = target.config.num_hidden_layers  # every post-attention norm into the gate|up GEMM (deferred_mlp_norm)
    assert report.fusions[MLP_KIND] == layers and not [r for r in report.rejections if r[0] == MLP_KIND]
    counts = op_counts(program)
    assert counts[STATS] == boundaries + layers and counts[NORM] == 1 and counts[GLU_NORM] == 0
    assert counts[GLU] == len(_finishing_glu(program)) == layers
    assert_verify_program_matches(target, program, 4)


def test_our_draft_step_finishes_the_block_rows_norm_in_the_joined_qkv_epilogue():
    target, draft = build_demo_pair(seed=3, max_batch=2, max_seq_len=48)
    compile_step = pipeline_compile_step("cpu")
    program = compile_step(capture_draft(target, draft, max_batch=2).module(), "draft")
    report = compile_step.reports["draft"]
    assert report.fusions[KIND] == len(draft.layers) - 1 and not report.rejections
    assert report.fusions[MLP_KIND] == len(_finishing_glu(program)) == len(draft.layers)
    joined = [n for n in program.graph.nodes if n.target is torch.ops.dflash.context_qkv_norm_rope_cache.default]
    assert sum(n.kwargs.get("x_sumsq") is not None for n in joined) == len(draft.layers) - 1
    for batch in (1, 2):
        args = (torch.randn(batch, 5, draft.fc.in_features), _ragged(batch, 5),
                torch.randint(0, 1000, (batch, draft.block_size)), _ragged(batch, draft.block_size, offset=5))
        _assert_same(DraftStep(target, draft), program, args)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_defers_transformers_norms(kind):
    layers, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [layers - 1] * 2
    assert [f[MLP_KIND] for f in fusions] == [layers] * 2


class DownNormAttention(torch.nn.Module):
    """h → down + residual → RMSNorm → attention as transformers' Qwen3 spells it (q/k norms, rope in the
    activation dtype, GQA) + the sum; `leak` also returns the normed rows."""

    def __init__(self, hidden=64, inter=96, bias=False, leak=False, dtype=torch.float32, heads=(4, 2), hd=16):
        super().__init__()
        (self.nq, self.nkv), self.hd, self.leak = heads, hd, leak
        self.down = torch.nn.Linear(inter, hidden, bias=False, dtype=dtype)
        self.norm = HFRMSNorm(hidden, 1e-6, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(hidden, n * hd, bias=bias, dtype=dtype)
                                                 for n in (self.nq, self.nkv, self.nkv))
        self.o_proj = torch.nn.Linear(self.nq * hd, hidden, bias=False, dtype=dtype)
        self.q_norm, self.k_norm = HFRMSNorm(hd, 1e-6, dtype=dtype), HFRMSNorm(hd, 1e-6, dtype=dtype)
        self.register_buffer("inv_freq", 1.0 / 1e4 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

    def forward(self, h, residual, positions):
        total = residual + self.down(h)
        normed = self.norm(total)
        b, s = normed.shape[:2]
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(normed.dtype), emb.sin().to(normed.dtype)
        q = self.q_norm(self.q_proj(normed).view(b, s, -1, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(normed).view(b, s, -1, self.hd)).transpose(1, 2)
        v = self.v_proj(normed).view(b, s, -1, self.hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = total + self.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        return (out, normed) if self.leak else out


def _args(batch, seq, hidden=64, inter=96, dtype=torch.float32):
    return (torch.randn(batch, seq, inter, dtype=dtype), 4 * torch.randn(batch, seq, hidden, dtype=dtype),
            (3 + torch.arange(seq)).expand(batch, -1))


SEQ = torch.export.Dim("seq", min=2, max=32)
DYNAMIC = ({1: SEQ}, {1: SEQ}, {1: SEQ})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_down_norm_attention_block(dtype, tol):
    torch.manual_seed(0)
    _, gm, _ = check_pass(DownNormAttention(dtype=dtype), _args(2, 5, dtype=dtype), _args(2, 3, dtype=dtype), PASSES,
                          {KIND: 1}, DYNAMIC, atol=tol, rtol=tol)
    counts = op_counts(gm)
    assert counts[STATS] == 1 and counts[NORM] == 0 and counts["dflash.linear.default"] == 1  # o_proj's
    (projection,) = [n for n in gm.graph.nodes if n.target is torch.ops.dflash.qkv_norm_rope.default]
    assert projection.kwargs["x_eps"] == 1e-6 and projection.kwargs["x_sumsq"].args[1] == 2


def test_a_projection_that_spells_its_defaults_takes_the_statistic_by_keyword():
    """A re-exported graph may spell x_sumsq=None, x_eps=0.0 positionally: the pass replaces them, and a second
    run finds the projection finishing a norm already (no candidate left: no record)."""
    torch.manual_seed(0)
    module, args = DownNormAttention().eval(), _args(2, 5)
    gm = export_graph(module, args, DYNAMIC)
    run_passes(gm, PASSES[:-1])
    (projection,) = [n for n in gm.graph.nodes if n.target is torch.ops.dflash.qkv_norm_rope.default]
    projection.args = (*projection.args, None, 0.0)
    report = run_passes(gm, PASSES[-1:])
    assert report.fusions()[KIND] == 1 and len(projection.args) == 11 and projection.kwargs["x_eps"] == 1e-6
    gm.recompile()
    with torch.no_grad():
        for inputs in (args, _args(2, 3)):
            assert_same_outputs(module(*inputs), gm(*inputs))
    assert not run_passes(gm, PASSES[-1:]).fusions().get(KIND)


def _assert_cuda_lowering(model, args, second, passes, kind, dynamic, reader):
    """bf16: the pass's two ops on their Triton providers, within bf16 rounding of eager."""
    _, gm, _ = check_pass(model, args, second, passes, {kind: 1}, dynamic, atol=2e-2, rtol=2e-2)
    choices = lowering.lower(gm, "cuda")
    assert [c.provider for c in choices["linear_add_norm_stats"]] == ["triton"]
    assert [c.provider for c in choices[reader]] == ["triton"]
    for inputs in (args, second):
        want = model(*inputs).float()
        torch.testing.assert_close(gm(*inputs).float(), want, atol=3e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs Triton on CPU tensors")
def test_cuda_lowering_stores_the_statistic_in_the_gemm_and_finishes_it_in_the_epilogue():
    """The skinny GEMM's STATS epilogue, the head epilogue's row scale."""
    torch.manual_seed(0)
    _assert_cuda_lowering(DownNormAttention(dtype=torch.bfloat16), _args(2, 5, dtype=torch.bfloat16),
                          _args(2, 3, dtype=torch.bfloat16), PASSES, KIND, DYNAMIC, "qkv_norm_rope")


class OutNormMLP(torch.nn.Module):
    """attention output → o_proj + residual → RMSNorm → SwiGLU MLP (separate gate and up linears, merged by the
    pipeline) + the sum; `leak` also returns the normed rows."""

    def __init__(self, hidden=64, inter=96, bias=False, leak=False, dtype=torch.float32):
        super().__init__()
        self.leak = leak
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.norm = HFRMSNorm(hidden, 1e-6, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=bias, dtype=dtype)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=bias, dtype=dtype)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False, dtype=dtype)

    def forward(self, attn, residual):
        total = residual + self.o_proj(attn)
        normed = self.norm(total)
        out = total + self.down_proj(torch.nn.functional.silu(self.gate_proj(normed)) * self.up_proj(normed))
        return (out, normed) if self.leak else out


def _mlp_args(batch, seq, hidden=64, dtype=torch.float32):
    return torch.randn(batch, seq, hidden, dtype=dtype), 4 * torch.randn(batch, seq, hidden, dtype=dtype)


MLP_DYNAMIC = ({1: SEQ}, {1: SEQ})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_out_norm_mlp_block(dtype, tol):
    torch.manual_seed(0)
    _, gm, _ = check_pass(OutNormMLP(dtype=dtype), _mlp_args(2, 5, dtype=dtype), _mlp_args(2, 3, dtype=dtype),
                          MLP_PASSES, {MLP_KIND: 1}, MLP_DYNAMIC, atol=tol, rtol=tol)
    counts = op_counts(gm)
    assert counts[STATS] == 1 and counts[NORM] == 0 and counts["dflash.linear.default"] == 1  # down_proj's
    (glu,) = _finishing_glu(gm)
    assert glu.kwargs["x_eps"] == 1e-6 and glu.kwargs["x_sumsq"].args[1] == 2


BLOCKS = {  # block, its arguments, the passes, the kind, dynamic shapes, the reader's name in a rejection
    "qkv": (DownNormAttention, _args, PASSES, KIND, DYNAMIC, "qkv projection"),
    "mlp": (OutNormMLP, _mlp_args, MLP_PASSES, MLP_KIND, MLP_DYNAMIC, "gate|up GEMM"),
}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("case,model,hidden,reason", [
    ("leak", dict(leak=True), 64, "its normed rows are read by"),
    ("bias", dict(bias=True), 64, "adds a bias, which 1/rms applied after its GEMM would scale"),
    ("width", dict(hidden=32), 32, "the row width 32 is not a static multiple of 64"),
])
def test_guards_leave_the_norm_and_say_why(block, case, model, hidden, reason):
    module, make_args, passes, kind, dynamic, reader = BLOCKS[block]
    torch.manual_seed(0)
    _, gm, report = check_pass(module(**model), make_args(2, 5, hidden), make_args(2, 3, hidden), passes, {kind: 0},
                               dynamic)
    assert op_counts(gm)[NORM] == 1 and op_counts(gm)[STATS] == 0 and not _finishing_glu(gm)
    reasons = [r.reason for r in report.rejections() if r.pass_name == kind]
    assert len(reasons) == 1 and reason in reasons[0] and f"stays before the {reader}" in reasons[0], reasons


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs Triton on CPU tensors")
def test_cuda_lowering_finishes_the_post_attention_norm_in_the_gate_up_gemm():
    """The o GEMM's STATS epilogue, the gate|up GEMM's row scale (DEFERRED)."""
    torch.manual_seed(0)
    _assert_cuda_lowering(OutNormMLP(dtype=torch.bfloat16), _mlp_args(2, 5, dtype=torch.bfloat16),
                          _mlp_args(2, 3, dtype=torch.bfloat16), MLP_PASSES, MLP_KIND, MLP_DYNAMIC, "linear_silu_mul")
