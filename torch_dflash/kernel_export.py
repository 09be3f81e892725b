"""The Triton kernels of an export: the sources of the kernels behind the graphs' dflash ops, and their binaries
compiled ahead of time per GPU arch (cubin for sm_*, hsaco for gfx*) — no GPU needed.

For each dflash op, the module of its Triton provider gives the kernel configurations (`aot_specs(family)`,
the configurations the module declares: Qwen3-8B shapes in bf16). The sources are the provider module and every
module defining a @triton.jit function it or its kernels use. Compilation runs in a child process without
TRITON_INTERPRET (an interpreted kernel cannot be compiled); the child prints one JSON line per kernel.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from torch_dflash.errors import InputError

EXTENSIONS = {"cuda": ".cubin", "rocm": ".hsaco"}


def check_archs(archs: list[str]) -> None:
    """InputError unless triton is importable and every arch is one the AOT table knows."""
    if not archs:
        return
    try:
        from torch_dflash.compiler.triton import aot
    except ImportError:
        raise InputError("--gpu-arch needs triton installed (pip install 'torch-dflash[triton]').") from None
    unknown = [a for a in archs if a not in aot.ARCHS]
    if unknown:
        raise InputError(f"Unknown GPU arch {unknown[0]}; choose from {', '.join(aot.ARCHS)}.")


def write_triton_kernels(out: Path, ops: list[str], archs: list[str],
                         on_progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Compile the kernels of `ops` for `archs` into out/<arch>/, copy their sources to out/triton/, write
    out/index.json; returns its entries. on_progress(done, total, kernel) follows the compilation."""
    check_archs(archs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    request = json.dumps({"ops": sorted(ops), "archs": list(archs), "out": str(out)})
    entries, total = [], 0
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-m", "torch_dflash.kernel_export", request], env=env,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in child.stdout:
            message = json.loads(line)
            if "total" in message:
                total = message["total"]
            else:
                entries.append(message)
                if on_progress:
                    on_progress(len(entries), total, message["kernel"])
        if child.wait() != 0:
            errors.seek(0)
            raise RuntimeError(f"ahead-of-time kernel compilation failed:\n{errors.read()[-3000:]}")
    (out / "index.json").write_text(json.dumps(entries, indent=1))
    return entries


# ---- the child process -----------------------------------------------------------------------------------------

def _provider_modules(ops, traceable_only: bool = False):
    """The modules of the Triton providers of `ops` (those that declare aot_specs); `traceable_only`: of the
    providers Inductor traces into (their kernels sit in its generated code)."""
    from torch_dflash.compiler import lowering, providers

    lowering.load_providers("cuda")
    modules = {}
    for op in ops:
        for provider in providers.candidates(op, "cuda"):
            module = sys.modules[provider.impl.__module__]
            if hasattr(module, "aot_specs") and (provider.traceable or not traceable_only):
                modules[module.__name__] = module
    return list(modules.values())


def _specs(module, family):
    import inspect

    if "families" in inspect.signature(module.aot_specs).parameters:   # attention: several families at once
        return module.aot_specs((family,))
    return module.aot_specs(family)


def _source_files(modules) -> list[Path]:
    """The modules' files and those of every module defining a @triton.jit function they reference."""
    from triton.runtime.jit import JITFunction

    files, seen, todo = [], set(), list(modules)
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        files.append(Path(module.__file__))
        todo += [sys.modules[v.fn.__module__] for v in vars(module).values() if isinstance(v, JITFunction)]
    return sorted(files)


def _file_name(spec_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec_name).strip("_")


def _child(request: dict) -> None:
    from torch_dflash.compiler.triton import aot

    out, modules = Path(request["out"]), _provider_modules(request["ops"])
    work = [(arch, spec) for arch in request["archs"] for module in modules
            for spec in _specs(module, aot.family(arch)) if spec.builds_for(arch)]
    print(json.dumps({"total": len(work)}), flush=True)
    sources = out / "triton"
    sources.mkdir(parents=True, exist_ok=True)
    for file in _source_files([*modules, *(sys.modules[spec.fn.fn.__module__] for _, spec in work)]):
        shutil.copyfile(file, sources / file.name)
    for arch, spec in work:
        binary = aot.binary(aot.compile_spec(spec, arch), arch)
        path = out / arch / (_file_name(spec.name) + EXTENSIONS[aot.family(arch)])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(binary)
        print(json.dumps({"kernel": spec.name, "arch": arch, "file": path.relative_to(out).as_posix(),
                          "function": spec.fn.fn.__name__,
                          "source": f"triton/{Path(spec.fn.fn.__code__.co_filename).name}",
                          "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
                          "num_warps": spec.num_warps, "num_stages": spec.num_stages, "bytes": len(binary),
                          "divisible_by_16": list(spec.divisible_by_16)}),  # a launcher must honour these
              flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
