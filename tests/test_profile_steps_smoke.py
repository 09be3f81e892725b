"""benchmarks/profile_steps.py --runtime on CPU at tiny shapes: the runtime's steps and a whole turn are profiled
and written, and --no-pdl builds them with programmatic dependent launch off (nothing meaningful is timed on CPU)."""

import json

from torch_dflash.benchmarks import profile_steps
from torch_dflash.compiler.triton import configs


def test_runtime_profile_runs_small_and_records_the_launch_mode(tmp_path, monkeypatch):
    monkeypatch.setitem(configs.TABLE, "programmatic_launch", configs.TABLE["programmatic_launch"])  # restored after
    result = profile_steps.main(["--small", "--runtime", "--no-pdl", "--steps", "draft,verify,ar,turn", "--reps", "1",
                                 "--out", str(tmp_path)])
    assert [row["step"] for row in result["steps"]] == ["draft", "verify", "ar", "turn"]
    assert all(row["kernels"] and row["step_us"] > 0 for row in result["steps"])
    assert result["programmatic_launch"] is False
    assert all(row["on"] == 0 for row in configs.TABLE["programmatic_launch"].values())
    assert json.loads((tmp_path / "profile_steps.json").read_text())["programmatic_launch"] is False
