"""mhc_post_pre on transformers' DeepseekV4ForCausalLM and on our models/mhc.py target.

transformers: the WHOLE tiny DeepseekV4ForCausalLM exports (heavily-compressed attention layers, top-k MoE; the
sequence length dynamic), so the test runs on the real model, not on a stack of stand-in sublayers.
L layers have 2L sublayers: 1 mhc_pre (layer 0's attention), 2L − 1 mhc_post_pre, 1 mhc_post (before the hc_head).
Each fused op is checked to carry the right layer's parameters and eps / iters, and the numerics (fp32, 1e-5)
on a second sequence length. The refusals use a small stack whose hyper-connection spells one thing differently.
"""

import pytest
import torch
import torch.nn.functional as F
from pass_testing import HFRMSNorm, check_pass, op_diff
from tiny_models import deepseek_v4, mhc_decoder_lm, mhc_inputs
from torch.export import Dim

from torch_dflash.models.mhc import HCRMSNorm, hc_post, hc_pre
from torch_dflash.passes import canonicalize, cleanup, mhc_post_pre

PASSES = [canonicalize.PASS, mhc_post_pre.PASS, cleanup.PASS]
dflash = torch.ops.dflash


def counts(layers):
    return {"mhc_pre": 1, "mhc_post_pre": 2 * layers - 1, "mhc_post": 1}


def fused_sites(gm):
    ops = (dflash.mhc_pre.default, dflash.mhc_post_pre.default, dflash.mhc_post.default)
    return [n for n in gm.graph.nodes if n.target in ops]


def check_boundaries(gm, layers, iters, eps, prefix):
    """Sites in graph order: mhc_pre(layer 0 attn), then post_pre with (fn, norm) of each following sublayer."""
    sites = fused_sites(gm)
    assert [s.target for s in sites] == [dflash.mhc_pre.default] + [dflash.mhc_post_pre.default] * (2 * layers - 1) \
        + [dflash.mhc_post.default]
    hc = [f"{prefix}layers.{i}.{kind}_hc" for i in range(layers) for kind in ("attn", "ffn")]
    norms = [f"{prefix}layers.{i}.{kind}" for i in range(layers)
             for kind in ("input_layernorm", "post_attention_layernorm")]
    assert sites[0].args[1].target == f"{hc[0]}.fn" and sites[0].args[4:] == (eps, eps, iters)
    for site, fn, norm in zip(sites[1:-1], hc[1:], norms[1:]):
        assert [a.target for a in site.args[4:7]] == [f"{fn}.fn", f"{fn}.base", f"{fn}.scale"]
        assert site.args[7].target == f"{norm}.weight"
        assert site.args[8:] == (eps, eps, iters, eps)


# ---------------------------------------------------------------------------------------- transformers
def test_transformers_deepseek_v4_every_boundary():
    model = deepseek_v4(layers=2, iters=3)
    args = {"input_ids": torch.randint(0, 128, (1, 8)), "use_cache": False}
    second = {"input_ids": torch.randint(0, 128, (1, 11)), "use_cache": False}
    dims = {"input_ids": {1: Dim("seq", min=2, max=64)}, "use_cache": None}
    before, gm, _ = check_pass(model, args, second, PASSES, counts(2), dims)
    check_boundaries(gm, layers=2, iters=3, eps=1e-6, prefix="model.")
    gone, _ = op_diff(before, gm)
    assert gone["aten.softmax.int"] == 4 and gone["aten.matmul.default"] == 4  # every hc comb and hc_post
    assert gone["aten.sigmoid.default"] == 8                                   # pre and post of each sublayer


# ---------------------------------------------------------------------------------------- our models/mhc.py
@pytest.mark.parametrize("layers, iters, n", [(2, 20, 4), (1, 1, 2), (3, 2, 3)])
def test_own_mhc_target_every_boundary(layers, iters, n):
    seq = Dim("seq", min=2, max=16)
    dims = {"input_ids": {1: seq}, "positions": {1: seq}}
    _, gm, _ = check_pass(mhc_decoder_lm(layers, iters, n), mhc_inputs(2, 8), mhc_inputs(2, 11), PASSES, counts(layers),
                          dims)
    check_boundaries(gm, layers, iters, eps=1e-6, prefix="model.")


# ---------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("norm", [HCRMSNorm, HFRMSNorm])
def test_bf16_either_norm_weight_order_fuses(norm):
    """The next sublayer's RMSNorm multiplies its weight in fp32 then casts (HCRMSNorm, DeepSeek) or casts back then
    multiplies in bf16 (HFRMSNorm, Qwen3's spelling): both fuse; the op multiplies in fp32, one rounding apart.
    The outputs reach ~10, where one bf16 ulp is 0.0625: atol 0.07."""
    model = Variant()
    model.norms = torch.nn.ModuleList(norm(32, 1e-6) for _ in range(2))
    with torch.no_grad():
        for n in model.norms:
            n.weight.copy_(1 + 0.3 * torch.randn(32))
    seq = Dim("seq", min=2, max=16)
    args, second = ((torch.randn(2, length, 32, dtype=torch.bfloat16),) for length in (6, 9))
    check_pass(model.to(torch.bfloat16), args, second, PASSES, {"mhc_pre": 1, "mhc_post_pre": 1, "mhc_post": 1},
               ({1: seq},), atol=0.07, rtol=2e-2)


# ---------------------------------------------------------------------------------------- refusals
class Variant(torch.nn.Module):
    """Two sublayers (linears) between hyper-connections spelled like models/mhc.py, except for one knob."""

    def __init__(self, knob=None, n=4, dim=32, iters=3):
        super().__init__()
        self.knob, self.n, self.iters = knob, n, iters
        self.hc = torch.nn.ParameterList()
        for _ in range(2):
            self.hc.append(torch.nn.Parameter(0.05 * torch.randn((2 + n) * n, n * dim)))
            self.hc.append(torch.nn.Parameter(0.3 * torch.randn((2 + n) * n)))
            self.hc.append(torch.nn.Parameter(1 + 0.3 * torch.randn(3)))
        self.norms = torch.nn.ModuleList(HCRMSNorm(dim, 1e-6) for _ in range(2))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2))

    def pre(self, x, i):
        fn, base, scale = self.hc[3 * i: 3 * i + 3]
        if self.knob in ("rows_first", "sinkhorn_eps"):
            return variant_pre(x, fn, base, scale, self.n, self.iters, self.knob)
        return hc_pre(x, fn, base, scale, self.n, self.iters, 1e-6, 1e-6)

    def post(self, out, x, post, comb):
        if self.knob == "untransposed":
            return post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb, x)
        return hc_post(out, x, post, comb)

    def forward(self, h):
        x = h.unsqueeze(2).expand(-1, -1, self.n, -1).contiguous()
        extra = 0
        for i in range(2):
            post, comb, collapsed = self.pre(x, i)
            if self.knob == "leak" and i == 1:
                extra = collapsed.sum()
            x = self.post(self.layers[i](self.norms[i](collapsed)), x, post, comb)
        return x.sum(2) + extra


def variant_pre(x, fn, base, scale, n, iters, knob):
    """models/mhc.hc_pre with the Sinkhorn changed: rows normalized first, or a different eps in the loop."""
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
    pre_w, post_w, comb_w = F.linear(flat, fn.float()).split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    s0, s1, s2 = scale.unbind(0)
    pre = torch.sigmoid(pre_w * s0 + pre_b) + 1e-6
    post = 2 * torch.sigmoid(post_w * s1 + post_b)
    comb = torch.softmax(comb_w.view(*comb_w.shape[:-1], n, n) * s2 + comb_b.view(n, n), dim=-1) + 1e-6
    first, second, eps = (-1, -2, 1e-6) if knob == "rows_first" else (-2, -1, 1e-4)
    comb = comb / (comb.sum(dim=first, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=second, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=first, keepdim=True) + eps)
    return post, comb, (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


@pytest.mark.parametrize("knob, kinds, reason", [
    (None, {"mhc_pre": 1, "mhc_post_pre": 1, "mhc_post": 1}, None),
    ("rows_first", {"mhc_pre": 0, "mhc_post_pre": 0, "mhc_post": 2}, "Sinkhorn normalizes along [-1, -2"),
    ("sinkhorn_eps", {"mhc_pre": 0, "mhc_post_pre": 0, "mhc_post": 2}, "the hc eps differ: [1e-06, 0.0001]"),
    ("untransposed", {"mhc_pre": 2, "mhc_post_pre": 0, "mhc_post": 0}, "comb is used untransposed"),
    ("leak", {"mhc_pre": 2, "mhc_post_pre": 0, "mhc_post": 2}, "the layer input is read by more than its RMSNorm"),
])
def test_refusals_keep_the_site_and_say_why(knob, kinds, reason):
    seq = Dim("seq", min=2, max=16)
    _, _, report = check_pass(Variant(knob), (torch.randn(2, 6, 32),), (torch.randn(2, 9, 32),), PASSES, kinds,
                              ({1: seq},))
    reasons = [r.reason for r in report.rejections() if r.pass_name == "mhc_post_pre"]
    if reason is None:
        assert not reasons
    else:
        assert reasons and all(reason in r for r in reasons), reasons
