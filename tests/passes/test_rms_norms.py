"""rms_norms: the RMSNorms the fusions leave → dflash.rms_norm. Counts and numerics on our verify step through the
default pipeline and on transformers Qwen3 / Llama through backend="dflash" without Inductor (fp32, 1e-5); the
bf16 spelling of HF (one rounding apart, within bf16 tolerance); the guard (a wider output stays, reason
recorded); and the callers that hand the graph to Inductor skip the pass."""

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts)

from torch_dflash.compiler import backend
from torch_dflash.compiler.capture import capture_verify
from torch_dflash.compiler.step_compiler import inductor_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.passes import canonicalize, cleanup, rms_norms
from torch_dflash.passes.pipeline import skipped_before_inductor

KIND = rms_norms.NAME
DYNAMIC = ({0: torch.export.Dim("batch", min=2, max=8), 1: torch.export.Dim("seq", min=1, max=16)},)
NORM = "dflash.rms_norm.default"


class HFNorm(torch.nn.Module):
    """transformers' Qwen3RMSNorm spelling (fp32 statistics, cast back, then the weight), twice, around a linear."""

    def __init__(self, d=32, dtype=torch.float32):
        super().__init__()
        self.w1 = torch.nn.Parameter(1 + 0.1 * torch.randn(d, dtype=dtype))
        self.w2 = torch.nn.Parameter(1 + 0.1 * torch.randn(d, dtype=dtype))
        self.lin = torch.nn.Linear(d, d, bias=False, dtype=dtype)

    @staticmethod
    def norm(x, w, eps=1e-6):
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(x.dtype)

    def forward(self, x):
        h = self.norm(x, self.w1)
        return self.norm(x + self.lin(h), self.w2)


def test_our_verify_step_takes_every_layer_norm_and_the_final_one():
    """Per layer the input and post-attention norms (q/k norms are qkv_norm_rope's), and the final norm."""
    target, program, report = demo_verify_program(4, "verify")
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == 2 * layers + 1 and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)   # add_rms_norm takes the norms that read a residual add, embedding_rms_norm the first
    assert counts[NORM] + counts["dflash.add_rms_norm.default"] + counts["dflash.embedding_rms_norm.default"] + \
        counts["dflash.add_rms_norm_linear_silu_mul.default"] + counts["dflash.linear_add_norm_stats.default"] == \
        2 * layers + 1   # the last two: with the gate|up GEMM, and finished by the next qkv epilogue
    assert counts["aten.rsqrt.default"] == 0 and counts["aten.mean.dim"] == 0
    assert_verify_program_matches(target, program, 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_takes_transformers_norms(kind):
    layers, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [2 * layers + 1] * 2


def test_hf_spelling_fp32_and_bf16():
    passes = [canonicalize.PASS, rms_norms.PASS, cleanup.PASS]  # cleanup drops the spellings' dead ops
    _, gm, _ = check_pass(HFNorm(), (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),), passes, {KIND: 2}, DYNAMIC)
    assert op_counts(gm)[NORM] == 2 and op_counts(gm)["aten.pow.Tensor_Scalar"] == 0
    # bf16: the op rounds once where HF rounds before and after the weight product
    check_pass(HFNorm(dtype=torch.bfloat16), (torch.randn(2, 5, 32, dtype=torch.bfloat16),),
               (torch.randn(3, 2, 32, dtype=torch.bfloat16),), passes, {KIND: 2}, DYNAMIC, atol=2e-2, rtol=2e-2)


class WideNorm(torch.nn.Module):
    """F.rms_norm-like product whose fp32 weight makes a bf16 input's norm fp32: the op cannot store that."""

    def __init__(self, d=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        xf = x.float()
        return self.w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_a_norm_wider_than_its_input_stays():
    module = WideNorm()
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    before, gm, report = check_pass(module, (x,), (torch.randn(4, 1, 16, dtype=torch.bfloat16),), [rms_norms.PASS],
                                    {}, DYNAMIC)
    assert KIND not in report.fusions() and op_counts(gm) == op_counts(before)
    reasons = [r.reason for r in report.results[0].rejections]
    assert len(reasons) == 1 and "returns torch.float32 from torch.bfloat16 input" in reasons[0]


def test_callers_that_hand_the_graph_to_inductor_skip_the_pass():
    fused_by_inductor = (KIND, "add_rms_norm", "embedding_rms_norm", "silu_mul", "linear_silu_mul", "rope_cos_sin",
                         "joined_positions", "deferred_mlp_norm", "add_rms_norm_linear_silu_mul", "deferred_rms_norm",
                         "kv_cache_writes", "context_qkv")
    assert skipped_before_inductor(()) == fused_by_inductor
    assert skipped_before_inductor(("cleanup", KIND)) == ("cleanup", *fused_by_inductor)
    target, _ = build_demo_pair(seed=3, max_batch=1, max_seq_len=32)
    compile_step = inductor_compile_step("cpu", backend="aot_eager")
    compile_step(capture_verify(target, block_size=4, max_batch=1).module(), "verify")
    assert KIND not in compile_step.reports["verify"].fusions
    assert backend._disabled(backend.BackendOptions(inductor=True, disable=("cleanup",))) == \
        ("cleanup", *fused_by_inductor)
    assert backend._disabled(backend.BackendOptions(inductor=False)) == ()
