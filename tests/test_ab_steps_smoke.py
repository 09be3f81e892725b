"""benchmarks/ab_steps.py on CPU at tiny shapes: variants parse, each builds its own steps under its table, every
step of every variant is timed each round, and the report pairs them with the first (no timing is asserted)."""

import json

import pytest

from torch_dflash.benchmarks import ab_steps
from torch_dflash.compiler.triton import configs


def test_variants_parse_into_table_overrides():
    assert ab_steps.parse_variant("off:programmatic_launch.on=0") == ("off", {"programmatic_launch": {"on": 0}}, ())
    assert ab_steps.parse_variant("shipped:") == ("shipped", {}, ())
    assert ab_steps.parse_variant("x:qkv_gemm.decode.fused=1,skinny_gemm.max_split=4,-kv_cache_writes") == (
        "x", {"qkv_gemm.decode": {"fused": 1}, "skinny_gemm": {"max_split": 4}}, ("kv_cache_writes",))


@pytest.mark.parametrize("text", ["off", ":programmatic_launch.on=0", "x:no_such_row.on=0",
                                  "x:programmatic_launch.no_such_key=1", "x:programmatic_launch.on", "x:-no_pass"])
def test_a_variant_the_table_cannot_take_is_refused(text):
    with pytest.raises(ValueError):
        ab_steps.parse_variant(text)


def test_overrides_hold_while_building_only():
    shipped = configs.TABLE["programmatic_launch"]["cuda"]["on"]
    with ab_steps.table_with({"programmatic_launch": {"on": 1 - shipped}}, "cuda"):
        assert configs.TABLE["programmatic_launch"]["cuda"]["on"] == 1 - shipped
    assert configs.TABLE["programmatic_launch"]["cuda"]["on"] == shipped


def test_small_run_times_every_step_of_every_variant(tmp_path):
    result = ab_steps.main(["--small", "--variant", "a:", "--variant", "b:programmatic_launch.on=0,-kv_cache_writes",
                            "--steps", "draft,draft_hidden,verify,ar", "--rounds", "2", "--reps", "1",
                            "--out", str(tmp_path)])
    assert result["variants"]["b"] == {"table": {"programmatic_launch": {"on": 0}}, "passes_off": ["kv_cache_writes"]}
    kinds = {"draft", "draft_hidden", "verify", "ar"}
    assert json.loads((tmp_path / "ab_steps.json").read_text())["steps"].keys() == \
        kinds | {f"{kind} (call)" for kind in kinds}
    for kind, rows in result["steps"].items():
        assert rows.keys() == {"a", "b"}
        assert all(len(r["rounds_us"]) == 2 and r["median_us"] > 0 for r in rows.values())
        # on CPU the table changes nothing the reference lowering runs, and the cache writes move, not change: the
        # same outputs
        assert rows["b"]["bitwise_equal"], kind
    with pytest.raises(SystemExit):
        ab_steps.main(["--small", "--variant", "a:"])
