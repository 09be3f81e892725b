"""Helpers for pass tests (imported as `pass_testing`: pytest puts this package-less folder on the path).

`check_pass` is the shape of vLLM's tests/compile/backend.py: export, keep the graph before, run the passes,
assert the match counts, and assert the rewritten graph computes what the eager module computes on the
export-time arguments AND on a second set of a different shape (dynamic dims).
"""

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from torch_dflash.passes.manager import PassManager, PipelineReport


def export_graph(module: torch.nn.Module, args, dynamic_shapes=None) -> fx.GraphModule:
    """`torch.export` (non-strict) → the ATen graph module. `args` is a tuple of positionals or a dict of kwargs."""
    positional, kwargs = ((), args) if isinstance(args, dict) else (tuple(args), None)
    ep = torch.export.export(module, positional, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.module()


def call(fn, args):
    return fn(**args) if isinstance(args, dict) else fn(*args)


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many call_function nodes of each target the graph has (targets as printed, e.g. 'aten.linear.default')."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def op_diff(before: fx.GraphModule, after: fx.GraphModule) -> tuple[Counter, Counter]:
    """(ops that disappeared, ops that appeared) between two graphs, with multiplicities."""
    a, b = op_counts(before), op_counts(after)
    return a - b, b - a


def assert_same_outputs(expected, actual, atol=1e-5, rtol=1e-5) -> None:
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    assert len(want) == len(got) > 0, f"{len(want)} reference outputs vs {len(got)} from the graph"
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def run_passes(gm: fx.GraphModule, passes) -> PipelineReport:
    return PassManager(passes).run(gm)


def check_pass(module, args, second_args, passes, expected: dict[str, int], dynamic_shapes=None):
    """Export `module` on `args`, run `passes`, assert `report.fusions()[kind] == n` for every kind in
    `expected`, and assert the rewritten graph matches eager `module` on `args` and on `second_args`
    (fp32: atol = rtol = 1e-5). Returns (gm_before, gm_after, report)."""
    module = module.eval()
    gm = export_graph(module, args, dynamic_shapes)
    before = copy.deepcopy(gm)
    report = run_passes(gm, passes)
    fusions = report.fusions()
    got = {kind: fusions.get(kind, 0) for kind in expected}
    reasons = [r.reason for r in report.rejections()]
    assert got == expected, f"fusions {got} != expected {expected}; rejections: {reasons}"
    with torch.no_grad():
        for inputs in (args, second_args):
            assert_same_outputs(call(module, inputs), call(gm, inputs))
    return before, gm, report
