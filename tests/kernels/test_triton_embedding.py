"""Triton provider of dflash.embedding_rms_norm vs the reference op: TRITON_INTERPRET=1 on CPU tensors without a
GPU, compiled with one. Both outputs are poisoned with NaN first, so an element the kernel fails to write fails;
the gathered rows must equal the reference's bit for bit (a copy). AOT builds: tests/kernels/test_triton_projections.
"""

import pytest
import torch
from test_triton_projections import DEVICE, EPS, assert_close, param_id, poisoned, rand

from torch_dflash.compiler import providers
from torch_dflash.compiler.ops import embedding_rms_norm_reference
from torch_dflash.compiler.triton import embedding as emb
from torch_dflash.compiler.triton import norm_rope as nr


def check(table, ids, w):
    """The provider into NaN-poisoned outputs against the reference: embeds equal, normed within tolerance."""
    assert emb.embedding_rms_norm_supports(table, ids, w, EPS) is None
    ref_embeds, ref_normed = embedding_rms_norm_reference(table, ids, w, EPS)
    out = tuple(poisoned(*ref_embeds.shape, dtype=table.dtype) for _ in range(2))
    embeds, normed = emb.embedding_rms_norm(table, ids, w, EPS, out=out)
    assert embeds is out[0] and normed is out[1]
    assert torch.equal(embeds, ref_embeds)
    assert_close(normed, ref_normed, table.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("hidden,weight,ids_dtype", [(64, True, torch.int64), (100, False, torch.int32),
                                                     (1000, True, torch.int32), (4096, True, torch.int64)])
def test_gather_and_norm_match_the_reference(dtype, hidden, weight, ids_dtype):
    """Widths from 64 to 4096, powers of two or not (partial column tiles); ids repeat and include 0 and V - 1."""
    g = torch.Generator(DEVICE).manual_seed(hidden)
    table = rand(300, hidden, dtype=dtype, scale=3.0, gen=g)
    w = rand(hidden, dtype=dtype, gen=g) if weight else None
    ids = torch.randint(0, 300, (2, 7), generator=g, device=DEVICE)
    ids[0, :3] = torch.tensor([0, 299, 0])
    check(table, ids.to(ids_dtype), w)


def test_a_strided_table_and_ids_of_other_ranks():
    """The table's rows at a stride (a slice of a wider table) are read in place; ids [T] and [B, S, K]."""
    g = torch.Generator(DEVICE).manual_seed(1)
    table = rand(50, 160, dtype=torch.float32, gen=g)[:, :96]
    w = rand(96, dtype=torch.float32, gen=g)
    check(table, torch.randint(0, 50, (5,), generator=g, device=DEVICE), w)
    check(table, torch.randint(0, 50, (2, 3, 2), generator=g, device=DEVICE), w)


def test_registered_for_cuda_and_rocm_only():
    for target in ("cuda", "rocm"):
        assert providers.candidates("embedding_rms_norm", target)[0].name == "triton"
    assert all(p.name != "triton" for p in providers.candidates("embedding_rms_norm", "cpu"))


def test_supports_gives_reasons(monkeypatch):
    table, ids = torch.zeros(10, 64, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    bf16_w = torch.zeros(64, dtype=torch.bfloat16, device=DEVICE)
    assert "norm_weight is torch.bfloat16" in emb.embedding_rms_norm_supports(table, ids, bf16_w, EPS)
    assert "row width 65536" in emb.embedding_rms_norm_supports(torch.zeros(1, 65536, device=DEVICE), ids, None, EPS)
    assert "rows are strided" in emb.embedding_rms_norm_supports(table.t(), ids, None, EPS)
    monkeypatch.setattr(nr, "interpreting", lambda: False)
    assert "CUDA/ROCm tensors" in emb.embedding_rms_norm_supports(torch.zeros(10, 64), ids.cpu(), None, EPS)


@pytest.mark.gpu
def test_gpu_qwen3_width_and_a_table_past_2_31_elements():
    """H 4096 bf16, 16 tokens of a table of V·H > 2^31 elements (4.3 GB): rows past 2^31 / H need int64 offsets."""
    hidden, vocab = 4096, (1 << 31) // 4096 + 64
    g = torch.Generator(DEVICE).manual_seed(0)
    table = torch.empty(vocab, hidden, dtype=torch.bfloat16, device=DEVICE).normal_(generator=g)
    ids = torch.tensor([[vocab - 1, 0, vocab - 64, (1 << 31) // 4096, *range(vocab - 12, vocab)]], device=DEVICE)
    check(table, ids, rand(hidden, dtype=torch.bfloat16, gen=g))
