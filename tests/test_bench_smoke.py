"""`torch-dflash bench --smoke` on CPU: the harness builds, checks and runs every variant of a suite once and writes
its JSON and markdown, so it cannot rot between GPU sessions (no timing is asserted)."""

import json

from torch_dflash.benchmarks import run


def test_smoke_run_writes_a_table_with_every_variant(tmp_path):
    table = run.main("kernels", out=str(tmp_path), smoke=True, only=("kernels_attention",), log=lambda *a: None)
    data = json.loads((tmp_path / "bench.json").read_text())
    variants = {(row["case"], row["variant"]) for row in data["rows"]}
    cases = {case for case, _ in variants}
    assert cases and all({(c, v) for v in ("sdpa", "inductor", "dflash")} <= variants for c in cases)
    assert all(row["median_us"] is not None and "CHECK FAILED" not in row["notes"] for row in data["rows"])
    assert table == (tmp_path / "bench.md").read_text().rstrip("\n") and "| dflash |" in table
