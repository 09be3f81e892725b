"""`torch-dflash inspect OUT|FILE.pt2`: what the passes and the lowering did to each graph of an export.

Reads OUT/report.json (FILE.pt2 inside an export: that graph's part); a bare FILE.pt2 is loaded and run
through the pass pipeline and the CPU lowering here to produce the report.
"""

import difflib
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from torch_dflash.errors import InputError
from torch_dflash.manifest import ArtifactError, read_manifest


def _bare_program_report(path: Path) -> dict:
    from torch_dflash.artifact import compile_graph, load_program

    program = load_program(path)
    compiled = compile_graph(program, "cpu", path.stem, reexport=False)
    return {"report": json.loads(compiled.report.to_json(snapshots=True)), "attention": compiled.attention}


def load_reports(path: str | Path) -> dict[str, dict]:
    """graph -> {"report": CompileReport fields, "attention": [...]} for an export dir or a .pt2 file."""
    path = Path(path)
    if path.is_dir():
        read_manifest(path, check_versions=False)      # inspect reads JSON only: any version, but untampered
        return json.loads((path / "report.json").read_text())
    if not path.is_file():
        raise InputError(f"No export directory or .pt2 file at {path}.")
    if path.suffix != ".pt2":
        raise InputError(f"{path} is neither an export directory nor a .pt2 file.")
    try:
        manifest = read_manifest(path.parent, check_versions=False)
    except ArtifactError:
        manifest = None
    if manifest is not None and path.name in manifest["files"]:
        reports = json.loads((path.parent / "report.json").read_text())
        if path.stem in reports:
            return {path.stem: reports[path.stem]}
    return {path.stem: _bare_program_report(path)}


def _matched(facts: dict) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in facts["matched"].items()) or "—"


def summary_tables(reports: dict[str, dict]) -> list[Table]:
    """Per graph: passes (sites, not rewritten, time); then fusions by graph; attention per layer; lowering."""
    tables = []
    for graph, data in reports.items():
        report = data["report"]
        table = Table(title=f"{graph} graph — passes (target {report['target']})")
        for column in ("pass", "sites matched", "not rewritten", "ms"):
            table.add_column(column, justify="right" if column in ("not rewritten", "ms") else "left")
        for name, facts in report["passes"].items():
            rejected = sum(1 for r in report["rejections"] if r[0] == name)
            table.add_row(name, _matched(facts), str(rejected), f"{facts['seconds'] * 1e3:.1f}")
        tables.append(table)
    fusions = Table(title="fusions (sites per graph)")
    fusions.add_column("kind")
    for graph in reports:
        fusions.add_column(graph, justify="right")
    kinds = sorted({k for data in reports.values() for k in data["report"]["fusions"]})
    for kind in kinds:
        fusions.add_row(kind, *(str(data["report"]["fusions"].get(kind, 0)) for data in reports.values()))
    tables.append(fusions)
    attention = Table(title="attention per layer (graph order)")
    for column in ("graph", "layer", "kind", "provider"):
        attention.add_column(column)
    for graph, data in reports.items():
        for layer, site in enumerate(data["attention"]):
            kind = site["kind"] + (f" (window {site['window']})" if site["kind"] == "sliding" else "")
            attention.add_row(graph, str(layer), kind, site["provider"])
    tables.append(attention)
    lowering = Table(title="lowering (provider per dflash op)")
    for column in ("graph", "op", "providers"):
        lowering.add_column(column)
    for graph, data in reports.items():
        for op, chosen in data["report"]["providers"].items():
            lowering.add_row(graph, op, ", ".join(f"{p} ×{chosen.count(p)}" for p in sorted(set(chosen))))
    tables.append(lowering)
    return tables


def why_tables(reports: dict[str, dict]) -> list[Table]:
    """Every candidate a pass did not rewrite, and every provider that declined an op, with the reason."""
    tables = []
    for graph, data in reports.items():
        report = data["report"]
        declines = sum(len(d) for d in report["declined"].values())
        table = Table(title=f"{graph} graph — not rewritten: {len(report['rejections'])} candidates, "
                            f"{declines} provider declines")
        for column in ("pass", "node", "reason"):
            table.add_column(column)
        for pass_name, node, reason in report["rejections"]:
            table.add_row(pass_name, node, reason)
        for op, declined in report["declined"].items():
            for provider, reason in declined:
                table.add_row("lowering", f"{op} → {provider}", reason)
        tables.append(table)
    return tables


def pass_names(reports: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys(name for data in reports.values() for name in data["report"]["passes"]))


def snapshot(data: dict, name: str) -> tuple[str, str] | None:
    pair = data["report"].get("snapshots", {}).get(name)
    return tuple(pair) if pair else None


def unified_diff(before: str, after: str, graph: str, name: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"{graph}: before {name}", f"{graph}: after {name}"))


def run(console: Console, path, *, pass_name=None, diff=False, why=False, html=None, as_json=False) -> None:
    reports = load_reports(path)
    names = pass_names(reports)
    if pass_name is not None and pass_name not in names:
        raise InputError(f"No pass named '{pass_name}' in this report; the passes are {', '.join(names)}.")
    if as_json:
        print(json.dumps(reports, indent=1))
        return
    if html is not None:
        from torch_dflash.html_report import render

        Path(html).write_text(render(reports, title=f"torch-dflash inspect {path}"))
        console.print(f"wrote {html}", highlight=False)
    show = [pass_name] if pass_name is not None else names
    if diff:
        for graph, data in reports.items():
            for name in show:
                pair = snapshot(data, name)
                text = unified_diff(*pair, graph, name) if pair else ""
                console.print(text or f"{graph}: {name} changed nothing", markup=False, highlight=False, soft_wrap=True)
    elif pass_name is not None:
        for graph, data in reports.items():
            pair = snapshot(data, pass_name) or ("(not recorded)", "(not recorded)")
            for label, code in zip(("before", "after"), pair):
                console.rule(f"{graph}: {label} {pass_name}")
                console.print(code, markup=False, highlight=False, soft_wrap=True)
    if why:
        for table in why_tables(reports):
            console.print(table)
    if not (diff or why or pass_name or html):
        for table in summary_tables(reports):
            console.print(table)
