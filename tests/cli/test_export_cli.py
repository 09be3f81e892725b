"""torch-dflash export: the files it writes, that stock torch.export.load runs them like the models, and that
generate through them equals td.generate."""

import hashlib
import json
import re

import pytest
import torch

import torch_dflash as td
from torch_dflash.compiler.capture import DraftStep, VerifyStep
from torch_dflash.passes.pipeline import PASS_NAMES, skipped_before_export

from cli_testing import run_cli

PROMPT = [5, 17, 42, 9, 88, 3]


def _load_pair(target_dir, draft_dir, max_batch=2, max_seq_len=48):
    target, draft = td.load_target(target_dir), td.load_draft(draft_dir)
    target.feature_layer_ids = list(draft.target_layer_ids)
    for model in (target, draft):
        model.setup_cache(max_batch, max_seq_len)
    return target, draft


def test_export_writes_programs_report_kernels_and_a_manifest_of_every_file(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    files = {p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((export_dir / name).read_bytes()).hexdigest() == digest, name
    assert {"draft.pt2", "verify.pt2", "report.json", "draft.linalg.mlir", "verify.linalg.mlir"} <= files
    assert manifest["versions"]["torch"] == torch.__version__
    assert (manifest["target"], manifest["device"], manifest["gpu_archs"]) == ("ascend", "cpu", ["sm_90", "gfx942"])
    assert manifest["engine"] == {"max_batch": 2, "max_seq_len": 48, "block_size": 4, "context_window": None}
    report = json.loads((export_dir / "report.json").read_text())
    assert set(report) == {"draft", "verify"}
    for graph in report.values():
        exported = [name for name in PASS_NAMES if name not in skipped_before_export()]  # no in-place-only pass
        assert list(graph["report"]["passes"]) == exported
        assert set(graph["report"]["snapshots"]) == set(exported)
    assert len(report["verify"]["attention"]) == 4 and len(report["draft"]["attention"]) == 2   # one per layer
    for graph in ("draft", "verify"):
        source = (export_dir / "kernels" / "ascend" / f"{graph}.py").read_text()
        assert "def build(npu):" in source and source.count("def ascend_attention_") == len(report[graph]["attention"])


def test_kernels_are_compiled_for_each_requested_arch(export_dir):
    kernels = export_dir / "kernels"
    index = json.loads((kernels / "index.json").read_text())
    cubins, hsacos = sorted((kernels / "sm_90").glob("*.cubin")), sorted((kernels / "gfx942").glob("*.hsaco"))
    assert cubins and hsacos
    sources = {arch: {e["source"] for e in index if e["arch"] == arch} for arch in ("sm_90", "gfx942")}
    assert {"triton/attention_decode.py", "triton/norm_rope.py"} <= sources["gfx942"] <= sources["sm_90"], sources
    assert all(p.stat().st_size > 0 for p in cubins + hsacos)
    assert {e["file"] for e in index} == {p.relative_to(kernels).as_posix() for p in cubins + hsacos}
    assert cubins[0].read_bytes()[:4] == b"\x7fELF" and hsacos[0].read_bytes()[:4] == b"\x7fELF"
    aligned = {e["kernel"] for e in index if e["divisible_by_16"]}  # the alignment the binaries were built for
    assert any("qkv" in name for name in aligned), aligned
    report = json.loads((export_dir / "report.json").read_text())
    ops = {op for graph in report.values() for op in graph["report"]["providers"]}
    sources = {p.name: p.read_text() for p in (kernels / "triton").glob("*.py")}
    assert "qkv_norm_rope" in ops and "qkv_norm_rope.py" in sources and "attention.py" in sources
    assert all(e["source"].removeprefix("triton/") in sources for e in index)
    assert all("@triton.jit" in sources[e["source"].removeprefix("triton/")] for e in index)


def test_stock_export_load_runs_the_rewritten_programs_like_the_models(export_dir, tiny_qwen3_dir, tiny_draft_dir):
    """After `import torch_dflash` (the dflash ops), plain torch.export.load; both steps on a batch of 1 and of 2
    against DraftStep / VerifyStep of the models, caches included."""
    for batch in (1, 2):
        target, draft = _load_pair(tiny_qwen3_dir, tiny_draft_dir)
        programs = {g: torch.export.load(export_dir / f"{g}.pt2").module() for g in ("draft", "verify")}
        block = torch.tensor([[PROMPT[0], 127, 127, 127]] * batch)
        positions = torch.arange(4).expand(batch, 4) + 6
        features = torch.randn(batch, 3, 2 * 64)
        context_positions = torch.arange(3).expand(batch, 3) + 3
        with torch.no_grad():
            want = DraftStep(target, draft)(features, context_positions, block, positions)
            got = programs["draft"](features, context_positions, block, positions)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            want_logits, want_features = VerifyStep(target)(block, positions)
            got_logits, got_features = programs["verify"](block, positions)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_features, want_features, rtol=1e-4, atol=1e-5)
        caches = dict(programs["verify"].named_buffers())
        for i, layer in enumerate(target.model.layers):
            torch.testing.assert_close(caches[f"target.model.layers.{i}.self_attn.k_cache"], layer.self_attn.k_cache,
                                       rtol=1e-4, atol=1e-5)


def test_generate_through_the_export_equals_td_generate(export_dir, tiny_qwen3_dir, tiny_draft_dir):
    result = run_cli("generate", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir, "--prompt-ids",
                     ",".join(map(str, PROMPT)), "--max-new-tokens", 12, "--artifact", export_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    new_tokens = json.loads(re.search(r"new tokens (\[.*\])", result.stdout).group(1))
    out = td.generate(td.load_target(tiny_qwen3_dir), td.load_draft(tiny_draft_dir), PROMPT, max_new_tokens=12)
    assert new_tokens == out.sequences[0].tolist()[len(PROMPT):] and len(new_tokens) == 12
    assert f"steps run by the programs of {export_dir}" in result.stdout
    lengths = re.search(r"acceptance lengths\s*│\s*([\d ]+?)\s*│", result.stdout).group(1)
    assert [int(n) for n in lengths.split()] == out.acceptance_lengths[0]


@pytest.mark.gpu
def test_gpu_export_lowers_to_triton_and_generates_like_td_generate(tmp_path, tiny_qwen3_dir, tiny_draft_dir):
    """On the GPU: the export picks the Triton qkv_norm_rope (fp32, head_dim 16; attention's kernels need
    head_dim ≥ 64 and keep the reference), compiles the kernels for the local arch, and generate through the
    loaded programs (provider ops defined by load_artifact) gives td.generate's tokens."""
    device = "rocm" if torch.version.hip else "cuda"
    out = tmp_path / "gpu"
    result = run_cli("export", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir, "--out", out,
                     "--device", device, "--batch-max", 2, "--max-seq-len", 48)
    assert result.returncode == 0, result.stderr[-3000:]
    report, manifest = (json.loads((out / name).read_text()) for name in ("report.json", "manifest.json"))
    assert set(report["verify"]["report"]["providers"]["qkv_norm_rope"]) == {"triton"}
    assert manifest["gpu_archs"] and any((out / "kernels" / manifest["gpu_archs"][0]).iterdir())
    result = run_cli("--quiet", "generate", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir, "--prompt-ids",
                     ",".join(map(str, PROMPT)), "--max-new-tokens", 12, "--artifact", out)
    assert result.returncode == 0, result.stderr[-3000:]
    want = td.generate(td.load_target(tiny_qwen3_dir, device="cuda"), td.load_draft(tiny_draft_dir, device="cuda"),
                       PROMPT, max_new_tokens=12)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == want.sequences[0].tolist()
