"""The pass manager: runs an ordered pipeline of FX passes over an ATen graph and records what happened.

Per pass it keeps: sites matched (by fusion kind), wall time, every candidate that was NOT rewritten with the
reason (a sentence a user can act on), and — when asked — the graph's code before and after, for inspect.
After each pass the graph is linted, so a pass that breaks the graph fails at its own name.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch.fx as fx


@dataclass(frozen=True)
class Rejection:
    pass_name: str
    node: str
    reason: str


@dataclass
class PassResult:
    name: str
    matched: dict[str, int] = field(default_factory=dict)      # fusion kind -> sites rewritten
    rejections: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    before: str | None = None
    after: str | None = None

    @property
    def matched_count(self) -> int:
        return sum(self.matched.values())


class PassContext:
    """Handed to a pass: where it records matches and rejections."""

    def __init__(self, result: PassResult):
        self._result = result

    def matched(self, kind: str, n: int = 1) -> None:
        self._result.matched[kind] = self._result.matched.get(kind, 0) + n

    def reject(self, node: fx.Node | str, reason: str) -> None:
        name = node.name if isinstance(node, fx.Node) else str(node)
        self._result.rejections.append(Rejection(self._result.name, name, reason))


@dataclass(frozen=True)
class GraphPass:
    """A named graph rewrite: `run(gm, ctx)` mutates gm.graph in place and records into ctx."""

    name: str
    run: Callable[[fx.GraphModule, PassContext], None]


@dataclass
class PipelineReport:
    results: list[PassResult]

    def fusions(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for result in self.results:
            for kind, n in result.matched.items():
                totals[kind] = totals.get(kind, 0) + n
        return totals

    def rejections(self) -> list[Rejection]:
        return [r for result in self.results for r in result.rejections]

    def result(self, name: str) -> PassResult:
        return next(r for r in self.results if r.name == name)


class PassManager:
    def __init__(self, passes: Iterable[GraphPass], *, keep_snapshots: bool = False, disabled: Iterable[str] = ()):
        self.disabled = set(disabled)
        self.passes = [p for p in passes if p.name not in self.disabled]
        self.keep_snapshots = keep_snapshots

    def run(self, gm: fx.GraphModule) -> PipelineReport:
        results = []
        for graph_pass in self.passes:
            result = PassResult(graph_pass.name)
            if self.keep_snapshots:
                result.before = gm.code
            start = time.perf_counter()
            graph_pass.run(gm, PassContext(result))
            gm.graph.lint()
            gm.recompile()
            result.seconds = time.perf_counter() - start
            if self.keep_snapshots:
                result.after = gm.code
            results.append(result)
        return PipelineReport(results)
