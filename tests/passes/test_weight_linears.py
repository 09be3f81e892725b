"""weight_linears: our AR step (a verify of one token) through the default pipeline, transformers Qwen3 through
backend="dflash" (AOT spells its linears mm / addmm + t), counts and numerics (fp32, 1e-5); the linears it must
leave alone (reason recorded, graph untouched); the op's lowering per target (cpu → reference, cuda → Triton on
bf16 under the interpreter, fp32 declined with its reason), the Ascend codegen and the MLIR export of it.
(Our draft and verify steps: tests/test_capture_passes.py.)"""

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program, export_graph, op_counts,
                          run_passes)
from tiny_models import hf_causal_lm

import torch_dflash as td
from torch_dflash.compiler import lowering
from torch_dflash.compiler.ascend import emulation, generate_ascend_module, load_generated
from torch_dflash.compiler.capture import VerifyStep, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.passes import weight_linears

KIND = weight_linears.NAME
LINEAR = "dflash.linear.default"


class Projections(torch.nn.Module):
    """o-proj-like linear (no bias) then one with a bias, on x [B, S, K]."""

    def __init__(self, k=16, n=24, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Linear(k, n, bias=False, dtype=dtype)
        self.b = torch.nn.Linear(n, k, dtype=dtype)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


def test_our_ar_step_takes_every_weight_linear():
    """The verify step at block 1 (the target's AR step), batch 1..2: o, gate|up, down per layer and lm_head (each
    gate|up then joined with its SwiGLU product: linear_silu_mul; each o with the post-attention norm after it:
    deferred_mlp_norm; each down but the last with the next layer's input norm: deferred_rms_norm)."""
    target, program, report = demo_verify_program(1, "ar")
    layers = target.config.num_hidden_layers
    assert report.fusions[KIND] == 3 * layers + 1 and not report.rejections
    counts = op_counts(program)
    assert counts[LINEAR] == 2 and counts["dflash.linear_silu_mul.default"] == layers   # lm_head, one down
    assert counts["dflash.linear_add_norm_stats.default"] == 2 * layers - 1
    assert counts["aten.linear.default"] == 0
    assert report.providers["linear"] == ["reference"] * 2
    assert report.providers["linear_silu_mul"] == ["reference"] * layers
    assert_verify_program_matches(target, program, 1)


def test_backend_on_transformers_qwen3_takes_the_aot_linears():
    """AOT's mm(x, t(w)) / addmm: canonicalize makes them linears, the pass takes o, gate|up, down, lm_head."""
    torch._dynamo.reset()
    model = hf_causal_lm("qwen3")
    layers = model.config.num_hidden_layers
    fast = torch.compile(model, backend="dflash", options={"inductor": False})
    for length in (8, 5):  # the second length recompiles (automatic dynamic): counted and checked again
        ids = torch.randint(0, 128, (2, length))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       atol=1e-5, rtol=1e-5)
        report = td.last_report()
        assert report.fusions[KIND] == 3 * layers + 1 and report.fusions["canonicalize.linear"] > 0
        assert not [r for r in report.rejections if r[0] == KIND]


def test_bias_stays_inside_the_op_and_a_symbolic_row_count_reaching_32_is_taken():
    seq = torch.export.Dim("seq", min=2, max=64)
    _, gm, _ = check_pass(Projections(), (torch.randn(2, 5, 16),), (torch.randn(2, 9, 16),), [weight_linears.PASS],
                          {KIND: 2}, ({1: seq},))
    biased = [n for n in gm.graph.nodes if str(n.target) == LINEAR and n.args[2] is not None]
    assert len(biased) == 1 and biased[0].args[2].target == "b.bias"


class InputWeight(torch.nn.Module):
    def forward(self, x, w):
        return F.linear(x, w)


class VectorWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        return F.linear(x, self.w)


@pytest.mark.parametrize("module,args,dims,reason", [
    (InputWeight(), (torch.randn(2, 3, 16), torch.randn(8, 16)), None, r"is a graph value, not a constant"),
    (VectorWeight(), (torch.randn(2, 3, 16),), None, r"is 1-D, not \[N, K\]"),
    (Projections(), (torch.randn(4, 16, 16),), None, r"has at least 64 rows \(> 32\)"),
    (Projections(), (torch.randn(1, 40, 16),), ({1: torch.export.Dim("seq", min=33, max=64)},),
     r"has at least 33 rows \(> 32\)"),
])
def test_refusals_leave_the_graph_and_say_why(module, args, dims, reason):
    gm = export_graph(module, args, dims)
    before = copy.deepcopy(gm)
    report = run_passes(gm, [weight_linears.PASS])
    assert report.fusions() == {} and report.rejections()
    assert all(r.pass_name == KIND and re.search(reason, r.reason) for r in report.rejections()), report.rejections()
    assert gm.code == before.code
    torch.testing.assert_close(gm(*args), module(*args))


def _taken(dtype, seq=5):
    gm = export_graph(Projections(dtype=dtype).eval(), (torch.randn(2, seq, 16, dtype=dtype),))
    run_passes(gm, [weight_linears.PASS])
    return gm


def test_lowering_cpu_keeps_the_reference_and_fp32_declines_triton():
    assert [c.provider for c in lowering.lower(_taken(torch.float32), "cpu")["linear"]] == ["reference"] * 2
    [choice, _] = lowering.lower(_taken(torch.float32), "cuda")["linear"]
    assert choice.provider == "reference"
    assert ("triton", "the skinny GEMM takes bf16/fp16, not torch.float32") in choice.declined


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs Triton on CPU tensors")
def test_lowering_cuda_picks_triton_for_bf16_and_computes_the_same():
    gm = _taken(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    want = gm(x)
    assert [c.provider for c in lowering.lower(gm, "cuda")["linear"]] == ["triton"] * 2
    assert op_counts(gm)["dflash_triton.linear.default"] == 2
    torch.testing.assert_close(gm(x).float(), want.float(), atol=2e-2, rtol=2e-2)


def test_cuda_lowering_keeps_the_draft_steps_dynamic_token_dims():
    """Asking the Triton providers whether they serve a symbolic row count must not specialize it (torch.Size.numel()
    on the draft's dynamic context length did: the re-exported program then refused every other length)."""
    from torch_dflash.compiler.capture import capture_draft
    from torch_dflash.passes.pipeline import default_pass_manager

    target, draft = build_demo_pair(seed=3, dtype=torch.bfloat16, max_batch=2, max_seq_len=64)
    gm = capture_draft(target, draft, max_batch=2).module()
    context = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "context_features")
    default_pass_manager().run(gm)
    lowering.lower(gm, "cuda")
    batch, length, _ = context.meta["val"].shape
    assert isinstance(batch, torch.SymInt) and isinstance(length, torch.SymInt), context.meta["val"].shape
    assert not isinstance(length.node.expr, int) and not length.node.expr.is_number, length


def test_ascend_codegen_emits_f_linear_and_runs_like_the_graph():
    gm = _taken(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    source = generate_ascend_module(gm)
    assert source.count("def ascend_linear_") == 2 and source.count("return torch.nn.functional.linear(") == 2
    torch.testing.assert_close(load_generated(source, emulation, gm)(x), gm(x))


def test_mlir_export_decomposes_dflash_linear():
    pytest.importorskip("torch_mlir")
    from torch_dflash.compiler.mlir import to_mlir

    gm = _taken(torch.float32)
    program = torch.export.export(gm, (torch.randn(2, 5, 16),), strict=False)
    assert sum(str(n.target) == LINEAR for n in program.graph.nodes) == 2
    text = to_mlir(program, "linalg")
    assert "linalg.matmul" in text and "dflash" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("block", [1, 16])
def test_gpu_bf16_steps_run_the_skinny_gemm(block):
    """The demo target in bf16 on the GPU, AR (block 1, batch 1 and 2) and verify (block 16, batch 1: at batch 2 the
    32 rows are left to cuBLAS for the demo's small weights, by the serve rule) steps: every dflash.linear,
    dflash.linear_add_norm_stats (o and down with the next norm's statistic) and dflash.linear_silu_mul (the gate|up
    GEMMs finishing the post-attention norm) lowers to Triton, and the step's logits are as close to the fp32
    model's as eager bf16's are."""
    max_batch = 2 if block == 1 else 1
    target, _ = build_demo_pair(seed=3, device="cuda", dtype=torch.bfloat16, max_batch=max_batch, max_seq_len=64)
    fp32, _ = build_demo_pair(seed=3, device="cuda", max_batch=max_batch, max_seq_len=64)
    compile_step = pipeline_compile_step("cuda")
    program = compile_step(capture_verify(target, block_size=block, max_batch=max_batch).module(), "step")
    providers = compile_step.reports["step"].providers
    assert set(providers["linear"]) == set(providers["linear_add_norm_stats"]) == set(providers["linear_silu_mul"]) \
        == {"triton"}

    def error(logits, reference):
        return ((logits.float() - reference).norm() / reference.norm()).item()

    for batch in range(1, max_batch + 1):
        args = (torch.randint(0, 1000, (batch, block), device="cuda"),
                (9 + torch.arange(block, device="cuda")).expand(batch, block).contiguous())
        with torch.no_grad():
            reference = VerifyStep(fp32)(*args)[0]
            eager, got = VerifyStep(target)(*args)[0], program(*args)[0]
        assert error(got, reference) <= error(eager, reference) + 0.01
