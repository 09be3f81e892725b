"""kv_materialize on the DFlash draft's context path: z-lab's DFlashDraftModel, our models.DFlashDraft, a
hypothesis sweep of HF-spelled draft attention blocks, and the cases it must refuse."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_testing import (ProjectionAttention, assert_same_outputs, check_pass, export_graph, op_counts, op_diff,
                          projection_args, projection_dims, run_passes)
from tiny_models import zlab_draft, zlab_step

from torch_dflash.models import DFlashDraft, DFlashDraftConfig
from torch_dflash.passes import kv_materialize, qkv_norm_rope

PASSES = [kv_materialize.PASS, qkv_norm_rope.PASS]
EXAMPLES = int(os.environ.get("TORCH_DFLASH_HYPOTHESIS_EXAMPLES", 100))
BOTH = "dflash.kv_materialize.default", "dflash.qkv_norm_rope.default"


def test_zlab_draft_takes_every_layer_whole():
    layers, block = 3, 4
    model = zlab_draft(layers)
    ctx = torch.export.Dim("ctx", min=2, max=64)

    dims = dict(position_ids={1: ctx + block}, noise_embedding=None, target_hidden={1: ctx})
    before, after, report = check_pass(model, zlab_step(6, block, start=5), zlab_step(11, block, start=5), PASSES,
                                       {"kv_materialize": layers, "qkv_norm_rope": layers}, dims)
    gone, new = op_diff(before, after)
    assert (new[BOTH[0]], new[BOTH[1]]) == (layers, layers)
    assert gone["aten.linear.default"] == 5 * layers       # q(block), k/v(ctx), k/v(block)
    assert report.rejections() == []


def test_our_draft_takes_every_layer_whole():
    layers, block = 2, 4
    config = DFlashDraftConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, target_layer_ids=(1, 2), mask_token_id=0,
                               block_size=block, attention_bias=True)
    torch.manual_seed(0)
    model = DFlashDraft(config).eval()
    model.setup_cache(2, 64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)

    def args(c, start):
        return (torch.randn(2, c, 128), torch.randn(2, block, 64), (start + torch.arange(c)).expand(2, -1),
                (start + c + torch.arange(block)).expand(2, -1))

    ctx = torch.export.Dim("ctx", min=2, max=32)
    _, _, report = check_pass(model, args(6, 0), args(9, 6), PASSES, {"kv_materialize": layers, "qkv_norm_rope": layers},
                              ({1: ctx}, None, {1: ctx}, None))
    assert report.rejections() == []


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(head_dim=st.sampled_from([64, 128, 256]), n_kv=st.integers(1, 2), group=st.integers(1, 8),
       bias=st.booleans(), norm_style=st.sampled_from(["hf", "functional", "plain"]),
       rot_fraction=st.sampled_from([1, 2]), theta=st.sampled_from([1e4, 1e6]), eps=st.sampled_from([1e-5, 1e-6]),
       fused=st.booleans(), layout=st.sampled_from(["bhsd", "bhsd_norm_last", "bshd"]), block=st.integers(4, 16),
       batch=st.integers(1, 4), contexts=st.tuples(st.integers(2, 12), st.integers(2, 12)),
       dynamic=st.sampled_from([False] * 7 + [True]))
def test_sweep_of_draft_attention_spellings(head_dim, n_kv, group, bias, norm_style, rot_fraction, theta, eps,
                                            fused, layout, block, batch, contexts, dynamic):
    """Counts and numerics per example; one in eight exported with a dynamic context length and checked on a
    second one, the others on fresh inputs of the export shape."""
    torch.manual_seed(head_dim + n_kv + group + block)
    hidden = 32
    module = ProjectionAttention(hidden, n_kv * group, n_kv, head_dim, bias=bias, norm_style=norm_style,
                                 rot_dim=head_dim // rot_fraction, theta=theta, eps=eps, fused=fused, layout=layout,
                                 draft=True)
    first, second = contexts if dynamic else (contexts[0], contexts[0])
    check_pass(module, projection_args(module, hidden, batch, block, first),
               projection_args(module, hidden, batch, block, second), PASSES,
               {"kv_materialize": 1, "qkv_norm_rope": 1}, projection_dims(module, block) if dynamic else None)


@pytest.mark.parametrize("passes,knobs,reason", [
    (PASSES, dict(q_rows="first"), "q's cos is not the last 4 positions of k's"),
    (PASSES, dict(k_eps=1e-5), "k_norm eps 1e-05 ≠ q_norm eps 1e-06"),
    ([qkv_norm_rope.PASS], {}, "kv_materialize takes those"),
], ids=["q-cos-not-block-rows", "eps", "qkv-alone-leaves-the-draft-site"])
def test_refused_draft_sites_are_left_alone_with_the_reason(passes, knobs, reason):
    torch.manual_seed(0)
    module = ProjectionAttention(32, 4, 2, 16, draft=True, **knobs).eval()
    args = projection_args(module, 32, 2, 4, 6)
    gm = export_graph(module, args)
    ops = op_counts(gm)
    report = run_passes(gm, passes)
    assert report.fusions() == {}
    assert op_counts(gm) == ops
    assert any(reason in r.reason for r in report.rejections()), [r.reason for r in report.rejections()]
    with torch.no_grad():
        assert_same_outputs(module(*args), gm(*args))
