"""MLIR export through torch-mlir: an exported DFLASH step → linalg-on-tensors, StableHLO or TOSA text.

torch-mlir knows ATen only, so first every dflash op (and every `dflash_<provider>` op the lowering chose) is
decomposed into the ATen its reference implementation traces to, together with torch-mlir's own decomposition
table. Two more adaptations keep the step importable:
- KV-cache writes. The models write `cache[rows, :, positions] = kv`, an index_put whose index tensors are not
  adjacent, which none of the three backends lowers; torch-mlir lowers the simpler forms (and scatter) to its
  own tm_tensor dialect, which upstream MLIR tools cannot parse. So every index_put becomes a one-hot select
  over the indexed slots: slot == index → gather the update, else keep — plain linalg / tosa / stablehlo.
- Shapes. linalg and stablehlo keep the dynamic dims (batch, context); TOSA has none, so for it the step is
  specialized to the shapes of the program's example inputs first.
- State. Parameters and constants are frozen into the module as literals (torch-mlir's usual "frozen program");
  the KV caches the step mutates stay function arguments, and their new values are the first results —
  the functional form of the step: `func(caches..., inputs...) -> (new caches..., outputs...)`.
"""

import math
import warnings
from typing import NamedTuple

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from torch_dflash.errors import InputError

from .ops import REFERENCES

DIALECTS = {"linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}


class MlirExportError(InputError):
    """A program cannot be expressed in the requested MLIR dialect."""


def dflash_decompositions(program: ExportedProgram) -> dict:
    """{op overload: reference} for every dflash-family op (dflash::*, dflash_<provider>::*) in `program`."""
    table = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and target.namespace.startswith("dflash") and target._opname in REFERENCES:
            table[target] = REFERENCES[target._opname]
    return table


def index_put_as_select(x, indices, values, accumulate=False):
    """aten.index_put(x, indices, values) as a one-hot select over the indexed dims, flattened to one axis.

    values are laid out like x[indices]: the broadcast index shape replaces the indexed dims in place when those
    are adjacent, else it comes first; they are brought to [index shape..., other dims...] to match x with the
    indexed dims moved to the front. Slot n takes the update of the first index equal to n (index_put leaves
    the choice among duplicates unspecified); with accumulate, the sum of all of them.
    """
    dims = [d for d, index in enumerate(indices) if index is not None]
    if any(indices[d].dtype == torch.bool for d in dims):
        raise MlirExportError("The program assigns through a boolean mask, which has no MLIR form with a static "
                              "number of updates.")
    rest = [d for d in range(x.dim()) if d not in dims]
    index_shape = torch.broadcast_shapes(*(indices[d].shape for d in dims))
    k, first = len(index_shape), dims[0]
    if dims == list(range(first, first + len(dims))):
        shape = [*x.shape[:first], *index_shape, *x.shape[first + len(dims):]]
        values = values.expand(shape).permute(*range(first, first + k), *range(first), *range(first + k, len(shape)))
    else:
        values = values.expand(*index_shape, *(x.shape[d] for d in rest))
    linear = 0
    for d in dims:
        index = indices[d]
        linear = linear * x.shape[d] + torch.where(index < 0, index + x.shape[d], index)
    moved = x.permute(*dims, *rest)
    slots = math.prod(x.shape[d] for d in dims)
    flat = moved.reshape(slots, -1)
    updates = values.reshape(-1, flat.shape[1]).to(x.dtype)
    match = torch.arange(slots, device=x.device)[:, None] == torch.as_tensor(linear).expand(index_shape).reshape(1, -1)
    if accumulate:
        out = flat + match.to(x.dtype) @ updates
    else:
        chosen = updates.index_select(0, match.to(torch.int64).argmax(dim=1))
        out = torch.where(match.any(dim=1, keepdim=True), chosen, flat)
    order = [*dims, *rest]
    return out.reshape(moved.shape).permute(*sorted(range(x.dim()), key=order.__getitem__))


class FunctionalStep(NamedTuple):
    module: torch.fx.GraphModule     # (caches..., user inputs...) -> (new caches..., user outputs...)
    caches: list[str]                # the names of the mutated buffers, in argument order


def functional_step(program: ExportedProgram) -> FunctionalStep:
    """The step as the pure function torch-mlir imports: dflash ops decomposed to their references, index_put as
    a select, parameters / constants / unmutated buffers frozen in as tensors, mutated buffers as arguments."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = {**get_decomposition_table(), **dflash_decompositions(program),
             torch.ops.aten.index_put.default: index_put_as_select}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)    # torch's pytree deprecation, not ours
        program = program.run_decompositions(table)
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    state = {**program.state_dict, **program.constants}
    graph = program.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    caches = []
    for spec, node in zip(signature.input_specs, placeholders):
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.target in mutated:
            caches.append(spec.target)
            continue
        node.replace_all_uses_with(state[spec.target])
        graph.erase_node(node)
    return FunctionalStep(torch.fx.GraphModule(program.graph_module, graph), caches)


def _specialized(program: ExportedProgram) -> ExportedProgram:
    """The program re-exported with static shapes: those of its example inputs (TOSA has no dynamic dims)."""
    if program.example_inputs is None:
        raise MlirExportError("TOSA needs static shapes, but this program was saved without example inputs.")
    args, kwargs = program.example_inputs
    with torch.no_grad():
        return torch.export.export(program.module(), args, kwargs, strict=False)


def to_mlir(program: ExportedProgram, dialect: str, name: str = "main") -> str:
    """The MLIR text of `program` in `dialect` (linalg | stablehlo | tosa); the function is called `name`."""
    if dialect not in DIALECTS:
        raise InputError(f"Unknown MLIR dialect '{dialect}'; choose one of {', '.join(DIALECTS)}.")
    try:
        from torch_mlir import fx
    except ImportError:
        raise InputError("MLIR export needs torch-mlir: pip install 'torch-dflash[mlir]'.") from None
    if dialect == "tosa":
        program = _specialized(program)
    module = functional_step(program).module
    try:
        return str(fx.stateless_fx_import(module, output_type=DIALECTS[dialect], model_name=name))
    except Exception as error:  # noqa: BLE001 — torch-mlir raises its own compiler errors with long reports
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        first = next((line for line in lines if "error:" in line), lines[0])
        raise MlirExportError(f"torch-mlir could not lower the {name} step to {dialect}: {first}") from error
