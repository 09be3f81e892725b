"""rope_cos_sin: the rope tables a step builds from its positions → one dflash.rope_cos_sin (of the draft's joined
context and block positions: one dflash.joined_rope_cos_sin, standing for the cat too). Counts and numerics on
our draft and verify steps (the default pipeline: fp32 against the model, fp32 and bf16 bit for bit against the
pipeline without the pass; inv_freq folded into a constant with the graph's own bits); transformers Qwen3 and z-lab's
draft through backend="dflash" without Inductor; the spellings (ours, transformers 5's buffer product, transformers
4's matmul) with a scale and casts; the folded constant through the compile cache; the guards."""

import pytest
import tiny_models
import torch
from pass_testing import assert_same_outputs, check_pass, hf_through_backend_without_inductor, op_counts
from torch.export import Dim

import torch_dflash as td
from torch_dflash.compiler.capture import DraftStep, VerifyStep, capture_draft, capture_verify
from torch_dflash.compiler.step_compiler import pipeline_compile_step
from torch_dflash.demo import build_demo_pair
from torch_dflash.models.layers import rope_cos_sin
from torch_dflash.passes import canonicalize, cleanup, rope_tables
from torch_dflash.passes.fx_utils import build_constant, recipe_of

KIND = rope_tables.NAME
PASSES = [canonicalize.PASS, rope_tables.PASS, cleanup.PASS]
OP = "dflash.rope_cos_sin.default"
JOINED = "dflash.joined_rope_cos_sin.default"
DYNAMIC = ({0: Dim("batch", min=2, max=8), 1: Dim("seq", min=2, max=64)},)
EXACT = dict(atol=0, rtol=0)


def _step(kind, dtype):
    """(eager step, a fresh capture of it, its arguments, its model's rope theta) of the demo pair, batch 2,
    positions ragged per row."""
    target, draft = build_demo_pair(seed=3, dtype=dtype, max_batch=2, max_seq_len=32)
    b, ctx, starts = draft.block_size, 3, torch.tensor([[7], [0]])
    if kind == "draft":
        args = (torch.randn(2, ctx, draft.fc.in_features, dtype=dtype), starts + torch.arange(ctx),
                torch.randint(0, 1000, (2, b)), starts + ctx + torch.arange(b))
        return DraftStep(target, draft), lambda: capture_draft(target, draft, max_batch=2), args, \
            draft.config.rope_theta
    return VerifyStep(target), lambda: capture_verify(target, block_size=b, max_batch=2), \
        (torch.randint(0, 1000, (2, b)), starts + torch.arange(b)), target.config.rope_theta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["draft", "verify"])
def test_our_steps_build_their_tables_in_one_op(kind, dtype):
    step, capture, args, theta = _step(kind, dtype)
    compile_step = pipeline_compile_step("cpu")
    program = compile_step(capture().module(), kind)
    report = compile_step.reports[kind]
    assert report.fusions[KIND] == 1 and not [r for r in report.rejections if r[0] == KIND]
    counts = op_counts(program)
    assert counts["aten.cos.default"] == counts["aten.sin.default"] == 0
    if kind == "draft":  # the context and block positions: one launch for the cat and the tables
        assert report.fusions["joined_positions"] == 1 and counts[JOINED] == 1 and counts[OP] == 0
        assert counts["aten.cat.default"] == 0
    else:
        assert "joined_positions" not in report.fusions and counts[OP] == 1
    (op,) = [n for n in program.graph.nodes if str(n.target) in (OP, JOINED)]
    inv_at = 2 if kind == "draft" else 1
    assert op.args[inv_at + 1:] == (1.0, dtype)
    assert all("val" in n.meta for n in (op, *op.args[:inv_at + 1]))   # the lowering asks the providers with these
    recipe, inv = recipe_of(program, op.args[inv_at]), getattr(program, op.args[inv_at].target)
    assert recipe[0] == "values" and torch.equal(build_constant(program, recipe), inv)
    rot = 2 * inv.numel()   # the bits the graph's arange / pow / reciprocal computed
    assert torch.equal(inv, 1.0 / theta ** (torch.arange(0, rot, 2).float() / rot))
    unfused = pipeline_compile_step("cpu", disabled=(KIND,))(capture().module(), kind)
    run = tiny_models.run_with_random_caches
    assert_same_outputs(run(unfused, args), run(program, args), **EXACT)
    if dtype is torch.float32:
        assert_same_outputs(run(step, args), run(program, args))


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_backend_without_inductor_fuses_transformers_tables(kind):
    """transformers 5: inv_freq is a buffer (read as it is) times the positions, `* attention_scaling`, a cast."""
    _, fusions = hf_through_backend_without_inductor(kind)
    assert [f[KIND] for f in fusions] == [1, 1]


def test_backend_without_inductor_fuses_the_zlab_draft_tables():
    torch._dynamo.reset()
    model = tiny_models.zlab_draft(layers=1)
    fast = torch.compile(model, backend="dflash", options={"inductor": False})
    step = tiny_models.zlab_step(6, start=3)
    with torch.no_grad():
        torch.testing.assert_close(fast(**step), model(**step), atol=1e-5, rtol=1e-5)
    assert td.last_report().fusions[KIND] == 1


class Tables(torch.nn.Module):
    """cos/sin of positions [B, S] spelled as `style`: "ours" (models/layers.rope_cos_sin, inv_freq from constants),
    "hf" (transformers 5: a buffer times the positions, `* scale`, a cast), "hf4" (transformers 4: the buffer
    expanded over the batch, matmul, transpose). `guard` builds a refused case: "fp64" angles, "mixed" (only cos
    cast), "leak" (emb returned too)."""

    def __init__(self, style, scale=1.0, dtype=torch.float32, rot=16, guard=None):
        super().__init__()
        self.style, self.scale, self.dtype, self.rot, self.guard = style, scale, dtype, rot, guard
        self.register_buffer("inv_freq", 1.0 / 1e4 ** (torch.arange(0, rot, 2).float() / rot), persistent=False)

    def forward(self, positions):
        if self.style == "ours":
            return rope_cos_sin(positions, self.rot, 1e4, self.dtype)
        if self.style == "hf4":
            inv = self.inv_freq[None, :, None].float().expand(positions.shape[0], -1, 1)
            freqs = (inv @ positions[:, None, :].float()).transpose(1, 2)
        elif self.guard == "fp64":
            freqs = positions[..., None].double() * self.inv_freq.double()
        else:
            freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        if self.guard == "leak":
            return cos.to(self.dtype), sin.to(self.dtype), emb
        return cos.to(self.dtype), sin if self.guard == "mixed" else sin.to(self.dtype)


def positions(b, s):
    return torch.randint(0, 131072, (b, s), generator=torch.Generator().manual_seed(b * s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("style,scale", [("ours", 1.0), ("hf", 1.0), ("hf", 0.5), ("hf4", 1.0), ("hf4", 1.25)])
def test_each_spelling_becomes_one_op_computing_the_same_bits(style, scale, dtype):
    """Positions up to 131072; the rewritten graph equals eager bit for bit (the op does what the chain did)."""
    _, gm, _ = check_pass(Tables(style, scale, dtype), (positions(2, 6),), (positions(3, 5),), PASSES, {KIND: 1},
                          DYNAMIC, **EXACT)
    counts = op_counts(gm)
    assert counts[OP] == 1 and counts["aten.cos.default"] == counts["aten.cat.default"] == 0
    (op,) = [n for n in gm.graph.nodes if str(n.target) == OP]
    assert op.args[2:] == (scale, dtype)
    assert (recipe_of(gm, op.args[1])[0] == "values") == (style == "ours")   # a buffer is read as it is


@pytest.mark.parametrize("module,args,reason", [
    (Tables("hf"), (positions(2, 6).float(),), "positions are torch.float32, not an integer tensor"),
    (Tables("hf", guard="fp64"), (positions(2, 6),), "the angles are torch.float64, not fp32"),
    (Tables("hf", dtype=torch.bfloat16, guard="mixed"), (positions(2, 6),), "cos and sin are scaled or cast "
                                                                             "differently"),
    (Tables("hf", guard="leak"), (positions(2, 6),), "emb is read by other ops than one cos and one sin"),
])
def test_guards_leave_the_chain(module, args, reason):
    second = (positions(3, 5).to(args[0].dtype),)
    _, gm, report = check_pass(module, args, second, PASSES, {KIND: 0}, DYNAMIC, **EXACT)
    assert op_counts(gm)[OP] == 0 and op_counts(gm)["aten.cos.default"] == 1
    reasons = [r.reason for r in report.rejections() if r.pass_name == KIND]
    assert len(reasons) == 1 and reasons[0].endswith(reason)


def test_the_folded_constant_comes_back_from_the_compile_cache(tmp_path, monkeypatch):
    """The "values" recipe is what a cache hit rebuilds the folded inv_freq from: the same tables, bit for bit."""
    monkeypatch.setenv("TORCH_DFLASH_CACHE_DIR", str(tmp_path))
    module, pos = Tables("ours", dtype=torch.bfloat16), positions(2, 6)
    for status in ("miss", "hit"):
        torch._dynamo.reset()
        fast = torch.compile(module, backend="dflash", options={"inductor": False})
        assert_same_outputs(module(pos), fast(pos), **EXACT)
        report = td.last_report()
        assert (report.cache, report.fusions[KIND]) == (status, 1)
