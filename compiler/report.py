"""CompileReport: what one compilation did — fusions by kind, rejections with reasons, per-pass time, the
target and the provider chosen per op. `last_report()` returns the newest one (design.md §2)."""

import json
import logging
from dataclasses import asdict, dataclass, field

log = logging.getLogger("torch_dflash")


@dataclass
class CompileReport:
    target: str
    fusions: dict[str, int] = field(default_factory=dict)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)       # (pass, node, reason)
    passes: dict[str, dict] = field(default_factory=dict)                      # name -> {seconds, matched}
    providers: dict[str, list[str]] = field(default_factory=dict)              # op -> provider per site
    declined: dict[str, list[tuple[str, str]]] = field(default_factory=dict)   # op -> (provider, reason)
    graph: str = ""                                                            # which graph: "draft", "aot#0"...
    snapshots: dict[str, tuple[str, str]] = field(default_factory=dict)        # pass -> (before, after) code
    cache: str = "off"                 # compile cache: hit | miss | rebuilt (damaged entry replaced) | skipped | off
    cache_key: str = ""                # the first 16 hex digits of the cache key

    @classmethod
    def build(cls, target: str, pipeline, choices: dict, graph: str = "") -> "CompileReport":
        report = cls(target=target, graph=graph, fusions=pipeline.fusions(),
                     rejections=[(r.pass_name, r.node, r.reason) for r in pipeline.rejections()])
        for result in pipeline.results:
            report.passes[result.name] = {"seconds": result.seconds, "matched": dict(result.matched)}
            if result.before is not None:
                report.snapshots[result.name] = (result.before, result.after)
        for op, op_choices in choices.items():
            report.providers[op] = [c.provider for c in op_choices]
            declined = {d for c in op_choices for d in c.declined}
            if declined:
                report.declined[op] = sorted(declined)
        return report

    def to_json(self, snapshots: bool = False) -> str:
        data = asdict(self)
        if not snapshots:
            data.pop("snapshots")
        return json.dumps(data, indent=1)

    def log(self) -> None:
        for name, facts in self.passes.items():
            matched = ", ".join(f"{k} {v}" for k, v in facts["matched"].items()) or "nothing"
            log.info("%s pass %s: %s (%.1f ms)", self.graph or "graph", name, matched, facts["seconds"] * 1e3)
        log.info("%s lowered for %s: %s", self.graph or "graph", self.target,
                 ", ".join(f"{op} -> {'/'.join(sorted(set(p)))}" for op, p in self.providers.items()) or "no dflash ops")


_LAST: list[CompileReport] = []


def record(report: CompileReport) -> None:
    _LAST[:] = [report]
    report.log()
    try:
        from torch._logging import trace_structured

        trace_structured("artifact", metadata_fn=lambda: {"name": "torch_dflash_report", "encoding": "json"},
                         payload_fn=report.to_json)
    except ImportError:  # older torch without structured tracing: the logger line above is enough
        pass


def last_report() -> CompileReport | None:
    """The CompileReport of the newest compilation in this process (None before the first)."""
    return _LAST[0] if _LAST else None
