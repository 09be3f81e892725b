"""Lowering: target detection, provider choice with fallback and reasons, graphs rewritten to provider ops."""

import os

import pytest
import torch

from torch_dflash.compiler import lowering
from torch_dflash.compiler.providers import Provider, register
from torch_dflash.errors import InputError

dflash = torch.ops.dflash


class AttentionBlock(torch.nn.Module):
    def forward(self, x, w, qn, kn, cos, sin):
        q, k, v = dflash.qkv_norm_rope(x, w, None, qn, kn, 1e-6, cos, sin, 4, 2, 64)
        o = dflash.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "causal", 0.125)
        return dflash.rms_norm(o, None, 1e-6)


def _inputs(seq=5):
    x = torch.randn(2, seq, 32)
    w = torch.randn(8 * 64, 32) * 0.1
    cos, sin = torch.randn(2, seq, 64), torch.randn(2, seq, 64)
    return x, w, torch.rand(64) + 0.5, torch.rand(64) + 0.5, cos, sin


def _graph():
    seq = torch.export.Dim("seq", min=2, max=64)
    shapes = ({1: seq}, None, None, None, {1: seq}, {1: seq})
    return torch.export.export(AttentionBlock(), _inputs(), dynamic_shapes=shapes).module()


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "dflash" in str(n.target)]


def test_auto_detects_cpu_here_and_unknown_targets_are_user_errors():
    assert lowering.resolve_target("auto") == ("cpu" if not torch.cuda.is_available() else lowering.detect_target())
    with pytest.raises(InputError, match="Unknown target 'tpu'"):
        lowering.resolve_target("tpu")


def test_cpu_keeps_the_reference_ops():
    gm = _graph()
    choices = lowering.lower(gm, "cpu")
    assert {op: [c.provider for c in cs] for op, cs in choices.items()} == {
        "qkv_norm_rope": ["reference"], "attention": ["reference"], "rms_norm": ["reference"]}
    assert all(t.startswith("dflash.") for t in _targets(gm))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter runs Triton on CPU tensors")
def test_cuda_target_lowers_to_triton_and_keeps_the_function():
    gm = _graph()
    inputs = _inputs(seq=9)
    expected = gm(*inputs)
    choices = lowering.lower(gm, "cuda")
    assert {c.provider for cs in choices.values() for c in cs} == {"triton"}
    assert _targets(gm) == ["dflash_triton.qkv_norm_rope.default", "dflash_triton.attention.default",
                            "dflash_triton.rms_norm.default"]
    torch.testing.assert_close(gm(*inputs), expected, atol=1e-5, rtol=1e-5)
    # the lowered graph still exports (provider ops have the dflash schema and fake)
    torch.export.export(gm, inputs)


def test_a_declining_provider_falls_back_with_its_reason_recorded():
    register(Provider("rms_norm", "picky", ("cpu",), lambda *a: None, priority=5,
                      supports=lambda x, w, eps: f"picky only takes fp16, got {x.dtype}"))
    try:
        gm = _graph()
        choice = lowering.lower(gm, "cpu")["rms_norm"][0]
        assert choice.provider == "reference"
        assert choice.declined == [("picky", "picky only takes fp16, got torch.float32")]
    finally:
        from torch_dflash.compiler import providers
        providers._REGISTRY["rms_norm"] = [p for p in providers._REGISTRY["rms_norm"] if p.name != "picky"]


def test_ascend_without_torch_npu_falls_back_to_the_reference():
    gm = _graph()
    choices = lowering.lower(gm, "ascend")
    for op_choices in choices.values():
        assert op_choices[0].provider == "reference"
        assert any("torch_npu" in why for _, why in op_choices[0].declined)
