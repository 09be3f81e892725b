"""`inspect --html`: ONE self-contained HTML page (inline CSS, no scripts, no external assets) with the report of
each graph, each pass's graph before and after side by side (difflib.HtmlDiff: the changed regions with
CONTEXT_LINES of context; `inspect --pass NAME` prints the whole graphs), and every candidate not rewritten."""

import difflib
from html import escape

from torch_dflash.inspect_cmd import pass_names, snapshot

CONTEXT_LINES = 10
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.2em; }
table.report { border-collapse: collapse; margin: .6em 0; }
table.report th, table.report td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }
table.report th { background: #f2f2f2; }
table.diff { font-family: monospace; font-size: 12px; border-collapse: collapse; width: 100%; }
table.diff td { white-space: pre-wrap; word-break: break-all; vertical-align: top; }
.diff_header { background: #eee; color: #666; text-align: right; }
.diff_next { display: none; }
.diff_add { background: #cfc; } .diff_chg { background: #ffa; } .diff_sub { background: #fcc; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _table(headers, rows) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="report"><tr>{head}</tr>{body}</table>'


def _graph_section(graph: str, data: dict, names: list[str]) -> str:
    report = data["report"]
    parts = [f'<h2 id="{escape(graph)}">{escape(graph)} graph — target {escape(report["target"])}</h2>',
             "<h3>Passes</h3>",
             _table(("pass", "sites matched", "not rewritten", "ms"), [
                 (name, ", ".join(f"{k} {n}" for k, n in facts["matched"].items()) or "—",
                  sum(1 for r in report["rejections"] if r[0] == name), f"{facts['seconds'] * 1e3:.1f}")
                 for name, facts in report["passes"].items()]),
             "<h3>Fusions</h3>", _table(("kind", "sites"), sorted(report["fusions"].items())),
             "<h3>Attention per layer (graph order)</h3>",
             _table(("layer", "kind", "window", "provider"),
                    [(i, s["kind"], s["window"], s["provider"]) for i, s in enumerate(data["attention"])]),
             "<h3>Lowering</h3>",
             _table(("op", "provider per site"), [(op, ", ".join(p)) for op, p in report["providers"].items()]),
             "<h3>Candidates not rewritten (why)</h3>",
             _table(("pass", "node", "reason"), [*report["rejections"], *(
                 ("lowering", f"{op} → {provider}", reason)
                 for op, declined in report["declined"].items() for provider, reason in declined)]),
             "<h3>Graph before and after each pass</h3>"]
    for name in names:
        pair = snapshot(data, name)
        if pair is None:
            body = "<p>not recorded</p>"
        elif pair[0] == pair[1]:
            body = "<p>the graph is unchanged</p>"
        else:
            body = difflib.HtmlDiff(wrapcolumn=100).make_table(
                pair[0].splitlines(), pair[1].splitlines(), f"before {name}", f"after {name}",
                context=True, numlines=CONTEXT_LINES)
        parts.append(f"<details><summary>{escape(graph)}: {escape(name)}</summary>{body}</details>")
    return "\n".join(parts)


def render(reports: dict[str, dict], title: str = "torch-dflash inspect") -> str:
    names = pass_names(reports)
    sections = "\n".join(_graph_section(graph, data, names) for graph, data in reports.items())
    index = " · ".join(f'<a href="#{escape(g)}">{escape(g)}</a>' for g in reports)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{escape(title)}</h1><p>graphs: {index}</p>\n{sections}\n"
            "</body></html>\n")
