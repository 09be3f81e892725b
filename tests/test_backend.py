"""torch.compile(model, backend="dflash") on transformers models and ours: fusion counts, numerics on two
lengths, no recompile on a third, the report, options and the training-graph fallback."""

import logging

import pytest
import torch
from tiny_models import TINY_HF, hf_causal_lm

import torch_dflash as td
from torch_dflash.compiler import backend
from torch_dflash.errors import InputError

def _compiles():
    return backend._COUNTER[0]


@pytest.mark.parametrize("kind,extra", [("qwen3", {}), ("llama", {"attention_bias": True})])
def test_transformers_models_fuse_every_layer_and_match_eager(kind, extra):
    torch._dynamo.reset()
    model = hf_causal_lm(kind, **extra)
    fast = torch.compile(model, backend="dflash", options={"inductor": False})
    layers = TINY_HF["num_hidden_layers"]
    with torch.no_grad():
        for length in (5, 9):
            ids = torch.randint(0, 128, (2, length))
            torch._dynamo.mark_dynamic(ids, 1)
            torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       atol=1e-5, rtol=1e-5)
        report = td.last_report()
        assert report.fusions["qkv_norm_rope"] == layers and report.fusions["attention.causal"] == layers
        assert report.providers["qkv_norm_rope"] == ["reference"] * layers and report.target == "cpu"
        assert set(report.passes) >= {"canonicalize", "qkv_norm_rope", "attention_masks", "cleanup"}
        before = _compiles()
        ids = torch.randint(0, 128, (2, 13))
        torch._dynamo.mark_dynamic(ids, 1)
        fast(ids, use_cache=False)
        assert _compiles() == before, "a third sequence length recompiled"


def test_inductor_compiles_the_rewritten_graph():
    torch._dynamo.reset()
    model = hf_causal_lm("qwen3")
    fast = torch.compile(model, backend="dflash")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)
    assert td.last_report().fusions["qkv_norm_rope"] == TINY_HF["num_hidden_layers"]


def test_our_verify_step_fuses_and_keeps_writing_the_cache():
    from torch_dflash.compiler.capture import VerifyStep
    from torch_dflash.demo import build_demo_pair

    torch._dynamo.reset()
    target, draft = build_demo_pair(seed=3, max_batch=2, max_seq_len=64)
    step = VerifyStep(target)
    fast = torch.compile(step, backend="dflash", options={"inductor": False})
    ids = torch.randint(0, 1000, (2, draft.block_size))
    positions = (torch.tensor([[4], [9]]) + torch.arange(draft.block_size)).contiguous()
    caches = [m.self_attn for m in target.model.layers]
    with torch.no_grad():
        expected = step(ids, positions)
        written = [c.k_cache.clone() for c in caches]
        for c in caches:
            c.k_cache.zero_()
        got = fast(ids, positions)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for c, want in zip(caches, written):
        torch.testing.assert_close(c.k_cache, want)
    report = td.last_report()
    assert report.fusions["qkv_norm_rope"] == target.config.num_hidden_layers
    assert report.fusions["attention.causal"] == target.config.num_hidden_layers


def test_unknown_options_are_one_sentence_user_errors():
    with pytest.raises(InputError, match="Unknown dflash backend option"):
        backend.BackendOptions.parse({"targett": "cuda"})
    with pytest.raises(InputError, match="Unknown target 'tpu'"):
        backend.DFlashGraphPass(backend.BackendOptions(target="tpu"), "g")


def test_training_graphs_go_to_inductor_unchanged(caplog):
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 8)
    fast = torch.compile(model, backend="dflash")
    before = _compiles()
    with caplog.at_level(logging.WARNING, logger="torch_dflash"):
        out = fast(torch.randn(2, 8))
    out.sum().backward()
    assert model.weight.grad is not None and _compiles() == before
    assert "inference graphs" in caplog.text


def test_disabled_passes_do_not_run():
    torch._dynamo.reset()
    model = hf_causal_lm("qwen3")
    fast = torch.compile(model, backend="dflash", options={"inductor": False, "disable": ["qkv_norm_rope"]})
    with torch.no_grad():
        fast(torch.randint(0, 128, (1, 6)), use_cache=False)
    report = td.last_report()
    assert "qkv_norm_rope" not in report.passes and "qkv_norm_rope" not in report.fusions
