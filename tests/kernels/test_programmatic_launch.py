"""Programmatic dependent launch (compiler/triton/launch.py): which launches use it, and that every kernel built for
sm_90 waits for the previous grid before it touches memory an earlier kernel may write."""

import ast
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from torch_dflash.compiler.triton import configs, launch

from aot_testing import run_aot_script

TRITON_DIR = Path(launch.__file__).parent

# one spec per kernel function of every Triton provider (torch_dflash.kernel_export's modules) that takes the PDL
# constexpr, built for sm_80 and sm_90 (programmatic launch from sm_90 on); prints {"kernel@arch": PTX}. The one
# kernel without it, mhc_single_pass's cooperative launch, starts after the previous kernel has completed.
PTX_SCRIPT = """
import json, sys
import torch
from torch_dflash import kernel_export
from torch_dflash.compiler import ops
from torch_dflash.compiler.triton import aot
specs = {}
for module in kernel_export._provider_modules(ops.OP_NAMES):
    for spec in kernel_export._specs(module, "cuda"):
        if "PDL" in spec.fn.arg_names:
            specs.setdefault(spec.fn.__name__, spec)
print(json.dumps({f"{name}@{arch}": aot.compile_spec(spec, arch).asm["ptx"]
                  for name, spec in specs.items() for arch in ("sm_80", "sm_90")}))
"""
# instructions that read or write global memory
MEMORY = re.compile(r"^(@!?%p\d+\s+)?(ld\.global|st\.global|atom\.|red\.|cp\.async|cp\.reduce|ld\.param\.u64 .*ws)")


@pytest.fixture(scope="module")
def ptx():
    return run_aot_script(PTX_SCRIPT, families=("cuda",))


def _instructions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("//")]


def test_every_kernel_of_the_providers_is_built(ptx):
    kernels = {key.split("@")[0] for key in ptx}
    assert {"skinny_gemm_kernel", "qkv_gemm_norm_rope_kernel", "attention_decode_kernel", "reduce_splits_kernel",
            "attention_prefill_kernel", "norm_rope_heads_kernel", "rms_norm_rows_kernel", "silu_mul_kernel",
            "_mhc_kernel", "embedding_rms_norm_kernel"} <= kernels


# kernels that may load (never store) before the wait, and why: the decode attention reads the queries' positions
# to aim its K/V prefetch — a value still being written only misaims the prefetch; every such address is loaded
# again after the wait for the range it attends to
EARLY_LOADS = {"attention_decode_kernel"}
LOAD_ADDRESS = re.compile(r"^(@!?%p\d+\s+)?ld\.global\S*\s[^\[]*(\[[^\]]+\])")


def test_sm90_kernels_wait_for_the_previous_grid_before_any_memory_access(ptx):
    for key, text in ptx.items():
        if not key.endswith("@sm_90"):
            continue
        code = _instructions(text)
        waits = [i for i, line in enumerate(code) if line.startswith("griddepcontrol.wait")]
        launches = [i for i, line in enumerate(code) if line.startswith("griddepcontrol.launch_dependents")]
        assert waits and launches and launches[0] > waits[0], f"{key}: dependents launched before the wait"
        early = [line for line in code[:waits[0]] if MEMORY.match(line)]
        if key.split("@")[0] not in EARLY_LOADS:
            assert not early, f"{key}: a global access before griddepcontrol.wait: {early[0]}"
            continue
        addresses = [LOAD_ADDRESS.match(line) for line in early]
        assert early and all(addresses), f"{key}: only loads may come before the wait: {early}"
        later = {m.group(2) for m in map(LOAD_ADDRESS.match, code[waits[0]:]) if m}
        assert {m.group(2) for m in addresses} <= later, f"{key}: an early load is not repeated after the wait"


@pytest.mark.parametrize("kernel", ["skinny_gemm_kernel", "attention_decode_kernel"])
def test_sm90_kernels_prefetch_what_no_kernel_of_the_step_changes_before_the_wait(ptx, kernel):
    """skinny_gemm asks L2 for the first prefetch_k columns of its weight rows, the decode attention for its
    split's first prefetch_keys K/V rows, while the previous grid drains; the sm_80 builds (no PDL) do not."""
    code = _instructions(ptx[f"{kernel}@sm_90"])
    prefetches = [i for i, line in enumerate(code) if line.startswith("prefetch.global.L2")]
    wait = next(i for i, line in enumerate(code) if line.startswith("griddepcontrol.wait"))
    assert prefetches and max(prefetches) < wait
    assert "prefetch.global" not in ptx[f"{kernel}@sm_80"]


def test_sm80_kernels_carry_no_grid_dependency_control(ptx):
    for key, text in ptx.items():
        if key.endswith("@sm_80"):
            assert "griddepcontrol" not in text, key


def _launch_calls(tree: ast.AST):
    """The `wrap_triton(kernel)[grid](...)` calls of a module."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", "") == "wrap_triton"):
            yield node


def test_every_launch_site_passes_the_programmatic_launch_arguments():
    sites = 0
    for path in sorted(TRITON_DIR.glob("*.py")):
        for call in _launch_calls(ast.parse(path.read_text())):
            sites += 1
            spread = [kw.value for kw in call.keywords if kw.arg is None]
            assert any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "programmatic_launch"
                       for v in spread), f"{path.name}:{call.lineno} launches without **programmatic_launch(...)"
    assert sites >= 11


def test_off_on_cpu_rocm_older_gpus_and_while_traced(monkeypatch):
    assert launch.programmatic_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(launch, "device_facts", lambda index: ((9, 0), 132))
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    assert launch.programmatic_launch(cuda) == {"PDL": True, "launch_pdl": True}
    with FakeTensorMode():
        assert launch.programmatic_launch(cuda) == {"PDL": False}   # torch's traceable launch takes no options
    monkeypatch.setattr(launch, "device_facts", lambda index: ((8, 0), 108))
    assert launch.programmatic_launch(cuda) == {"PDL": False}
    monkeypatch.setattr(launch, "device_facts", lambda index: ((9, 0), 132))
    monkeypatch.setitem(configs.TABLE, "programmatic_launch", {"cuda": {"on": 0, "min_sm": 90}})
    assert launch.programmatic_launch(cuda) == {"PDL": False}
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setitem(configs.TABLE, "programmatic_launch", {"cuda": {"on": 1, "min_sm": 90}})
    assert launch.programmatic_launch(cuda) == {"PDL": False}


def test_aot_builds_follow_the_table():
    from torch_dflash.compiler.triton import aot

    assert aot.programmatic("sm_90") and not aot.programmatic("sm_80")
    assert not aot.programmatic("gfx942") and not aot.programmatic("gfx950")
