"""torch-dflash inspect: the tables hold the passes and counts of report.json; --pass, --diff, --why, --json and
--html show the snapshots and rejections; a bare .pt2 is run through the pipeline."""

import json
import re
import shutil
from html.parser import HTMLParser

from cli_testing import run_cli

from torch_dflash.passes.pipeline import PASS_NAMES, skipped_before_export


def _report(export_dir):
    return json.loads((export_dir / "report.json").read_text())


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_summary_tables_hold_every_pass_and_the_counts_of_the_report(export_dir):
    out, report = _ok(run_cli("inspect", export_dir)), _report(export_dir)
    for graph, data in report.items():
        assert f"{graph} graph — passes (target ascend)" in out
        for name, facts in data["report"]["passes"].items():
            row = re.search(rf"│ {name}\s+│(.*)│\s+(\d+) │\s+[\d.]+ │", out)
            assert row, name
            assert all(f"{kind} {n}" in out for kind, n in facts["matched"].items())
    kinds = sorted({k for data in report.values() for k in data["report"]["fusions"]})
    assert "qkv_norm_rope" in kinds
    for kind in kinds:
        counts = re.search(rf"│ {re.escape(kind)}\s+│\s+(\d+) │\s+(\d+) │", out).groups()
        assert [int(c) for c in counts] == [report[g]["report"]["fusions"].get(kind, 0) for g in ("draft", "verify")]
    layers = re.findall(r"│ (draft|verify)\s+│ (\d+)\s+│ ([a-z_]+)", out)
    assert [(g, int(i), k) for g, i, k in layers] == [
        (g, i, site["kind"]) for g in ("draft", "verify") for i, site in enumerate(report[g]["attention"])]


def test_json_is_the_report(export_dir):
    assert json.loads(_ok(run_cli("inspect", export_dir, "--json"))) == _report(export_dir)


def test_pass_prints_that_pass_graph_before_and_after(export_dir):
    out, snapshots = _ok(run_cli("inspect", export_dir, "--pass", "qkv_norm_rope")), \
        _report(export_dir)["verify"]["report"]["snapshots"]["qkv_norm_rope"]
    before, after = out.index("verify: before qkv_norm_rope"), out.index("verify: after qkv_norm_rope")
    assert snapshots[0].strip() in out[before:after] and snapshots[1].strip() in out[after:]
    assert "q_proj" in snapshots[0] and "torch.ops.dflash.qkv_norm_rope" in snapshots[1]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.external, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and not (v or "").startswith("#")]

    def handle_data(self, data):
        self.text.append(data)


def test_diff_why_and_a_self_contained_html_page(export_dir, tmp_path):
    page = tmp_path / "report.html"
    out, report = _ok(run_cli("inspect", export_dir, "--diff", "--why", "--html", page)), _report(export_dir)
    assert f"wrote {page}" in out
    start = out.index("--- verify: before qkv_norm_rope")
    diff = out[start:out.index("--- verify: before", start + 1)]
    added = [line for line in diff.splitlines() if line.startswith("+") and "qkv_norm_rope.default" in line]
    removed = [line for line in diff.splitlines() if line.startswith("-") and "q_proj" in line]
    assert len(added) == report["verify"]["report"]["fusions"]["qkv_norm_rope"] and removed
    declines = [(op, provider, reason) for data in report.values()
                for op, declined in data["report"]["declined"].items() for provider, reason in declined]
    assert ("attention", "npu", "torch_npu is not installed") in declines     # the Ascend provider, here
    for graph, data in report.items():
        n_declines = sum(len(d) for d in data["report"]["declined"].values())
        assert (f"{graph} graph — not rewritten: {len(data['report']['rejections'])} candidates, "
                f"{n_declines} provider declines") in out
        for pass_name, node, _ in data["report"]["rejections"]:
            assert re.search(rf"│ {pass_name}\s+│ {re.escape(node)}", out), node
        for op, declined in data["report"]["declined"].items():
            for provider, reason in declined:
                assert re.search(rf"│ lowering\s+│ {op} → {provider}\s+│ {reason}", out), (op, provider)
    parser = _Page()
    parser.feed(page.read_text())
    parser.close()
    text = "".join(parser.text)
    assert not parser.external and {"style", "table", "details"} <= parser.tags
    exported = [name for name in PASS_NAMES if name not in skipped_before_export()]
    assert all(name in text for name in exported)
    assert all(f"verify: {name}" in text and f"draft: {name}" in text for name in exported)
    assert all(reason in text for data in report.values() for _, _, reason in data["report"]["rejections"])
    assert all(f"{op} → {provider}" in text and reason in text for op, provider, reason in declines)


def test_a_bare_pt2_is_run_through_the_pipeline(export_dir, tmp_path):
    """draft.pt2 alone (no report next to it): the pipeline runs on it; it was rewritten already, so the
    fusions found in the export are now single dflash ops that stay as they are — but kv_cache_writes and
    context_qkv, which an export skips (pipeline.IN_PLACE_ONLY) and the runtime runs, now move each layer's cache
    writes into them and join each layer's context and block projections into one op."""
    bare = tmp_path / "step.pt2"
    shutil.copyfile(export_dir / "draft.pt2", bare)
    out = _ok(run_cli("inspect", bare, "--json"))
    report = json.loads(out)["step"]
    assert list(report["report"]["passes"]) == list(PASS_NAMES)
    assert [s["kind"] for s in report["attention"]] == [s["kind"] for s in _report(export_dir)["draft"]["attention"]]
    exported = dict(_report(export_dir)["draft"]["report"]["providers"])
    providers, layers = dict(report["report"]["providers"]), len(exported["kv_materialize"])
    assert providers.pop("context_qkv_norm_rope_cache") == exported.pop("qkv_norm_rope")
    assert len(exported.pop("kv_materialize")) == layers and providers == exported
    assert report["report"]["fusions"]["kv_cache_writes"] == report["report"]["fusions"]["context_qkv"] == layers


def test_a_reader_that_goes_away_is_not_an_error(export_dir):
    """`torch-dflash inspect OUT | head -1`: the pipe closes before the output is written; the command exits 1 (as
    rich and Python's own advice do on EPIPE) and prints nothing about it — no 'internal error', no exit 2."""
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "torch_dflash.cli", "inspect", str(export_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "240"})
    child.stdout.close()  # before the child, still importing torch, writes a byte
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=600) == 1 and not stderr.strip(), stderr[-2000:]


def test_rejections_render_in_the_why_tables_and_the_html_page(export_dir):
    """The shared export fuses everything (no pass rejections left), so a rejection row is added to its report:
    `--why`'s table and the HTML page both show the pass, the node and the reason."""
    import copy

    from rich.console import Console

    from torch_dflash import html_report, inspect_cmd

    reports = copy.deepcopy(inspect_cmd.load_reports(export_dir))
    row = ["qkv_norm_rope", "linear_7", "the q projection weight is a graph value, not a constant"]
    reports["verify"]["report"]["rejections"].append(row)
    console = Console(record=True, width=240)
    for table in inspect_cmd.why_tables(reports):
        console.print(table)
    text = console.export_text()
    assert "verify graph — not rewritten: 1 candidates" in text
    assert re.search(r"│ qkv_norm_rope\s+│ linear_7\s+│ the q projection weight is a graph value", text), text
    page = html_report.render(reports)
    assert all(part in page for part in row)
