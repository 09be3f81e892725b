"""embedding_rms_norm: the token embedding gather and the norm that reads it → one dflash.embedding_rms_norm. Counts
and numerics on our draft and verify steps (default pipeline, fp32 1e-5), on transformers Qwen3 through
backend="dflash" without Inductor, on the HF spelling in fp32 and bf16 (bitwise the graph without the pass, with or
without padding_idx); the guard (a scaled embedding stays, reason recorded)."""

import pytest
import torch
from pass_testing import (assert_verify_program_matches, check_pass, demo_verify_program,
                          hf_through_backend_without_inductor, op_counts, run_passes)
from test_capture_passes import _assert_same, _ragged
from test_rms_norms import DYNAMIC, HFNorm

from torch_dflash.compiler.capture import DraftStep, capture_draft
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.passes import add_rms_norm, canonicalize, cleanup, embedding_rms_norm, rms_norms

KIND = embedding_rms_norm.NAME
PASSES = [canonicalize.PASS, rms_norms.PASS, add_rms_norm.PASS, embedding_rms_norm.PASS, cleanup.PASS]
FUSED, GATHER = "dflash.embedding_rms_norm.default", "aten.embedding.default"


def test_our_verify_step_fuses_the_first_input_norm():
    target, program, report = demo_verify_program(4, "verify")
    assert report.fusions[KIND] == 1 and not [r for r in report.rejections if r[0] == KIND]
    assert op_counts(program)[FUSED] == 1 and op_counts(program)[GATHER] == 0
    assert_verify_program_matches(target, program, 4)


def test_our_draft_step_fuses_the_block_embeddings_first_norm():
    target, draft = build_demo_pair(seed=3, max_batch=2, max_seq_len=48)
    compile_step = pipeline_compile_step("cpu")
    program = compile_step(capture_draft(target, draft, max_batch=2).module(), "draft")
    assert compile_step.reports["draft"].fusions[KIND] == 1 and not compile_step.reports["draft"].rejections
    assert op_counts(program)[FUSED] == 1 and op_counts(program)[GATHER] == 0
    for batch in (1, 2):
        args = (torch.randn(batch, 5, draft.fc.in_features), _ragged(batch, 5),
                torch.randint(0, 1000, (batch, draft.block_size)), _ragged(batch, draft.block_size, offset=5))
        _assert_same(DraftStep(target, draft), program, args)


def test_backend_without_inductor_fuses_transformers_qwen3():
    _, fusions = hf_through_backend_without_inductor("qwen3")
    assert [f[KIND] for f in fusions] == [1, 1]


class EmbedNorm(torch.nn.Module):
    """embed_tokens → (× scale) → HF norm → residual + linear → HF norm: the first decoder layer's spelling."""

    def __init__(self, d=32, vocab=50, scale=1.0, padding_idx=None, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d, padding_idx=padding_idx, dtype=dtype)
        self.norm = HFNorm(d, dtype)
        self.scale = scale

    def forward(self, ids):
        e = self.embed(ids)
        e = e if self.scale == 1.0 else e * self.scale
        h = self.norm.norm(e, self.norm.w1)
        return self.norm.norm(e + self.norm.lin(h), self.norm.w2)


IDS, SECOND = (torch.randint(0, 50, (2, 5)),), (torch.randint(0, 50, (3, 2)),)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_hf_spelling_is_bitwise_the_unfused_graph(dtype, tol, padding_idx):
    """padding_idx changes only the gradient: fused too. Against eager within the norm's own rounding (bf16: HF
    rounds twice); against the pipeline without this pass, bitwise."""
    module = EmbedNorm(padding_idx=padding_idx, dtype=dtype)
    before, gm, _ = check_pass(module, IDS, SECOND, PASSES, {KIND: 1}, DYNAMIC, atol=tol, rtol=tol)
    assert op_counts(gm)[FUSED] == 1 and op_counts(gm)[GATHER] == 0
    run_passes(before, PASSES[:3] + PASSES[4:])
    assert op_counts(before)[GATHER] == 1
    for ids in (IDS[0], SECOND[0]):
        assert torch.equal(gm(ids), before(ids))


def test_a_scaled_embedding_stays():
    """z-lab's input_embedding_scale ≠ 1 (Gemma's normalizer alike): the norm reads e · scale, not the gather."""
    _, gm, report = check_pass(EmbedNorm(scale=2.0), IDS, SECOND, PASSES, {KIND: 0}, DYNAMIC)
    assert op_counts(gm)[GATHER] == 1 and op_counts(gm)[FUSED] == 0
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and "through %mul (mul.Tensor): a scale or cast the fused op does not apply" in reasons[0]
