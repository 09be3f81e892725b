"""Helpers of the CLI tests: run `torch-dflash` as a user does and read its one-line errors."""

import os
import subprocess
import sys


def run_cli(*args, timeout=900):
    """`torch-dflash ARGS` in a fresh process; wide columns so rich does not wrap table cells."""
    env = {**os.environ, "COLUMNS": "240"}
    return subprocess.run([sys.executable, "-m", "torch_dflash.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_error(result) -> str:
    """The single stderr line of a user error (exit 1, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]
