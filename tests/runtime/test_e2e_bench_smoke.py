"""The e2e benchmark cases (benchmarks/e2e.py) at tiny shapes: every check passes and every variant runs once, so
the suite cannot rot between GPU sessions (no timing is asserted). On CPU the engine's steps are the reference
lowering and the torch.compile variants run as aot_eager; with a GPU (`pytest -m gpu`) the same cases run in
bf16 through the Triton lowering, Inductor and CUDA graphs. Through the harness, every row has a ratio to the
"inductor" peer (the captured steps under torch.compile alone)."""

import pytest
from runtime_testing import one_thread
from torch._dynamo.utils import counters

from torch_dflash.benchmarks import e2e, harness

single_thread = pytest.fixture(autouse=True)(one_thread)

STEPS = {"dflash", "dflash+inductor", "inductor"}


def run_each_case_once(device):
    rows, compiled = [], []
    counters.clear()
    for case in e2e.cases(device, small=True):  # a generator: each case is built as the harness would get it
        rows += harness.run_case(case, harness.Ceilings(0, 0), device, reps=1, l2=0, clock=harness.Clock(),
                                 log=lambda *args: None)
        compiled.append(counters["stats"]["unique_graphs"])
    # each case compiles its own steps (the two torch.compile variants: draft, draft to hidden states, verify, -,
    # AR), nothing twice
    assert compiled == [2, 4, 6, 6, 8]
    names = list(dict.fromkeys(r.case.split(" (")[0] for r in rows))
    assert names == ["runtime draft step", "runtime draft step to hidden states", "runtime verify step",
                     "spec-decode turn", "runtime AR step"]
    assert all("FAILED" not in r.notes and r.median_us and r.vs_inductor for r in rows)  # checks and first calls
    variants = {name: {r.variant for r in rows if r.case.startswith(name)} for name in names}
    assert variants.pop("spec-decode turn") == STEPS | {"zlab"} and all(v == STEPS for v in variants.values())
    notes = {r.case.split(" (")[0]: r.notes for r in rows}
    for name in names:
        assert "first calls (capture, compile, CUDA graph where still to do): dflash " in notes[name]
    for name in ("runtime draft step", "runtime draft step to hidden states", "runtime verify step",
                 "runtime AR step"):
        assert "relative distance to eager: dflash: " in notes[name] and "; inductor: " in notes[name]
        # timed with the host ahead; the notes carry each variant's synchronous call time beside it
        assert "timed with the host ahead" in notes[name] and "included: dflash " in notes[name]
    assert "timed with the host ahead" not in notes["spec-decode turn"]
    turn = notes["spec-decode turn"]
    assert "timed turn committed" in turn and "engine stats per turn: draft" in turn
    assert "projection, not a measurement: τ 6.5" in turn and "shared set-up" in notes["runtime draft step"]
    return turn


def test_e2e_cases_run_on_cpu():
    run_each_case_once("cpu")


@pytest.mark.gpu
def test_e2e_cases_run_on_cuda():
    assert "dflash_generate's own decode time" in run_each_case_once("cuda")


def test_a_variant_whose_first_call_fails_is_named_and_not_timed():
    def broken():
        raise RuntimeError("no kernel for this")

    calls = {"dflash": lambda: 1, "inductor": broken}  # the case's variants: what the harness will time
    results, note = e2e._first_calls(calls, "cpu")
    assert results == {"dflash": 1} and list(calls) == ["dflash"]
    assert note.endswith("dflash 0.0 s, inductor FAILED (RuntimeError: no kernel for this)")
