"""`python -m torch_dflash.benchmarks.sweep_attention --smoke` on CPU (TRITON_INTERPRET=1, tests/conftest.py): tiny
shapes, the shipped decode row and one other, each checked against the reference before it is timed; JSON and
markdown written, the TABLE row restored. No timing is asserted."""

import json

import pytest

from torch_dflash.benchmarks import sweep_attention
from torch_dflash.compiler.triton import attention_decode
from torch_dflash.compiler.triton.configs import TABLE

ROW = "attention_decode_hd64"


@pytest.fixture
def eight_sms(monkeypatch):
    """A device of 8 SMs (the interpreter has 1): 2 kv heads get up to 4 kv splits, so the reduce runs too."""
    monkeypatch.setattr(attention_decode, "multiprocessor_count", lambda device: 8)


def _sweep(tmp_path, capsys):
    before = {fam: dict(row) for fam, row in TABLE[ROW].items()}
    result = sweep_attention.main(["--smoke", "--out", str(tmp_path)])
    assert {fam: dict(row) for fam, row in TABLE[ROW].items()} == before
    table = (tmp_path / "sweep_attention.md").read_text().rstrip("\n")
    assert capsys.readouterr().out.rstrip("\n").endswith(table)
    assert json.loads((tmp_path / "sweep_attention.json").read_text())["rows"] == result["rows"]
    return result, table


def test_smoke_checks_and_times_two_rows_and_picks_a_winner(tmp_path, capsys, eight_sms):
    result, table = _sweep(tmp_path, capsys)
    assert [row["cfg"]["min_keys_per_split"] for row in result["rows"]] == [128, 16]
    cases = [case for row in result["rows"] for case in row["cases"].values()]
    assert all(case["ok"] and case["us"] > 0 for case in cases), cases
    assert max(case["splits"] for case in cases) > 1          # split-KV + reduce ran, not only one split
    assert result["winner"] in [row["cfg"] for row in result["rows"]]
    assert set(result["confirmed_us"]) == {"shipped", "winner"}
    assert ("suggested row" in table or "keep the shipped row" in table) and "| draft_long |" in table


def test_a_failing_launch_is_reported_and_nothing_is_suggested(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(attention_decode, "attention_decode", broken)
    result, table = _sweep(tmp_path, capsys)
    cases = [case for row in result["rows"] for case in row["cases"].values()]
    assert cases and all(not case["ok"] and "out of resources" in case["error"] for case in cases)
    assert result["winner"] is None and result["confirmed_us"] == {}
    assert "no row qualified" in table
