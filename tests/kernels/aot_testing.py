"""AOT compilation for the kernel tests: Triton cannot compile ahead of time in a process that runs the
interpreter, so a script compiles in child processes without TRITON_INTERPRET, one per target family."""

import json
import os
import subprocess
import sys


# Appended to a script that defines `fam`, `aot`, `json` and `specs`: builds every spec for the family's archs and
# prints {"name@arch": [binary bytes, shared memory bytes] or the error}.
COMPILE_SPECS = """
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
