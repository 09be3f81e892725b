"""add_rms_norm_linear_silu_mul: dflash.add_rms_norm and the dflash.linear_silu_mul that reads its normed output →
one op. Counts and numerics on our verify step (default pipeline less deferred_mlp_norm, which takes these norms
first), on transformers Qwen3 / Llama through backend="dflash" without Inductor (fp32, 1e-5; the same pass off), on
a pre-norm MLP block in fp32 and bf16; the guard (the normed output read elsewhere too) and a linear_silu_mul
without a norm in front (no candidate: no record)."""

import os

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts)
from test_rms_norms import DYNAMIC

from torch_dflash.compiler import lowering
from torch_dflash.passes import (add_rms_norm, add_rms_norm_linear_silu_mul, canonicalize, cleanup, deferred_mlp_norm,
                                 linear_silu_mul, rms_norms, silu_mul, weight_linears)

KIND, MLP_FIRST = add_rms_norm_linear_silu_mul.NAME, deferred_mlp_norm.NAME
PASSES = [canonicalize.PASS, rms_norms.PASS, add_rms_norm.PASS, silu_mul.PASS, cleanup.PASS, weight_linears.PASS,
          linear_silu_mul.PASS, add_rms_norm_linear_silu_mul.PASS]
OP = "dflash.add_rms_norm_linear_silu_mul.default"


def test_our_verify_step_joins_every_post_attention_norm():
    """With deferred_mlp_norm, which takes these norms first in the default pipeline, disabled."""
    target, program, report = demo_verify_program(4, "verify", disabled=(MLP_FIRST,))
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == layers and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)
    assert counts[OP] == layers and counts["dflash.linear_silu_mul.default"] == 0
    assert_verify_program_matches(target, program, 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_joins_transformers_layers(kind):
    layers, fusions = hf_through_backend_without_inductor(kind, disabled=(MLP_FIRST,))
    assert [f[KIND] for f in fusions] == [layers] * 2


class PreNormMLP(torch.nn.Module):
    """residual + attn → RMSNorm → down(silu(gate) · up) + the sum; `leak` also returns the normed rows."""

    def __init__(self, leak=False, dtype=torch.float32, d=32, inter=48):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=1e-6, dtype=dtype)
        self.gate_up = torch.nn.Linear(d, 2 * inter, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(inter, d, bias=False, dtype=dtype)
        self.leak, self.inter = leak, inter
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.1 * torch.randn(d))

    def forward(self, attn, residual):
        total = attn + residual
        normed = self.norm(total)
        gate, up = self.gate_up(normed).split(self.inter, dim=-1)
        out = total + self.down(torch.nn.functional.silu(gate) * up)
        return (out, normed) if self.leak else out


DYNAMIC2 = DYNAMIC * 2


def test_pre_norm_mlp_fp32_and_bf16():
    args, second = (torch.randn(2, 5, 32), torch.randn(2, 5, 32)), (torch.randn(3, 2, 32), torch.randn(3, 2, 32))
    _, gm, _ = check_pass(PreNormMLP(), args, second, PASSES, {KIND: 1}, DYNAMIC2)
    counts = op_counts(gm)
    assert counts[OP] == 1 and counts["dflash.add_rms_norm.default"] == 0 and counts["dflash.linear.default"] == 1
    bf16 = tuple(tuple(t.to(torch.bfloat16) for t in a) for a in (args, second))
    check_pass(PreNormMLP(dtype=torch.bfloat16), *bf16, PASSES, {KIND: 1}, DYNAMIC2, atol=2e-2, rtol=2e-2)


def test_guard_leaves_a_norm_read_elsewhere():
    args, second = (torch.randn(2, 5, 32), torch.randn(2, 5, 32)), (torch.randn(3, 2, 32), torch.randn(3, 2, 32))
    _, gm, report = check_pass(PreNormMLP(leak=True), args, second, PASSES, {KIND: 0}, DYNAMIC2)
    assert op_counts(gm)["dflash.add_rms_norm.default"] == 1 and op_counts(gm)[OP] == 0
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith("its normed output is read elsewhere too"), reasons


def test_a_linear_silu_mul_without_a_norm_in_front_is_no_candidate():
    from test_linear_silu_mul import MergedMLP
    _, gm, report = check_pass(MergedMLP(), (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),), PASSES, {KIND: 0},
                               DYNAMIC)
    assert op_counts(gm)["dflash.linear_silu_mul.default"] == 1
    assert not [r for r in report.rejections() if r.pass_name == KIND]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs Triton on CPU tensors")
def test_cuda_lowering_runs_the_norm_in_the_gemm():
    """bf16: the folded weight (a constant with a fake value, as the providers' checks read it) and the Triton
    provider, whose GEMM normalizes the rows, within bf16 rounding of the unfused graph."""
    args = tuple(t.to(torch.bfloat16) for t in (torch.randn(2, 5, 32), torch.randn(2, 5, 32)))
    second = tuple(t.to(torch.bfloat16) for t in (torch.randn(3, 2, 32), torch.randn(3, 2, 32)))
    model = PreNormMLP(dtype=torch.bfloat16)
    _, gm, _ = check_pass(model, args, second, PASSES, {KIND: 1}, DYNAMIC2, atol=2e-2, rtol=2e-2)
    folded = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("dflash_norm_folded_w")]
    assert len(folded) == 1 and folded[0].meta["val"].shape == (96, 32)
    assert [c.provider for c in lowering.lower(gm, "cuda")[KIND]] == ["triton"]
    want = model(*args)
    torch.testing.assert_close(gm(*args).float(), want.float(), atol=3e-2 * want.float().abs().max().item(),
                               rtol=2e-2)
