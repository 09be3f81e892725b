"""The pass pipeline on OUR captured draft and verify steps: every layer fused, attention kinds selected, and the
rewritten programs equal the captured ones on a second shape (batch and context length differ)."""

import pytest
import torch

from torch_dflash.compiler.capture import capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair

dflash = torch.ops.dflash


@pytest.fixture(scope="module")
def pair():
    return build_demo_pair(seed=5, max_batch=3, max_seq_len=48)


def _dflash_ops(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "dflash" in str(n.target))


def _same_outputs(before, after, args, caches_of):
    """Run both programs from zeroed caches on args; outputs and the caches they wrote agree."""
    results = []
    with torch.no_grad():
        for program in (before, after):
            for buf in caches_of(program):
                buf.zero_()
            out = program(*args)
            results.append((out if isinstance(out, tuple) else (out,), [b.clone() for b in caches_of(program)]))
    (out_a, caches_a), (out_b, caches_b) = results
    for a, b in zip(out_a + tuple(caches_a), out_b + tuple(caches_b)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _caches(program):
    return [b for name, b in program.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def test_draft_step_fuses_every_layer(pair):
    target, draft = pair
    program = capture_draft(target, draft, max_batch=3)
    before, after = program.module(), program.module()
    compile_step = pipeline_compile_step("cpu")
    compile_step(after, "draft")
    layers = len(draft.layers)
    fusions = compile_step.reports["draft"].fusions
    assert (fusions["kv_materialize"], fusions["qkv_norm_rope"], fusions["attention.non_causal"]) == (layers,) * 3
    assert _dflash_ops(after).count("dflash.attention.default") == layers
    assert not compile_step.reports["draft"].rejections
    B, C, b = 3, 5, draft.block_size  # a second shape: the capture's example was batch 2, context 3
    args = (torch.randn(B, C, draft.fc.in_features), (4 + torch.arange(C)).expand(B, C).contiguous(),
            torch.randint(0, 1000, (B, b)), (4 + C + torch.arange(b)).expand(B, b).contiguous())
    _same_outputs(before, after, args, _caches)


def test_verify_step_fuses_every_layer(pair):
    target, draft = pair
    program = capture_verify(target, block_size=draft.block_size, max_batch=3)
    before, after = program.module(), program.module()
    compile_step = pipeline_compile_step("cpu")
    compile_step(after, "verify")
    layers = target.config.num_hidden_layers
    fusions = compile_step.reports["verify"].fusions
    assert (fusions["qkv_norm_rope"], fusions["attention.causal"]) == (layers, layers)
    assert not compile_step.reports["verify"].rejections
    ids = torch.randint(0, 1000, (1, draft.block_size))
    positions = (7 + torch.arange(draft.block_size))[None].contiguous()
    _same_outputs(before, after, (ids, positions), _caches)
