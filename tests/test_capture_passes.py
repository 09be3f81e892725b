"""The pass pipeline on OUR captured draft and verify steps, with a dynamic batch 1..max_batch (max_batch 2, the
degenerate export range, included): every layer fused as with a static batch, attention kinds selected, and the
rewritten programs equal the model as written at batch 1 and at batch max_batch, positions ragged per row. The
linears the fusions leave become dflash.linear (weight_linears): o, gate|up, down per layer, lm_head (+ fc)."""

import pytest
import torch
from tiny_models import mhc_decoder_lm, run_with_random_caches

from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair

STARTS = (7, 0, 12, 3)  # the first position of each row's step: every row at its own place in the cache


@pytest.fixture(scope="module", params=[2, 3, 4])
def pair(request):
    """(target, draft, max_batch): the demo pair with caches of max_batch rows."""
    return *build_demo_pair(seed=5, max_batch=request.param, max_seq_len=48), request.param


def _compiled(program, kind):
    compile_step = pipeline_compile_step("cpu")
    return compile_step(program.module(), kind), compile_step.reports[kind]


def _kinds(report):
    return {kind: n for kind, n in report.fusions.items() if not kind.startswith(("canonicalize.", "cleanup."))}


def _assert_same(eager_step, program, args):
    (want, want_caches), (got, got_caches) = (run_with_random_caches(step, args) for step in (eager_step, program))
    assert want_caches.keys() == got_caches.keys() and want_caches
    for a, b in zip(want + tuple(want_caches.values()), got + tuple(got_caches[k] for k in want_caches)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _ragged(batch, length, offset=0):
    return (torch.tensor(STARTS[:batch])[:, None] + offset + torch.arange(length)).contiguous()


def test_draft_step_fuses_every_layer(pair):
    target, draft, max_batch = pair
    layers, b = len(draft.layers), draft.block_size
    program, report = _compiled(capture_draft(target, draft, max_batch=max_batch), "draft")
    assert _kinds(report) == {"kv_materialize": layers, "qkv_norm_rope": layers, "attention.non_causal": layers,
                              "merge_sibling_projections": layers, "weight_linears": 3 * layers + 2,  # + fc, lm_head
                              "rms_norms": 2 * layers + 2,  # + the final norm and the context's hidden_norm
                              "add_rms_norm": 2 * layers,  # all but the first input norm and hidden_norm read an add
                              "embedding_rms_norm": 1,  # the first input norm reads the block's embeddings
                              "silu_mul": layers, "linear_silu_mul": layers,
                              "deferred_mlp_norm": layers,  # each post-attention norm: o GEMM → gate|up GEMM
                              "deferred_rms_norm": layers - 1,  # each input norm that reads a down GEMM's sum
                              "kv_cache_writes": layers, "context_qkv": layers, "rope_cos_sin": 1,
                              "joined_positions": 1}  # the context and block positions' cat and tables: one op
    assert not report.rejections
    C = 5  # the capture's example was batch 2, context 3
    for B in (1, max_batch):
        args = (torch.randn(B, C, draft.fc.in_features), _ragged(B, C), torch.randint(0, 1000, (B, b)),
                _ragged(B, b, offset=C))
        _assert_same(DraftStep(target, draft), program, args)


def test_verify_step_fuses_every_layer(pair):
    target, draft, max_batch = pair
    layers, b = target.config.num_hidden_layers, draft.block_size
    program, report = _compiled(capture_verify(target, block_size=b, max_batch=max_batch), "verify")
    assert _kinds(report) == {"qkv_norm_rope": layers, "attention.causal": layers, "merge_sibling_projections": layers,
                              "weight_linears": 3 * layers + 1,  # o, gate|up, down per layer; lm_head
                              "rms_norms": 2 * layers + 1,  # input and post-attention norms; the final norm
                              "add_rms_norm": 2 * layers,  # all but the first input norm read a residual add
                              "embedding_rms_norm": 1,  # the first input norm reads the embeddings
                              "silu_mul": layers, "linear_silu_mul": layers,
                              "deferred_mlp_norm": layers,  # each post-attention norm: o GEMM → gate|up GEMM
                              "deferred_rms_norm": layers - 1,  # each input norm that reads a down GEMM's sum
                              "kv_cache_writes": layers, "rope_cos_sin": 1}
    assert not report.rejections
    for B in (1, max_batch):
        _assert_same(VerifyStep(target), program, (torch.randint(0, 1000, (B, b)), _ragged(B, b)))


def test_mhc_verify_step_with_a_batch_of_two_fuses_every_boundary():
    """Our mHC target (cache of 2 rows): hc_post/hc_pre boundaries, q/k/v and causal attention all fuse."""
    target = mhc_decoder_lm(layers=2, iters=3)
    target.feature_layer_ids = [0, 1]
    program, report = _compiled(capture_verify(target, block_size=4, max_batch=2), "verify")
    assert _kinds(report) == {"mhc_pre": 1, "mhc_post_pre": 3, "mhc_post": 1, "qkv_norm_rope": 2,
                              "attention.causal": 2, "merge_sibling_projections": 2,
                              "weight_linears": 3 * 2 + 2,  # o, gate|up, down per layer; hc_head, lm_head
                              "rms_norms": 2,  # the first sublayer's norm (mhc_pre has none) and the final norm
                              "silu_mul": 2, "linear_silu_mul": 2, "kv_cache_writes": 2, "rope_cos_sin": 1}
    assert not report.rejections
    for B in (1, 2):
        _assert_same(VerifyStep(target), program, (torch.randint(0, 128, (B, 4)), _ragged(B, 4)))
