"""The split-K skinny GEMM (compiler/triton/skinny_gemm.py) vs torch.mm in fp32: interpreter numerics with tails
in M, N and K, one split and several (the last-arriving slice sums the partials; its tickets reset), one-sentence
refusals, and ahead-of-time builds for sm_80, sm_90, gfx942, gfx950."""

import pytest
import torch
from aot_testing import run_aot_script
from test_triton_qkv_gemm import SHARED_LIMIT

from torch_dflash.compiler.triton import skinny_gemm as sg
from torch_dflash.errors import InputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, w):
    return (x.float() @ w.float().t()).to(x.dtype)


@pytest.mark.parametrize("m,n,k,split", [(1, 96, 256, 1), (5, 72, 200, 3), (16, 64, 128, 4), (32, 40, 96, 2)])
def test_matches_mm_with_tails_and_splits(m, n, k, split):
    """72 / 40 rows are not multiples of BLOCK_N 32; 200 / 96 of K are not multiples of split × BLOCK_K."""
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(torch.bfloat16).to(DEVICE)
    config = {"block_n": 32, "block_k": 32, "split_k": split}
    want = _reference(x, w)
    for _ in range(2):   # the second call finds the tickets the first one reset
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
        got = sg.skinny_gemm(x, w, config, out=out)
        assert got is out
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    if split > 1:
        assert not sg._arrival_counters(x.device, n // 32 + 1).any()


@pytest.mark.parametrize("x,w,match", [
    (torch.zeros(33, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16), "33 rows; the kernel takes 1 to 32"),
    (torch.zeros(2, 8), torch.zeros(4, 8), "must both be bf16 or fp16"),
    (torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16), r"\[M, K\] and w \[N, K\]"),
])
def test_refuses_what_it_cannot_run(x, w, match):
    with pytest.raises(InputError, match=match):
        sg.skinny_gemm(x.to(DEVICE), w.to(DEVICE))


AOT_SCRIPT = """
import json, sys, torch
from torch_dflash.compiler.triton import aot, skinny_gemm
fam = sys.argv[1]
specs = [skinny_gemm.gemm_spec(torch.bfloat16, 16, 4, fam), skinny_gemm.gemm_spec(torch.bfloat16, 32, 1, fam)]
result = {}
for arch in (a for a in aot.ARCHS if aot.family(a) == fam):
    for spec in specs:
        try:
            compiled = aot.compile_spec(spec, arch)
            result[f"{spec.name}@{arch}"] = [len(aot.binary(compiled, arch)), compiled.metadata.shared]
        except Exception as error:
            result[f"{spec.name}@{arch}"] = f"{type(error).__name__}: {error}"[:400]
print(json.dumps(result))
"""


def test_compiles_for_every_arch():
    """bf16, 16 rows split 4 ways (the ticket path) and 32 rows unsplit, with each family's default config, for
    sm_80, sm_90, gfx942 and gfx950, within each target's shared memory."""
    results = run_aot_script(AOT_SCRIPT)
    assert len(results) == 4 * 2
    failed = {name: r for name, r in results.items() if not isinstance(r, list) or r[0] == 0}
    assert not failed, failed
    over = {name: shared for name, (_, shared) in results.items() if shared > SHARED_LIMIT[name.split("@")[1]]}
    assert not over, over


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 32])
def test_gpu_qwen3_shapes(m):
    """The Qwen3-8B shapes of the benchmark (K 4096 → N 24576 merged gate|up; K 12288 → 4096 down), default config."""
    for n, k in ((24576, 4096), (4096, 12288)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        torch.testing.assert_close(sg.skinny_gemm(x, w).float(), _reference(x, w).float(), atol=2e-2, rtol=2e-2)
