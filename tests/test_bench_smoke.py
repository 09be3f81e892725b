"""`torch-dflash bench --smoke` on CPU: the harness builds, checks and runs cases and writes its JSON and markdown,
so it cannot rot between GPU sessions (no timing is asserted); input rotation on a toy case."""

import json
import os

import pytest
import torch

from torch_dflash.benchmarks import harness, run
from torch_dflash.benchmarks.case import Case, Rotation

MB = 2**20


def _quiet(*args):
    pass


def _bench(tmp_path, suite, **kwargs):
    table = run.main(suite, out=str(tmp_path), smoke=True, log=_quiet, **kwargs)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert table == (tmp_path / "bench.md").read_text().rstrip("\n")
    return table, data


def _variants_by_case(data):
    """{case: its variants}; every row timed and checked, and every row of a case with an inductor variant has
    its ratio to it."""
    found = {}
    for row in data["rows"]:
        found.setdefault(row["case"], set()).add(row["variant"])
        assert row["median_us"] is not None and "FAILED" not in row["notes"], row  # a check, a first call
    with_inductor = {case for case, variants in found.items() if "inductor" in variants}
    assert all(row["vs_inductor"] for row in data["rows"] if row["case"] in with_inductor)
    return found


def test_rotation_times_each_call_on_the_next_input_set_and_checks_set_zero():
    made = []

    def make():
        made.append(torch.randn(256))           # 1 KiB per set
        return (made[-1],)

    rotation = Rotation(make)
    seen, checked = [], []
    case = Case("kernels", "toy", {"only": lambda: seen.append(rotation.current[0])},
                lambda: checked.append(rotation.current[0]), floor_bytes=512, rotation=rotation)
    rows = harness.run_case(case, harness.Ceilings(0, 0), "cpu", reps=10, l2=2048, clock=harness.Clock(), log=_quiet)
    # a call reads 512 B (its floor, less than the set): 2 × L2 / 512 B = 8 sets, then round and round
    assert len(made) == 8 and checked == [made[0]]
    assert [id(t) for t in seen] == [id(made[i % 8]) for i in range(10)]
    assert rotation.sets == [(made[0],)] and rotation.current[0] is made[0]   # extra sets dropped after timing
    assert rows[0].notes.startswith("inputs rotate over 8 sets")


def test_rotation_count_reaches_twice_l2_within_the_cap():
    assert harness.rotation_count(set_bytes=101 * MB, call_bytes=51 * MB, l2=50 * MB) == 2
    assert harness.rotation_count(set_bytes=168 * MB, call_bytes=218 * MB, l2=50 * MB) == 1   # one set > 2 × L2
    assert harness.rotation_count(set_bytes=400 * MB, call_bytes=MB, l2=50 * MB) == 2         # 1 GiB cap
    assert harness.rotation_count(set_bytes=2048 * MB, call_bytes=MB, l2=50 * MB) == 1


def test_all_runs_every_suite_in_order_and_names_what_did_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ALL", (("kernels", "kernels_attention"), ("e2e", "not_written_yet")))
    table, data = _bench(tmp_path, "all")
    cases = _variants_by_case(data)
    assert cases and all(variants == {"sdpa", "inductor", "dflash"} for variants in cases.values())
    assert all("inputs rotate over" in row["notes"] for row in data["rows"] if row["variant"] == "sdpa")
    assert data["run"]["not_run"] == ["not_written_yet (benchmarks/not_written_yet.py does not exist yet)"]
    assert "Not run: not_written_yet" in table and "| dflash |" in table
    laps = [lap["what"] for lap in data["run"]["times"]]
    assert laps[0] == "ceilings" and sum(": timing" in lap for lap in laps) == len(cases)


def test_a_spent_budget_starts_nothing_and_says_so(tmp_path):
    _, data = _bench(tmp_path, "kernels", only=("kernels_attention",), budget_s=1e-9)
    assert data["rows"] == [] and data["run"]["not_run"] == ["kernels_attention (the 0 s budget was spent)"]


def test_a_follow_up_case_runs_after_the_budget_and_a_new_case_does_not(tmp_path, monkeypatch):
    """The CUDA-graph row of a compiled step replays what its plain row compiled: a spent budget keeps it (the
    21:35 UTC H100 run lost the transformers verify graph row that way), and stops the next new case."""
    import sys
    import types

    def cases(device, small=False):
        def case(name, follow_up):
            return Case("kernels", name, {"dflash": lambda: torch.ones(2).sum()}, lambda: None, floor_bytes=8,
                        follow_up=follow_up)
        return [case("graph row", True), case("next step", False)]

    monkeypatch.setitem(sys.modules, "torch_dflash.benchmarks.fake_steps", types.SimpleNamespace(cases=cases))
    monkeypatch.setattr(run, "SUITES", {"kernels": ("fake_steps",)})
    monkeypatch.setattr(run, "_why_not_run", lambda entry, budget_s, elapsed: None)  # the entry itself starts
    _, data = _bench(tmp_path, "kernels", budget_s=1e-9)
    assert [row["case"] for row in data["rows"]] == ["graph row"]
    assert data["run"]["not_run"] == ["fake_steps (from next step on: the 0 s budget was spent)"]


def test_backend_step_cases_on_zlab_and_transformers_models(tmp_path):
    """z-lab's draft (DynamicCache) and transformers' Qwen3 verify step (StaticCache) under eager / inductor /
    dflash, without and with graphs, each equal to its eager model and to ours on the same weights."""
    _, data = _bench(tmp_path, "steps", only=("steps_backend.draft_cases", "steps_backend.verify_cases"))
    cases = _variants_by_case(data)
    assert len(cases) == 4 and all(variants == {"eager", "inductor", "dflash"} for variants in cases.values())
    assert all(", ours " in row["notes"] for row in data["rows"] if row["variant"] == "eager")
    assert data["run"]["not_run"] == []


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TORCH_DFLASH_SLOW"), reason="opt in with TORCH_DFLASH_SLOW=1 (~2 min)")
def test_the_one_call_smoke_runs_every_module(tmp_path):
    _, data = _bench(tmp_path, "all")
    assert data["run"]["not_run"] == []
    assert {row["suite"] for row in data["rows"]} == set(run.SUITES)
    cases = _variants_by_case(data)
    e2e = [variants for case, variants in cases.items() if case.startswith("runtime")]
    assert e2e and all(variants == {"dflash", "inductor"} for variants in e2e)  # core_cases: no dflash+inductor
