"""AOT compilation for the kernel tests: Triton cannot compile ahead of time in a process that runs the
interpreter, so a script compiles in child processes without TRITON_INTERPRET, one per target family."""

import json
import os
import subprocess
import sys


def run_aot_script(script: str, families=("cuda", "rocm")) -> dict:
    """Run `script` (which prints one JSON object on its last line; argv[1] is the family) per family side by
    side; returns the merged objects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", script, fam], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for fam in families]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results
