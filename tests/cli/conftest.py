"""The CLI tests' shared export: tiny random checkpoints (tests/conftest.py) exported once by a subprocess for the
Ascend target (here: no torch_npu, so the programs keep the reference ops and the Ascend source is generated), with
Triton kernels for sm_90 and gfx942 and linalg MLIR, as a user would ask for them."""

import pytest
from cli_testing import run_cli

EXPORT_ARGS = ("--device", "ascend", "--batch-max", "2", "--max-seq-len", "48", "--gpu-arch", "sm_90,gfx942",
               "--mlir", "linalg")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, tiny_qwen3_dir, tiny_draft_dir):
    out = tmp_path_factory.mktemp("export") / "out"
    result = run_cli("export", "--target", tiny_qwen3_dir, "--draft", tiny_draft_dir, "--out", out, *EXPORT_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
