"""add_rms_norm: a residual add and the RMSNorm after it → one dflash.add_rms_norm. Counts and numerics on our
verify step (default pipeline), on transformers Qwen3 / Llama through backend="dflash" without Inductor (fp32,
1e-5) and on the HF spelling in fp32 and bf16; the guard (a broadcast add stays, reason recorded)."""

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts)
from test_rms_norms import DYNAMIC, HFNorm

from torch_dflash.passes import add_rms_norm, canonicalize, cleanup, rms_norms

KIND = add_rms_norm.NAME
PASSES = [canonicalize.PASS, rms_norms.PASS, add_rms_norm.PASS, cleanup.PASS]
FUSED, NORM = "dflash.add_rms_norm.default", "dflash.rms_norm.default"


def test_our_verify_step_fuses_both_residual_adds_of_every_layer():
    """Attention output + residual → post-attention norm, MLP output + residual → the next input norm (the last
    one: the final norm); the first layer's input norm reads the embeddings, no add (embedding_rms_norm's). The
    post-attention ones then go into the o GEMM and the gate|up GEMM (deferred_mlp_norm), the next input norms into
    the down GEMM and the next qkv epilogue (deferred_rms_norm, last in the pipeline): the final norm stays."""
    target, program, report = demo_verify_program(4, "verify")
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == 2 * layers and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)
    assert counts["dflash.add_rms_norm_linear_silu_mul.default"] == 0
    assert counts[FUSED] == 1 and counts["dflash.linear_add_norm_stats.default"] == 2 * layers - 1
    assert counts["dflash.embedding_rms_norm.default"] == 1
    assert counts[NORM] == 0 and counts["aten.add.Tensor"] == 0
    assert_verify_program_matches(target, program, 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_fuses_transformers_residual_adds(kind):
    layers, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [2 * layers] * 2


def test_hf_spelling_fp32_and_bf16():
    """HFNorm: norm(x) → linear → x + that → norm: the second norm takes its add; the first has none."""
    _, gm, _ = check_pass(HFNorm(), (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),), PASSES, {KIND: 1}, DYNAMIC)
    assert op_counts(gm)[FUSED] == 1 and op_counts(gm)[NORM] == 1 and op_counts(gm)["aten.add.Tensor"] == 0
    check_pass(HFNorm(dtype=torch.bfloat16), (torch.randn(2, 5, 32, dtype=torch.bfloat16),),
               (torch.randn(3, 2, 32, dtype=torch.bfloat16),), PASSES, {KIND: 1}, DYNAMIC, atol=2e-2, rtol=2e-2)


class BiasThenNorm(torch.nn.Module):
    """x + a bias vector (broadcast over the tokens), then a norm: the op takes two operands of one shape."""

    def __init__(self, d=32):
        super().__init__()
        self.bias, self.w = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return torch.nn.functional.rms_norm(x + self.bias, (x.shape[-1],), self.w, 1e-6)


def test_a_broadcast_add_stays():
    before, gm, report = check_pass(BiasThenNorm(), (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),), PASSES,
                                    {KIND: 0, rms_norms.NAME: 1}, DYNAMIC)
    assert op_counts(gm)[NORM] == 1 and op_counts(gm)["aten.add.Tensor"] == 1
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith("an operand of the add is broadcast, promoted or not a tensor")
