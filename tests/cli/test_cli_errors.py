"""Mistakes a user can make: each ends with exit code 1 and ONE clear line (subprocesses), and load_artifact
refuses foreign, stale and tampered exports with one sentence (in process)."""

import json
import shutil

import pytest
from cli_testing import one_line_error, run_cli

import torch_dflash as td
from torch_dflash.artifact import load_artifact
from torch_dflash.demo import build_demo_pair
from torch_dflash.manifest import ArtifactError


def test_a_missing_checkpoint_directory(tmp_path, tiny_draft_dir):
    line = one_line_error(run_cli("export", "--target", tmp_path / "nowhere", "--draft", tiny_draft_dir,
                                  "--out", tmp_path / "out"))
    assert "nowhere" in line


def test_a_truncated_safetensors_file(tmp_path, tiny_qwen3_dir, tiny_draft_dir):
    target = tmp_path / "target"
    shutil.copytree(tiny_qwen3_dir, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_line_error(run_cli("export", "--target", target, "--draft", tiny_draft_dir, "--out", tmp_path / "out"))
    assert "model.safetensors" in line and "truncated" in line


def test_a_corrupt_pt2(tmp_path):
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"PK\x03\x04 not really a zip archive" * 8)
    line = one_line_error(run_cli("inspect", broken))
    assert "broken.pt2" in line and "exported program" in line


def test_a_foreign_directory_as_artifact(tmp_path, tiny_qwen3_dir, tiny_draft_dir):
    line = one_line_error(run_cli("generate", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir,
                                  "--prompt-ids", "1,2,3", "--artifact", tiny_qwen3_dir))
    assert "not a torch-dflash export" in line


def test_bad_prompt_ids(tiny_qwen3_dir, tiny_draft_dir):
    line = one_line_error(run_cli("generate", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir,
                                  "--prompt-ids", "1,two,3"))
    assert "--prompt-ids" in line


@pytest.fixture
def copied_export(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    return copy


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_tampered_missing_stale_and_foreign_exports_are_refused(copied_export):
    report = copied_export / "report.json"
    original = report.read_bytes()
    report.write_bytes(original + b" ")          # still valid JSON, one byte more
    with pytest.raises(ArtifactError, match="report.json was modified after export"):
        load_artifact(copied_export)
    report.write_bytes(original)
    (copied_export / "kernels" / "index.json").unlink()
    with pytest.raises(ArtifactError, match="index.json is missing"):
        load_artifact(copied_export)
    manifest = _manifest(copied_export)
    manifest["versions"]["torch"] = "2.11.0"
    (copied_export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"stale: it was exported with torch 2\.11\.0"):
        load_artifact(copied_export)
    (copied_export / "manifest.json").write_text('{"format": "something else", "files": {}}')
    with pytest.raises(ArtifactError, match="not a torch-dflash manifest"):
        load_artifact(copied_export)


def test_models_other_than_the_exported_ones_are_refused(export_dir, tiny_qwen3_dir, tiny_draft_dir):
    artifact = load_artifact(export_dir)
    other_target, other_draft = build_demo_pair(0)
    with pytest.raises(ArtifactError, match="The target model differs from the one"):
        artifact.engine(other_target, td.load_draft(tiny_draft_dir))
    with pytest.raises(ArtifactError, match="The draft model differs"):
        artifact.engine(td.load_target(tiny_qwen3_dir), other_draft)


def test_export_does_not_overwrite_a_directory_that_is_not_an_export(tmp_path, tiny_qwen3_dir, tiny_draft_dir):
    from torch_dflash.artifact import export
    from torch_dflash.errors import InputError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds no torch-dflash export"):
        export(td.load_target(tiny_qwen3_dir), td.load_draft(tiny_draft_dir), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
