"""MLIR export: the CLI's linalg files parse with torch-mlir's bindings; the functional step torch-mlir imports
computes what the program computes (outputs and cache writes); index_put as a select equals aten.index_put."""

import os

import pytest
import torch
import torch.utils._pytree as pytree

from torch_dflash.compiler.mlir import functional_step, index_put_as_select, to_mlir

ir = pytest.importorskip("torch_mlir.ir")


@pytest.mark.parametrize("graph", ["draft", "verify"])
def test_linalg_files_parse_back(export_dir, graph):
    context = ir.Context()
    module = ir.Module.parse((export_dir / f"{graph}.linalg.mlir").read_text(), context)
    functions = [op for op in module.body.operations if op.operation.name == "func.func"]
    assert [str(f.attributes["sym_name"]) for f in functions] == [f'"{graph}"']
    text = str(module)
    assert "linalg.generic" in text and "torch.aten" not in text and "!torch" not in text and "tm_tensor" not in text
    n_caches = {"draft": 4, "verify": 8}[graph]          # k and v per layer: the caches stay arguments
    assert text.count("tensor<2x2x48x16xf32>") >= 2 * n_caches


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TORCH_DFLASH_SLOW"), reason="opt in with TORCH_DFLASH_SLOW=1 (~1 min)")
@pytest.mark.parametrize("dialect", ["stablehlo", "tosa"])
def test_stablehlo_and_tosa_parse_back(export_dir, dialect):
    from torch_mlir._mlir_libs import _stablehlo

    text = to_mlir(torch.export.load(export_dir / "draft.pt2"), dialect, "draft")
    context = ir.Context()
    _stablehlo.register_dialect(context)
    module = ir.Module.parse(text, context)
    assert f"{dialect}." in str(module) and "!torch" not in str(module)
    if dialect == "tosa":           # static: the example shapes (batch 2, context 3)
        assert "tensor<2x3x128xf32>" in text


def test_functional_step_equals_the_program(export_dir):
    """At the program's example shapes (batch 2, context 3): draft logits and every cache written."""
    program = torch.export.load(export_dir / "draft.pt2")
    step = functional_step(program)
    args, _ = program.example_inputs
    args = tuple(torch.randn_like(a) if a.is_floating_point() else a for a in args)
    module = program.module()
    buffers = dict(module.named_buffers())
    caches = [torch.randn_like(buffers[name]) for name in step.caches]
    for name, cache in zip(step.caches, caches):
        buffers[name].copy_(cache)
    got = torch.fx.Interpreter(step.module).run(*caches, *args)
    want = pytree.tree_leaves(module(*args))
    assert len(step.caches) == 4 and len(got) == len(step.caches) + len(want)
    for name, new, old in zip(step.caches, got, caches):
        assert not torch.equal(new, old)
        torch.testing.assert_close(new, buffers[name], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[len(step.caches):], want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


CASES = {
    "cache write (rows, :, positions)": ((2, 3, 8, 4), lambda: [torch.arange(2)[:, None], None,
                                                                torch.tensor([[1, 3], [2, 5]])], (2, 2, 3, 4)),
    "one dim, negative index": ((2, 3, 8, 4), lambda: [None, None, torch.tensor([1, -1])], (2, 3, 2, 4)),
    "two adjacent dims, broadcast": ((5, 6, 7), lambda: [None, torch.tensor([[0, 4], [1, 3]]),
                                                         torch.tensor([1, 2])], (5, 2, 2)),
    "leading dim, value broadcast": ((5, 6, 7), lambda: [torch.tensor([0, 3])], (7,)),
    "non-adjacent, no trailing": ((4, 6, 7), lambda: [torch.tensor([0, 3]), None, torch.tensor([1, 6])], (2, 6)),
}


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_index_put_as_select_equals_index_put(case, accumulate):
    shape, indices, value_shape = CASES[case]
    x, idx, values = torch.randn(shape), indices(), torch.randn(value_shape)
    torch.testing.assert_close(index_put_as_select(x, idx, values, accumulate),
                               torch.ops.aten.index_put(x, idx, values, accumulate), rtol=0, atol=1e-6)


def test_index_put_as_select_takes_the_sum_of_duplicates_when_accumulating():
    x, idx, values = torch.zeros(4, 2), [torch.tensor([1, 1, 3])], torch.ones(3, 2)
    assert index_put_as_select(x, idx, values, True).tolist() == [[0, 0], [2, 2], [0, 0], [1, 1]]
