"""The CLI as a user runs it: a subprocess, exit codes, one-line errors."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "torch_dflash.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_demo_runs_draft_and_verify_and_reports_acceptance():
    result = _cli("demo", "--prompt-len", "5")
    assert result.returncode == 0, result.stderr
    for needle in ("prefill (target)", "draft step", "verify step", "accepted"):
        assert needle in result.stdout


def test_demo_on_a_missing_device_is_a_user_error_in_one_line():
    result = _cli("demo", "--device", "nosuchdevice")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nosuchdevice" in lines[0] and "Traceback" not in result.stderr
