"""silu_mul: SwiGLU's silu(gate) · up → one dflash.silu_mul. Counts and numerics on our verify step (default
pipeline), on transformers Qwen3 / Llama through backend="dflash" without Inductor (fp32, 1e-5), on a merged and
an unmerged MLP in fp32 and bf16 (either operand order); the guards (silu read elsewhere, a broadcast operand)."""

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts)
from test_rms_norms import DYNAMIC

from torch_dflash.passes import canonicalize, cleanup, silu_mul

KIND = silu_mul.NAME
PASSES = [canonicalize.PASS, silu_mul.PASS, cleanup.PASS]
OP = "dflash.silu_mul.default"


def test_our_verify_step_fuses_every_mlp():
    target, program, report = demo_verify_program(4, "verify")
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == layers and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)   # each product then joined with its gate|up linear (the norm in front deferred)
    assert counts["dflash.linear_silu_mul.default"] == layers and counts["aten.silu.default"] == 0
    assert_verify_program_matches(target, program, 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_fuses_transformers_mlps(kind):
    layers, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [layers] * 2


class SwiGLU(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) as HF writes it, or with one merged gate|up linear split in halves, or with the
    product's operands swapped; `leak` also returns silu(gate), `bias` multiplies by a broadcast vector instead."""

    def __init__(self, merged=False, swapped=False, leak=False, bias=False, dtype=torch.float32, d=32, inter=48):
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * inter, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(inter, d, bias=False, dtype=dtype)
        self.scale = torch.nn.Parameter(torch.randn(inter, dtype=dtype))
        self.merged, self.swapped, self.leak, self.bias, self.inter = merged, swapped, leak, bias, inter

    def forward(self, x):
        if self.merged:
            gate, up = self.gate_up(x).split(self.inter, dim=-1)
        else:
            w_gate, w_up = self.gate_up.weight.split(self.inter)
            gate, up = torch.nn.functional.linear(x, w_gate), torch.nn.functional.linear(x, w_up)
        up = self.scale if self.bias else up
        act = torch.nn.functional.silu(gate)
        h = up * act if self.swapped else act * up
        return (self.down(h), act) if self.leak else self.down(h)


@pytest.mark.parametrize("merged,swapped", [(False, False), (True, False), (True, True)])
def test_swiglu_fp32_and_bf16(merged, swapped):
    args, second = (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),)
    _, gm, _ = check_pass(SwiGLU(merged, swapped), args, second, PASSES, {KIND: 1}, DYNAMIC)
    assert op_counts(gm)[OP] == 1 and op_counts(gm)["aten.silu.default"] == 0
    bf16 = tuple(tuple(t.to(torch.bfloat16) for t in a) for a in (args, second))
    check_pass(SwiGLU(merged, swapped, dtype=torch.bfloat16), *bf16, PASSES, {KIND: 1}, DYNAMIC, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant,reason", [("leak", "silu's result is read elsewhere too"),
                                            ("bias", "gate and up differ in shape or dtype (broadcast or promoted)")])
def test_guards_leave_the_product(variant, reason):
    module = SwiGLU(merged=True, **{variant: True})
    before, gm, report = check_pass(module, (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),), PASSES, {KIND: 0},
                                    DYNAMIC)
    assert op_counts(gm)["aten.silu.default"] == 1 and op_counts(gm)[OP] == 0
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith(reason)
