"""linear_silu_mul: the merged gate|up dflash.linear and the silu_mul of its halves → one dflash.linear_silu_mul.
Counts and numerics on our verify step (default pipeline), on transformers Qwen3 / Llama through backend="dflash"
without Inductor (fp32, 1e-5), on a merged MLP in fp32 and bf16 (slices and split); the guards (the output or a
half read elsewhere, halves swapped) and a prefill-sized graph (no candidate: no record)."""

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts)
from test_rms_norms import DYNAMIC

from torch_dflash.passes import canonicalize, cleanup, linear_silu_mul, silu_mul, weight_linears

KIND = linear_silu_mul.NAME
PASSES = [canonicalize.PASS, silu_mul.PASS, cleanup.PASS, weight_linears.PASS, linear_silu_mul.PASS]
OP = "dflash.linear_silu_mul.default"


def test_our_verify_step_joins_every_mlp():
    target, program, report = demo_verify_program(4, "verify")
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == layers and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)   # each then given the deferred norm in front (pass deferred_mlp_norm)
    assert counts["dflash.add_rms_norm_linear_silu_mul.default"] == 0 and counts[OP] == layers
    glus = [n for n in program.graph.nodes if n.target is torch.ops.dflash.linear_silu_mul.default]
    assert len(glus) == layers and all(n.kwargs.get("x_sumsq") is not None for n in glus)
    assert counts["dflash.silu_mul.default"] == 0
    assert_verify_program_matches(target, program, 4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_joins_transformers_mlps(kind):
    layers, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [layers] * 2


class MergedMLP(torch.nn.Module):
    """down(silu(gate) * up) over one merged gate|up linear, its halves taken by `style` ("slice" or "split");
    `swapped` takes silu of the second half, `leak` also returns the merged output, `leak_half` the gate half."""

    def __init__(self, style="slice", swapped=False, leak=False, leak_half=False, dtype=torch.float32, d=32,
                 inter=48):
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * inter, bias=True, dtype=dtype)
        self.down = torch.nn.Linear(inter, d, bias=False, dtype=dtype)
        self.style, self.swapped, self.leak, self.leak_half, self.inter = style, swapped, leak, leak_half, inter

    def forward(self, x):
        y = self.gate_up(x)
        if self.style == "split":
            gate, up = y.split(self.inter, dim=-1)
        else:
            gate, up = y[..., :self.inter], y[..., self.inter:]
        if self.swapped:
            gate, up = up, gate
        h = self.down(torch.nn.functional.silu(gate) * up)
        return (h, y) if self.leak else (h, gate) if self.leak_half else h


@pytest.mark.parametrize("style", ["slice", "split"])
def test_merged_mlp_fp32_and_bf16(style):
    args, second = (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),)
    _, gm, _ = check_pass(MergedMLP(style), args, second, PASSES, {KIND: 1}, DYNAMIC)
    counts = op_counts(gm)
    assert counts[OP] == 1 and counts["dflash.silu_mul.default"] == 0 and counts["dflash.linear.default"] == 1
    bf16 = tuple(tuple(t.to(torch.bfloat16) for t in a) for a in (args, second))
    check_pass(MergedMLP(style, dtype=torch.bfloat16), *bf16, PASSES, {KIND: 1}, DYNAMIC, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant,reason", [
    ("leak", "the halves or the output of %linear_default (linear.default) are read elsewhere too"),
    ("leak_half", "the halves or the output of %linear_default (linear.default) are read elsewhere too"),
    ("swapped", "its operands are not the first and second halves of %linear_default (linear.default)")])
def test_guards_leave_the_pair(variant, reason):
    _, gm, report = check_pass(MergedMLP(**{variant: True}), (torch.randn(2, 5, 32),), (torch.randn(3, 2, 32),),
                               PASSES, {KIND: 0}, DYNAMIC)
    assert op_counts(gm)["dflash.silu_mul.default"] == 1 and op_counts(gm)[OP] == 0
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith(reason), reasons


def test_a_prefill_sized_graph_is_no_candidate():
    """64 rows: weight_linears keeps aten.linear (and records why); the product is not this pass's candidate."""
    _, gm, report = check_pass(MergedMLP(), (torch.randn(2, 32, 32),), (torch.randn(3, 40, 32),), PASSES,
                               {KIND: 0}, ({0: torch.export.Dim("batch", min=2, max=8),
                                            1: torch.export.Dim("seq", min=32, max=64)},))
    assert op_counts(gm)["dflash.silu_mul.default"] == 1
    assert not [r for r in report.rejections() if r.pass_name == KIND]
