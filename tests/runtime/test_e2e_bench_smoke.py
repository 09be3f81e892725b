"""The e2e benchmark cases (benchmarks/e2e.py) at tiny shapes: every check passes and every variant runs once, so
the suite cannot rot between GPU sessions (no timing is asserted). On CPU the engine's steps are the reference
lowering; with a GPU (`pytest -m gpu`) the same cases run in bf16 through the Triton lowering and CUDA graphs."""

import pytest
from runtime_testing import one_thread

from torch_dflash.benchmarks import e2e

single_thread = pytest.fixture(autouse=True)(one_thread)


def run_each_case_once(device):
    cases = e2e.cases(device, small=True)
    assert [c.name.split(" (")[0] for c in cases] == ["runtime draft step", "runtime verify step", "runtime AR step",
                                                     "spec-decode turn"]
    notes = {}
    for case in cases:
        notes[case.name] = case.check()  # raises AssertionError when a compiled step or zlab_turn is wrong
        assert case.floor_bytes > 0 and all(fn() is not None for fn in case.variants.values())
    turn = notes[cases[-1].name]
    assert "timed turn committed" in turn and "engine stats per turn: draft" in turn
    assert "projection, not a measurement: τ 6.5" in turn
    assert set(cases[-1].variants) == {"dflash", "dflash+inductor", "zlab"}
    assert all(set(c.variants) == {"dflash", "dflash+inductor"} for c in cases[:-1])
    return notes


def test_e2e_cases_run_on_cpu():
    notes = run_each_case_once("cpu")
    assert all("relative distance to eager: dflash: " in n and "; dflash+inductor: " in n
               for name, n in notes.items() if name.startswith("runtime"))


@pytest.mark.gpu
def test_e2e_cases_run_on_cuda():
    notes = run_each_case_once("cuda")
    assert "dflash_generate's own decode time" in notes[next(reversed(notes))]
