"""attention_masks: every SDPA site becomes dflash.attention with a proven mask kind (or custom, with the reason).

Third-party models: transformers Qwen3 / Llama (causal, mask built from position_ids with packed-sequence
detection), z-lab DFlashDraftModel (no mask → non_causal; `_attention_mask` on sliding layers). Our models'
spellings: `causal_mask(cache_positions, S_max)` and `draft_mask(positions[:, -b:], …)`. Every case checks the
count, that no dense mask is left after cleanup, and the numerics on a second shape (pass_testing.check_pass).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_testing import check_pass, export_graph, op_counts
from torch.export import Dim

from torch_dflash.models.draft import draft_mask
from torch_dflash.models.layers import causal_mask
from torch_dflash.passes import attention_masks, cleanup
from torch_dflash.passes.manager import PassManager

PASSES = [attention_masks.PASS, cleanup.PASS]
KINDS = ("non_causal", "causal", "sliding", "custom")
MASK_OPS = ("aten.le.Tensor", "aten.lt.Scalar", "aten.index.Tensor", "aten.cumsum.default", "aten.__iand__.Tensor")
EXAMPLES = int(os.environ.get("TORCH_DFLASH_HYPOTHESIS_EXAMPLES", 100))


def expected(**kinds) -> dict[str, int]:
    return {f"attention.{k}": kinds.get(k, 0) for k in KINDS}


def attention_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.dflash.attention.default]


def rejections(report):
    return [r.reason for r in report.rejections()]


def no_dense_mask(gm):
    counts = op_counts(gm)
    assert "aten.scaled_dot_product_attention.default" not in counts
    leftover = {op: counts[op] for op in MASK_OPS if counts[op]}
    assert not leftover, f"mask nodes left in the graph: {leftover}"


# ---------------------------------------------------------------------------------------- transformers
def hf_config(config_cls):
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, head_dim=16)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_transformers_decoder_is_causal_on_every_layer(family):
    import transformers

    config_cls, model_cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    model = model_cls(hf_config(config_cls))
    args = {"input_ids": torch.randint(0, 128, (2, 8)), "use_cache": False}
    second = {"input_ids": torch.randint(0, 128, (3, 5)), "use_cache": False}
    dims = {"input_ids": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}, "use_cache": None}
    _, gm, report = check_pass(model, args, second, PASSES, expected(causal=2), dims)
    no_dense_mask(gm)
    assert all(n.args[7] is None for n in attention_nodes(gm)), "Sq = Sk: the queries are bottom-right"
    kv_heads = {n.args[i].meta["val"].shape[1] for n in attention_nodes(gm) for i in (1, 2)}
    assert kv_heads == {2}, "repeat_kv is dropped: dflash.attention gets the 2 kv heads (GQA)"


# ---------------------------------------------------------------------------------------- z-lab draft
def zlab_draft(layer_types=None, is_causal=None):
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, head_dim=16, layer_types=layer_types,
                      use_sliding_window=layer_types is not None, sliding_window=4)
    cfg.num_target_layers = 4
    cfg.dflash_config = {"block_size": 4, "mask_token_id": 5, "target_layer_ids": [1, 2]}
    if is_causal is not None:
        cfg.is_causal = is_causal
    cfg._attn_implementation = "sdpa"
    return DFlashDraftModel(cfg)


def zlab_inputs(ctx, block, batch=1):
    return {"position_ids": torch.arange(ctx + block).expand(batch, -1),
            "noise_embedding": torch.randn(batch, block, 64), "target_hidden": torch.randn(batch, ctx, 128)}


ZLAB_DIMS = {"position_ids": {1: Dim("positions", min=4, max=80)}, "noise_embedding": {1: Dim("block", max=16)},
             "target_hidden": {1: Dim("ctx", min=2, max=64)}}
SLIDING_FIRST = ["sliding_attention", "full_attention"]


def check_zlab(model, kinds):
    return check_pass(model, zlab_inputs(6, 4), zlab_inputs(9, 3), PASSES, expected(**kinds), ZLAB_DIMS)


def test_zlab_draft_is_non_causal_on_every_layer():
    _, gm, report = check_zlab(zlab_draft(), {"non_causal": 2})
    assert all(n.args[7] is None for n in attention_nodes(gm))


def test_zlab_draft_sliding_layer():
    _, gm, _ = check_zlab(zlab_draft(SLIDING_FIRST), {"sliding": 1, "non_causal": 1})
    no_dense_mask(gm)
    sliding = [n for n in attention_nodes(gm) if n.args[3] == "sliding"]
    assert sliding[0].args[5] == 4 and sliding[0].args[7] is None  # window 4, bottom-right queries


def test_zlab_non_causal_window_stays_custom():
    _, _, report = check_zlab(zlab_draft(SLIDING_FIRST, is_causal=False), {"custom": 1, "non_causal": 1})
    [reason] = rejections(report)
    assert "is not provably causal, sliding or non_causal" in reason and "kv - q" in reason


# ---------------------------------------------------------------------------------------- our models' spellings
S_MAX = 24


class CacheAttention(torch.nn.Module):
    """SDPA over a whole static cache of S_MAX keys with one of the reference models' masks."""

    def __init__(self, mask: str, window=None):
        super().__init__()
        self.mask, self.window = mask, window

    def forward(self, q, k, v, positions):
        if self.mask == "target":
            mask = causal_mask(positions, S_MAX)
        else:
            mask = draft_mask(positions[:, -q.shape[2]:], S_MAX, self.mask == "draft_causal", self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def cache_args(batch, sq, context):
    """q [B, 4, Sq, 16], k/v [B, 2, S_MAX, 16] and positions [B, context + Sq] starting at a per-row offset."""
    start = torch.arange(batch)[:, None] * 3
    positions = start + torch.arange(context + sq)
    return torch.randn(batch, 4, sq, 16), torch.randn(batch, 2, S_MAX, 16), torch.randn(batch, 2, S_MAX, 16), positions


def check_cache_attention(module, kinds, context=4):
    batch, sq, pos = Dim("batch", max=8), Dim("sq", min=2, max=7), Dim("pos", min=2, max=S_MAX - 6)
    args, second = cache_args(2, 4, context), cache_args(3, 5, context + 1)
    if module.mask == "target":  # positions are the queries' own cache positions
        args, second = args[:3] + (args[3][:, -4:],), second[:3] + (second[3][:, -5:],)
        pos = sq
    dims = ({0: batch, 2: sq}, {0: batch}, {0: batch}, {0: batch, 1: pos})
    return check_pass(module, args, second, PASSES, expected(**kinds), dims)


def test_own_target_mask_reads_cache_positions():
    _, gm, _ = check_cache_attention(CacheAttention("target"), {"causal": 1})
    [site] = attention_nodes(gm)
    assert site.args[7].op == "placeholder" and site.args[7].name == "positions"  # q_pos = cache_positions
    no_dense_mask(gm)


@pytest.mark.parametrize("mask, window, kind", [("draft", None, "non_causal"), ("draft_causal", None, "causal"),
                                                ("draft_causal", 3, "sliding")])
def test_own_draft_masks(mask, window, kind):
    _, gm, _ = check_cache_attention(CacheAttention(mask, window), {kind: 1})
    [site] = attention_nodes(gm)
    assert site.args[7] is not None and site.args[5] == (window or 0)
    no_dense_mask(gm)


def test_own_draft_non_causal_window_stays_custom():
    _, gm, report = check_cache_attention(CacheAttention("draft", 3), {"custom": 1})
    [reason] = rejections(report)
    assert "not provably causal, sliding or non_causal" in reason


# ---------------------------------------------------------------------------------------- is_causal, data masks
class IsCausal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("same_length", [True, False])
def test_sdpa_is_causal_is_top_left(same_length):
    """SDPA's is_causal lets query i see keys 0..i; with Sq < Sk that is NOT bottom-right, so q_pos = arange(Sq)
    (a q_pos of None would be wrong and fail the numerics)."""
    sq, sk = Dim("sq", min=2, max=16), Dim("sk", min=2, max=32)
    qdims = {2: sk if same_length else sq}
    def qkv(sq, sk):
        return torch.randn(1, 2, sq, 8), torch.randn(1, 2, sq if same_length else sk, 8), \
            torch.randn(1, 2, sq if same_length else sk, 8)

    args, second = qkv(6, 9), qkv(5, 12)
    _, gm, _ = check_pass(IsCausal(), args, second, PASSES, expected(causal=1), (qdims, {2: sk}, {2: sk}))
    [site] = attention_nodes(gm)
    assert (site.args[7] is None) == same_length


class DataMask(torch.nn.Module):
    """A causal mask combined with something that is not index arithmetic."""

    def __init__(self, extra):
        super().__init__()
        self.extra = extra

    def forward(self, q, k, v, padding):
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.arange(sk)[None, :] <= (sk - sq + torch.arange(sq))[:, None]
        if self.extra == "padding":
            mask = mask[None, None] & padding[:, None, None, :]
        elif self.extra == "float_input":
            mask = torch.where(mask, 0.0, float("-inf")) + padding[:, None, None, :].float()
        elif self.extra == "soft_bias":  # a finite penalty above -65504 changes the softmax: not a mask kind
            mask = torch.where(mask, 0.0, -1000.0)
        else:  # a random mask (the diagonal kept visible so no row is empty)
            diagonal = torch.arange(sk)[None, :] == (sk - sq + torch.arange(sq))[:, None]
            mask = mask & ((torch.rand(sq, sk) > 0.5) | diagonal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("extra, reason", [("padding", "reads the tensor input 'padding'"),
                                           ("float_input", "reads the tensor input 'padding'"),
                                           ("random", "is random"),
                                           ("soft_bias", "takes the value -1000")])
def test_masks_that_read_data_stay_custom(extra, reason):
    module = DataMask(extra).eval()
    args = (torch.randn(2, 2, 4, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8),
            torch.ones(2, 7, dtype=torch.bool))
    if extra == "float_input":
        args = args[:3] + (torch.zeros(2, 7),)
    gm = export_graph(module, args)
    report = PassManager(PASSES).run(gm)
    assert report.fusions().get("attention.custom") == 1
    [rejected] = rejections(report)
    assert reason in rejected, rejected
    torch.manual_seed(0)
    want = module(*args)
    torch.manual_seed(0)
    torch.testing.assert_close(gm(*args), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- spelling sweep
def visible_keys(spelling, kv, qp, window):
    """One way of writing 'kv ≤ qp' (and, for a window, 'qp − kv < window')."""
    causal = {"le": lambda: kv <= qp, "ge": lambda: qp >= kv, "not_gt": lambda: ~(kv > qp),
              "diff": lambda: (qp - kv) >= 0, "lt_plus_one": lambda: kv < qp + 1}[spelling[0]]()
    if window is None:
        return causal
    recent = {"lt": lambda: qp - kv < window, "gt": lambda: kv > qp - window,
              "ge": lambda: kv >= qp - window + 1, "not_ge": lambda: ~(qp - kv >= window)}[spelling[1]]()
    return {"and": lambda: causal & recent, "mul": lambda: causal * recent,
            "logical": lambda: torch.logical_and(causal, recent),
            "where": lambda: torch.where(causal, recent, False)}[spelling[2]]()


class SweptMask(torch.nn.Module):
    def __init__(self, kind, positions, spelling, window, layout, additive, broken):
        super().__init__()
        self.kind, self.positions, self.spelling = kind, positions, spelling
        self.window, self.layout, self.additive, self.broken = window, layout, additive, broken

    def extra_repr(self):
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in
                         ("kind", "positions", "spelling", "window", "layout", "additive", "broken"))

    def forward(self, q, k, v, positions):
        sq, sk = q.shape[2], k.shape[2]
        kv = torch.arange(sk)
        if self.positions == "input":
            qp = positions[:, None, :, None]                      # [B, 1, Sq, 1]
        else:
            qp = (sk - sq + torch.arange(sq))[None, None, :, None]  # bottom-right
        if self.kind == "non_causal":
            qp = qp[:, :, -1:, :]
        qp = qp + 1 if self.broken == "offset" else qp
        mask = visible_keys(self.spelling, kv[None, None, None, :], qp, self.window)
        if self.broken == "window_both_sides":
            mask = mask & (kv[None, None, None, :] - qp < self.window)
        if self.layout == "expand":
            mask = mask.expand(q.shape[0], q.shape[1], sq, sk)
        if self.additive is not None:  # -inf, or the -65504 torch's CUDA SDPA writes for cuDNN's bias
            mask = torch.where(mask, 0.0, self.additive)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@st.composite
def swept_masks(draw):
    kind = draw(st.sampled_from(["non_causal", "causal", "sliding"]))
    window = draw(st.integers(1, 5)) if kind == "sliding" else None
    spelling = (draw(st.sampled_from(["le", "ge", "not_gt", "diff", "lt_plus_one"])),
                draw(st.sampled_from(["lt", "gt", "ge", "not_ge"])),
                draw(st.sampled_from(["and", "mul", "logical", "where"])))
    # broken variants: keys past the query's own position visible (a non_causal qp_last may move freely; a
    # two-sided window of 1 is the one-sided window of 1)
    broken = draw(st.sampled_from([None, None] + (["offset"] if kind != "non_causal" else [])
                                  + (["window_both_sides"] if window and window > 1 else [])))
    return SweptMask(kind, draw(st.sampled_from(["input", "bottom_right"])), spelling, window,
                     draw(st.sampled_from(["broadcast", "expand"])),
                     draw(st.sampled_from([None, float("-inf"), -65504.0])), broken)


def swept_args(batch, sq, sk):
    starts = torch.randint(0, sk - sq + 1, (batch, 1))  # every query sees at least its own key
    q, k, v = torch.randn(batch, 2, sq, 16), torch.randn(batch, 2, sk, 16), torch.randn(batch, 2, sk, 16)
    return q, k, v, starts + torch.arange(sq)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(swept_masks())
def test_mask_spellings_are_proven_or_kept(module):
    """Each spelling of a kind is proven that kind (window included); each broken variant stays custom; the
    numerics hold either way (soundness). Static shapes keep an example cheap (a dynamic export costs 5×); the
    second input set has other positions and values — the kinds' dynamic-shape numerics are tested above."""
    kind = "custom" if module.broken else module.kind
    _, gm, report = check_pass(module, swept_args(2, 4, 10), swept_args(2, 4, 10), PASSES, expected(**{kind: 1}))
    [site] = attention_nodes(gm)
    if kind == "sliding":
        assert site.args[5] == module.window
    if kind != "custom":
        no_dense_mask(gm)
        assert (site.args[7] is None) == (module.positions == "bottom_right")
    else:
        assert rejections(report)
