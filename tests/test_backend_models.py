"""torch.compile(model, backend="dflash") on other people's models and ours, with dynamic lengths and graph breaks:
the fusions fire (counts asserted per compiled graph) and the outputs equal eager (fp32, 1e-5). The rewritten
graph runs eagerly (inductor off) except in the GPU test. Compilations are counted with Dynamo's own counter.
(transformers Qwen3 / Llama and our verify step: tests/test_backend.py.)"""

import pytest
import torch
from tiny_models import deepseek_v4, hf_causal_lm, mhc_decoder_lm, mhc_inputs, zlab_draft, zlab_step
from torch._dynamo.utils import counters

import torch_dflash as td
from torch_dflash.compiler import report

EAGER = {"inductor": False}
MHC = ("mhc_pre", "mhc_post_pre", "mhc_post")
DRAFT = ("kv_materialize", "qkv_norm_rope", "attention.non_causal")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def graphs() -> int:
    """How many graphs Dynamo has compiled since the test began."""
    return counters["stats"]["unique_graphs"]


def fusions(kinds, compile_report=None) -> tuple:
    found = (compile_report or td.last_report()).fusions
    return tuple(found.get(kind, 0) for kind in kinds)


def close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- transformers DeepseekV4
def test_deepseek_v4_fuses_every_mhc_boundary_and_lengths_share_one_dynamic_graph():
    """L layers have 2L sublayers: 1 mhc_pre (layer 0's attention), 2L − 1 mhc_post_pre, 1 mhc_post (before the
    hc_head) — the counts of the torch.export graph (tests/passes/test_mhc_post_pre.py). AOT spells its 4L batched
    matmuls (every hc_post's combᵀ @ res, and the eager attention's q·kᵀ and p·v) as expand + bmm; canonicalize
    makes them matmuls again. Its rope is interleaved (GPT-J): qkv_norm_rope refuses it and says so. Its attention is
    eager (attention sinks; no SDPA), so there is no attention site to classify.
    The length is marked dynamic: three lengths run one graph."""
    layers = 2
    model = deepseek_v4(layers, iters=3)
    fast = torch.compile(model, backend="dflash", options=EAGER)
    with torch.no_grad():
        for length in (8, 11, 13):
            ids = torch.randint(0, 128, (1, length))
            torch._dynamo.mark_dynamic(ids, 1)
            close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert graphs() == 1
    rep = td.last_report()
    assert fusions(MHC, rep) == (1, 2 * layers - 1, 1) and rep.fusions["canonicalize.matmul"] == 4 * layers
    assert "qkv_norm_rope" not in rep.fusions and not any(k.startswith("attention.") for k in rep.fusions)
    assert {reason for name, _, reason in rep.rejections if name == "qkv_norm_rope"} == {
        "rope is interleaved (GPT-J), not rotate-half"}


# ---------------------------------------------------------------------------------------- z-lab DFlashDraftModel
def test_zlab_draft_without_cache_automatic_dynamic_context():
    """Without past_key_values every layer's k, v come from cat(context, block): kv_materialize takes each layer
    whole (and records its qkv_norm_rope), the attention sees every key (non_causal) — L of each, in every graph.
    Automatic dynamic (nothing marked): context 6 compiles a static graph, 9 one with a dynamic length, 12 reuses
    it; the norms' eps stay constants Dynamo guards, so the dynamic graph fuses as the static one."""
    layers = 2
    model = zlab_draft(layers)
    fast = torch.compile(model, backend="dflash", options=EAGER)
    with torch.no_grad():
        for ctx, compiled in ((6, 1), (9, 2), (12, 2)):
            step = zlab_step(ctx, start=3)
            close(fast(**step), model(**step))
            assert graphs() == compiled, f"context {ctx}"
            assert fusions(DRAFT) == (layers,) * 3 and not td.last_report().rejections


def test_zlab_draft_with_its_cache_as_dflash_generate_uses_it():
    """With past_key_values (a DynamicCache, cropped to the committed length after each step, as z-lab's
    dflash_generate does) the cache appends the roped k, v AFTER the fused site and the attention reads
    cat(cached, context, block) without a mask — still kv_materialize, qkv_norm_rope and non_causal once per layer.
    The first step (empty cache) and the next (the cache holds a prefix, read as graph inputs) are two graphs."""
    from dflash.model import _crop_to, _make_cache

    layers = 2
    model = zlab_draft(layers)
    fast = torch.compile(model, backend="dflash", options=EAGER)
    eager_cache, compiled_cache = _make_cache(model.config), _make_cache(model.config)
    start = 0
    with torch.no_grad():
        for ctx in (6, 3):
            step = zlab_step(ctx, start=start)
            want = model(**step, past_key_values=eager_cache, use_cache=True)
            close(fast(**step, past_key_values=compiled_cache, use_cache=True), want)
            assert fusions(DRAFT) == (layers,) * 3
            start += ctx
            for cache in (eager_cache, compiled_cache):
                _crop_to(cache, start)
    assert graphs() == 2
    for want, got in zip(eager_cache.layers, compiled_cache.layers):
        close(got.keys, want.keys)
        close(got.values, want.values)


# ---------------------------------------------------------------------------------------- our models
@pytest.fixture(scope="module")
def pair(tiny_qwen3_dir, tiny_draft_dir):
    """conftest's checkpoints: a 4-layer DecoderLM target and a 2-layer DFlashDraft, static caches of 2 × 64."""
    target, draft = td.load_target(tiny_qwen3_dir).eval(), td.load_draft(tiny_draft_dir).eval()
    for model in (target, draft):
        model.setup_cache(2, 64)
    return target, draft


def caches(model):
    return [b for name, b in model.named_buffers() if name.endswith(("k_cache", "v_cache"))]


def run_from_zero_caches(fn, model, *args):
    """fn(*args) with model's KV caches zeroed first → (outputs, the caches it wrote)."""
    for buf in caches(model):
        buf.zero_()
    out = fn(*args)
    return out, [b.clone() for b in caches(model)]


def test_our_draft_step_fuses_every_layer_and_writes_the_cache(pair):
    from torch_dflash.compiler.capture import DraftStep

    target, draft = pair
    step = DraftStep(target, draft)
    fast = torch.compile(step, backend="dflash", options=EAGER)
    B, C, b = 2, 5, draft.block_size
    args = (torch.randn(B, C, draft.fc.in_features), (4 + torch.arange(C)).expand(B, C).contiguous(),
            torch.randint(0, 128, (B, b)), (4 + C + torch.arange(b)).expand(B, b).contiguous())
    with torch.no_grad():
        want, want_caches = run_from_zero_caches(step, draft, *args)
        got, got_caches = run_from_zero_caches(fast, draft, *args)
    close(got, want)
    for g, w in zip(got_caches, want_caches):
        close(g, w)
    assert graphs() == 1 and fusions(DRAFT) == (len(draft.layers),) * 3


def test_our_target_decoding_one_token(pair):
    """The autoregressive step: one new token per sequence over the static cache. With one query the causal mask
    (keys ≤ the query's position) IS the non_causal kind (keys ≤ the last query's position); the pass names it so."""
    target, _ = pair
    fast = torch.compile(target, backend="dflash", options=EAGER)
    ids, positions = torch.randint(0, 128, (2, 1)), torch.tensor([[7], [12]])
    with torch.no_grad():
        for buf in caches(target):  # a prefix the token attends to
            buf.normal_()
        prefix = [b.clone() for b in caches(target)]
        want = target(ids, positions=positions).logits
        for buf, saved in zip(caches(target), prefix):
            buf.copy_(saved)
        close(fast(ids, positions=positions).logits, want)
    layers = target.config.num_hidden_layers
    assert graphs() == 1 and fusions(("qkv_norm_rope", "attention.non_causal")) == (layers, layers)


def test_our_mhc_target():
    model = mhc_decoder_lm(layers=1, iters=2)
    fast = torch.compile(model, backend="dflash", options=EAGER)
    inputs = mhc_inputs(2, 8)
    with torch.no_grad():
        close(fast(**inputs).logits, model(**inputs).logits)
    assert graphs() == 1 and fusions(MHC + ("qkv_norm_rope", "attention.causal")) == (1, 1, 1, 1, 1)


# ---------------------------------------------------------------------------------------- dynamic=True and RMSNorm eps
def test_dynamic_true_lifts_the_norm_eps_unless_floats_are_specialized():
    """dynamic=True makes Dynamo pass the RMSNorm eps (a python float attribute) into the graph as an input, with no
    guard on its value: the q/k norms cannot be fused (nothing may bake in an unguarded value), so the site is
    refused with a reason, and the attention is still classified. With torch._dynamo.config.specialize_float=True
    the eps is a constant again that Dynamo guards: the site fuses, and changing an eps recompiles. (Automatic
    dynamic and mark_dynamic keep the eps a constant: the tests above.)"""
    model = zlab_draft(layers=1)
    step = zlab_step(6)
    with torch.no_grad():
        lifted = torch.compile(model, backend="dflash", dynamic=True, options=EAGER)
        close(lifted(**step), model(**step))
        assert fusions(DRAFT) == (0, 0, 1)
        assert any(name == "qkv_norm_rope" for name, _, _ in td.last_report().rejections)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(specialize_float=True):
            fast = torch.compile(model, backend="dflash", dynamic=True, options=EAGER)
            for ctx in (6, 9):
                step = zlab_step(ctx)
                close(fast(**step), model(**step))
            assert fusions(DRAFT) == (1, 1, 1)
            before = graphs()
            model.layers[0].self_attn.k_norm.variance_epsilon = 0.5
            close(fast(**step), model(**step))
            assert graphs() == before + 1, "an eps change must fail Dynamo's guard"


# ---------------------------------------------------------------------------------------- graph breaks
class BrokenQwen3(torch.nn.Module):
    """Qwen3ForCausalLM's forward written out, with a graph break between its two decoder layers."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        model = self.hf.model
        h = model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rope = model.rotary_emb(h, positions)
        h = model.layers[0](h, position_embeddings=rope, position_ids=positions)
        torch._dynamo.graph_break()
        h = model.layers[1](h, position_embeddings=rope, position_ids=positions)
        return self.hf.lm_head(model.norm(h))


def test_a_graph_break_leaves_each_subgraph_compiled_and_fused(monkeypatch):
    reports = []
    record = report.record
    monkeypatch.setattr(report, "record", lambda r: (reports.append(r), record(r)))
    model = BrokenQwen3(hf_causal_lm("qwen3")).eval()
    fast = torch.compile(model, backend="dflash", options=EAGER)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        close(fast(ids), model(ids))
    assert graphs() == 2 and len(reports) == 2
    for rep in reports:  # the rope tables reach the second graph as inputs; it still fuses its layer
        assert fusions(("qkv_norm_rope", "attention.causal"), rep) == (1, 1) and not rep.rejections


# ---------------------------------------------------------------------------------------- bf16
def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def bf16_outputs(model, inputs, device, options=None) -> tuple:
    """(the fp32 model's, eager bf16's, compiled bf16's) outputs (logits where the model returns them) on device."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    model = model.to(device)
    with torch.no_grad():
        reference = model(**inputs)
        model = model.to(torch.bfloat16)
        inputs = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        eager = model(**inputs)
        compiled = torch.compile(model, backend="dflash", options=options)(**inputs)
    return tuple(getattr(o, "logits", o) for o in (reference, eager, compiled))


@pytest.mark.parametrize("norm", ["installed", "cast_then_weight"])
def test_bf16_deepseek_v4_fuses_every_mhc_boundary(norm, monkeypatch):
    """bf16 on CPU: the same mHC fusions as fp32 whichever order the RMSNorm multiplies its weight in: fp32 then one
    cast (transformers 5.23's DeepseekV4RMSNorm), or cast back then multiply (Qwen3RMSNorm's spelling, which other
    transformers versions use for DeepseekV4RMSNorm; the op multiplies in fp32, one bf16 rounding apart). The norm
    weights are made to matter so the order changes the output; the compiled model is no farther from the fp32
    model than eager bf16 is (plus 1%)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    if norm == "cast_then_weight":
        monkeypatch.setattr(DeepseekV4RMSNorm, "forward", Qwen3RMSNorm.forward)
    layers = 2
    model = deepseek_v4(layers, iters=3, mlp="hash_moe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    inputs = {"input_ids": torch.randint(0, 128, (1, 12)), "use_cache": False}
    reference, eager, compiled = bf16_outputs(model, inputs, "cpu", EAGER)
    report = td.last_report()
    assert fusions(MHC, report) == (1, 2 * layers - 1, 1), report.rejections
    assert not [r for r in report.rejections if r[0] == "mhc_post_pre"], report.rejections
    assert relative_error(compiled, reference) <= relative_error(eager, reference) + 0.01


@pytest.mark.gpu
def test_gpu_bf16_inductor_deepseek_v4_and_zlab_draft():
    """On CUDA in bf16 with Inductor: the same fusions, and the compiled model is no farther from the fp32 model
    than eager bf16 is (plus 1%: the fused ops accumulate in fp32 where eager rounds to bf16). DeepseekV4 routes its
    experts by token id here (hash_moe), so a rounding difference cannot send a token to another expert."""
    layers = 2
    cases = [(deepseek_v4(layers, iters=3, mlp="hash_moe"), {"input_ids": torch.randint(0, 128, (1, 12)),
                                                               "use_cache": False}, MHC, (1, 2 * layers - 1, 1)),
             (zlab_draft(layers), zlab_step(16, block=16, batch=1), DRAFT, (layers,) * 3)]
    for model, inputs, kinds, counts in cases:
        torch._dynamo.reset()
        reference, eager, compiled = bf16_outputs(model, inputs, "cuda")
        report = td.last_report()
        assert fusions(kinds) == counts and report.target == "cuda", (fusions(kinds), report.rejections)
        assert relative_error(compiled, reference) <= relative_error(eager, reference) + 0.01


@pytest.mark.gpu
def test_gpu_inductor_calls_our_kernels_from_its_own_code():
    """Our Triton providers are triton_ops: Inductor's generated module launches our kernels itself (no opaque
    dflash_triton op call per kernel) and the outputs stay as close to fp32 as eager bf16 (+1%). Head dim 128:
    the attention kernels' sizes."""
    from torch._inductor.utils import run_and_get_code

    layers = 2
    model, inputs = zlab_draft(layers, head_dim=128), zlab_step(16, block=16, batch=1, hidden=512)
    torch._dynamo.reset()
    reference, eager, _ = bf16_outputs(model, inputs, "cuda")
    torch._dynamo.reset()
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: (v.to("cuda").bfloat16() if v.is_floating_point() else v.to("cuda"))
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        compiled, code = run_and_get_code(torch.compile(model, backend="dflash"), **inputs)
    source = "\n".join(code)
    for kernel in ("attention_decode_kernel", "norm_rope_heads_kernel"):
        assert kernel in source, f"{kernel} is not launched from Inductor's code"
    assert "dflash_triton" not in source, "a provider op stayed opaque"
    assert fusions(DRAFT) == (layers,) * 3
    assert relative_error(compiled, reference) <= relative_error(eager, reference) + 0.01
