"""Export a (target, draft) pair to a directory and load it back: `td.export` / `td.load_artifact` (design §2, §8).

    OUT/draft.pt2, verify.pt2   the draft and verify steps (torch.export), after the pass pipeline and the lowering
                                for the target; `import torch_dflash` then stock `torch.export.load` opens them
    OUT/report.json             per graph: the CompileReport (each pass's before/after code included) and the
                                attention op of every layer with its kind and provider
    OUT/kernels/                Triton sources + AOT binaries per --gpu-arch (kernel_export.py); ascend/<graph>.py
    OUT/<graph>.<dialect>.mlir  optional, through torch-mlir (compiler/mlir.py)
    OUT/manifest.json           versions, target, engine shape, model configs, sha256 of every file (manifest.py)

The programs hold the weights and KV caches [max_batch, n_kv, max_seq_len, hd]: batch (1..max_batch) and the
context length (1..block) are dynamic, the block size is static. `Artifact.engine(target, draft)` runs them in
the runtime's loop; the models supply the configuration (checked against the manifest), the programs compute.
"""

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram

from torch_dflash.compiler import lowering
from torch_dflash.compiler.capture import capture_draft, capture_verify
from torch_dflash.compiler.mlir import DIALECTS, to_mlir
from torch_dflash.compiler.report import CompileReport, record
from torch_dflash.errors import InputError
from torch_dflash.kernel_export import check_archs, write_triton_kernels
from torch_dflash.manifest import MANIFEST, ArtifactError, read_manifest, write_manifest
from torch_dflash.runtime import DFlashEngine
from torch_dflash.runtime.checks import check_engine, check_pair
from torch_dflash.runtime.executors import Steps, cache_buffers

GRAPHS = ("draft", "verify")
Step = Callable[[str], ContextManager]


def _no_step(name: str) -> ContextManager:
    return contextlib.nullcontext()


# ---- one graph: passes, lowering, re-export ------------------------------------------------------------------

@dataclass
class CompiledGraph:
    program: ExportedProgram | None      # the rewritten graph exported again (None when not asked for)
    report: CompileReport
    attention: list[dict]                # per attention op, in graph (= layer) order: kind, window, provider
    ascend_source: str | None = None     # the Ascend module, for target "ascend"


def dynamic_shapes_of(program: ExportedProgram) -> tuple[dict, ...]:
    """The dynamic dims of the program's user inputs as torch.export Dims with their ranges (one Dim per
    symbol, so inputs that shared a dim share it again)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims, shapes = {}, []
    for name in program.graph_signature.user_inputs:
        spec = {}
        for i, size in enumerate(placeholders[name].meta["val"].shape):
            if isinstance(size, torch.SymInt) and size.node.expr in program.range_constraints:
                symbol = size.node.expr  # (a SymInt the program specialized, e.g. to 3, has no range: static)
                if symbol not in dims:
                    bounds = program.range_constraints[symbol]
                    dims[symbol] = Dim(f"d{len(dims)}", min=int(bounds.lower), max=int(bounds.upper))
                spec[i] = dims[symbol]
        shapes.append(spec)
    return tuple(shapes)


def _attention_sites(gm: fx.GraphModule) -> list[dict]:
    sites = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and target.namespace.startswith("dflash") and target._opname == "attention":
            args = dict(zip(("q", "k", "v", "kind", "scale", "window"), node.args), **node.kwargs)
            provider = "reference" if target.namespace == "dflash" else target.namespace[len("dflash_"):]
            sites.append({"node": node.name, "kind": args["kind"], "window": args.get("window", 0),
                          "provider": provider})
    return sites


def compile_graph(program: ExportedProgram, target: str, graph: str, *, reexport: bool = True) -> CompiledGraph:
    """program.module() → the pass pipeline (snapshots kept) → lowering for `target` → (re-)export.
    (compiler/step_compiler.py does the middle two for the runtime; here the Ascend source is generated
    between them, from the dflash ops before they become provider ops.) A re-exported program skips the
    passes of pipeline.IN_PLACE_ONLY."""
    from torch_dflash.passes.pipeline import default_pass_manager, skipped_before_export

    gm = program.module()
    pipeline = default_pass_manager(skipped_before_export() if reexport else (), keep_snapshots=True).run(gm)
    ascend_source = None
    if target == "ascend":
        from torch_dflash.compiler.ascend import generate_ascend_module

        ascend_source = generate_ascend_module(gm)
    choices = lowering.lower(gm, target)
    report = CompileReport.build(target, pipeline, choices, graph)
    record(report)
    lowered = None
    if reexport:
        args, kwargs = program.example_inputs
        with torch.no_grad():
            lowered = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes_of(program), strict=False)
    return CompiledGraph(lowered, report, _attention_sites(gm), ascend_source)


# ---- export ------------------------------------------------------------------------------------------------------

def model_config(model: torch.nn.Module) -> dict:
    """What identifies a model in the manifest: its class, dtype and config fields (JSON values)."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"class": type(model).__name__, "dtype": dtype, **json.loads(json.dumps(dataclasses.asdict(model.config)))}


def _prepare(out: Path) -> None:
    """An empty / new directory, or a previous export (replaced); refuse to write into anything else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise InputError(f"{out} is not empty and holds no torch-dflash export; choose a new or empty directory.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export(target, draft, out_dir, *, device: str = "auto", gpu_archs=(), mlir: str | None = None,
           max_batch: int = 1, max_seq_len: int = 2048, step: Step = _no_step,
           on_kernel: Callable[[int, int, str], None] | None = None) -> "Artifact":
    """Capture, rewrite, lower and save the draft and verify steps of (target, draft) to `out_dir`.

    device: the lowering target (auto | cpu | cuda | rocm | ascend); the models must already be where it runs.
    gpu_archs: GPU archs (sm_80, sm_90, gfx942, gfx950) to compile the graphs' Triton kernels for, on any machine.
    mlir: also write <graph>.<dialect>.mlir (linalg | stablehlo | tosa).
    Returns the Artifact as written; its programs share weights and caches with the models (load_artifact
    gives independent copies).
    """
    target_name = lowering.resolve_target(device)
    check_archs(list(gpu_archs))
    if mlir is not None and mlir not in DIALECTS:
        raise InputError(f"Unknown MLIR dialect '{mlir}'; choose one of {', '.join(DIALECTS)}.")
    model_device = check_pair(target, draft)
    if target_name in ("cuda", "rocm") and model_device.type != "cuda":
        raise InputError(f"Exporting for {target_name} needs the models on the GPU; they are on {model_device}.")
    check_engine(model_device, draft.block_size, max_batch, max_seq_len, None, "eager", False, None)
    out = Path(out_dir)
    _prepare(out)
    target.feature_layer_ids = list(draft.target_layer_ids)
    for model in (target, draft):
        model.setup_cache(max_batch, max_seq_len)
    with step("capture draft"):
        programs = {"draft": capture_draft(target, draft, max_batch=max_batch)}
    with step("capture verify"):
        programs["verify"] = capture_verify(target, block_size=draft.block_size, max_batch=max_batch)
    compiled = {}
    for graph, program in programs.items():
        with step(f"passes + lowering ({target_name}) + re-export: {graph}"):
            compiled[graph] = compile_graph(program, target_name, graph)
        with step(f"save {graph}.pt2"):
            torch.export.save(compiled[graph].program, out / f"{graph}.pt2")
    _write_kernels(out, compiled, list(gpu_archs), step, on_kernel)
    if mlir is not None:
        for graph, result in compiled.items():
            with step(f"MLIR {mlir}: {graph}"):
                (out / f"{graph}.{mlir}.mlir").write_text(to_mlir(result.program, mlir, graph))
    report = {graph: {"report": json.loads(c.report.to_json(snapshots=True)), "attention": c.attention}
              for graph, c in compiled.items()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    ops = sorted({(op, provider) for c in compiled.values() for op, chosen in c.report.providers.items()
                  for provider in chosen})
    with step("manifest.json (sha256 of every file)"):
        manifest = write_manifest(out, {
            "target": target_name, "device": str(model_device), "gpu_archs": list(gpu_archs), "mlir": mlir,
            "engine": {"max_batch": max_batch, "max_seq_len": max_seq_len, "block_size": draft.block_size,
                       "context_window": draft.context_window},
            "models": {"target": model_config(target), "draft": model_config(draft)},
            "ops": [list(pair) for pair in ops]})
    return Artifact(out, manifest, compiled["draft"].program, compiled["verify"].program, report)


def _write_kernels(out, compiled, archs, step, on_kernel) -> None:
    ops = sorted({op for c in compiled.values() for op in c.report.providers})
    if archs and ops:
        with step(f"Triton kernels for {','.join(archs)}"):
            write_triton_kernels(out / "kernels", ops, archs, on_kernel)
    for graph, result in compiled.items():
        if result.ascend_source is not None:
            (out / "kernels" / "ascend").mkdir(parents=True, exist_ok=True)
            (out / "kernels" / "ascend" / f"{graph}.py").write_text(result.ascend_source)


# ---- load --------------------------------------------------------------------------------------------------------

def _register_ops(manifest: dict) -> None:
    """The `dflash_<provider>` ops the programs call must exist before torch.export.load reads them."""
    for op, provider in manifest["ops"]:
        if provider == "reference":
            continue
        lowering.load_providers(manifest["target"])
        try:
            lowering.provider_op(op, provider)
        except StopIteration:
            raise ArtifactError(f"The export calls the {provider} kernel of {op}, which cannot be loaded here "
                                f"(the {manifest['target']} providers are unavailable on this machine).") from None


def load_program(path: Path) -> ExportedProgram:
    """torch.export.load, with a damaged file reported in one sentence (and torch's warning log silenced)."""
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)     # torch logs a traceback before trying its legacy format
    try:
        return torch.export.load(path)
    except Exception as error:  # noqa: BLE001 — torch raises many kinds for a damaged archive
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"{path} could not be read as an exported program ({type(error).__name__}: "
                            f"{detail}).") from error
    finally:
        export_log.setLevel(level)


def load_artifact(out_dir) -> "Artifact":
    """The export in `out_dir`, after checking its manifest (ours, same versions, every file unchanged)."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    _register_ops(manifest)
    programs = {graph: load_program(out / f"{graph}.pt2") for graph in GRAPHS}
    reports = json.loads((out / "report.json").read_text())
    return Artifact(out, manifest, programs["draft"], programs["verify"], reports)


@dataclass
class Artifact:
    path: Path
    manifest: dict
    draft_program: ExportedProgram
    verify_program: ExportedProgram
    reports: dict                      # graph -> {"report": CompileReport fields, "attention": [...]}

    def steps(self) -> Steps:
        """The runtime's step functions, running the programs; caches = the buffers the programs write."""
        draft_fn, verify_fn = self.draft_program.module(), self.verify_program.module()
        return Steps(draft_fn, verify_fn, cache_buffers(draft_fn, verify_fn))

    def check_models(self, target, draft) -> None:
        """The models must be those the artifact was exported from (class, dtype, config) and on its device."""
        for role, model in (("target", target), ("draft", draft)):
            was, now = self.manifest["models"][role], model_config(model)
            differs = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
            if differs:
                raise ArtifactError(f"The {role} model differs from the one {self.path} was exported from "
                                    f"({differs[0]} is {now.get(differs[0])!r}, exported {was.get(differs[0])!r}).")
        device = next(target.parameters()).device
        if torch.device(self.manifest["device"]).type != device.type:
            raise ArtifactError(f"{self.path} was exported for {self.manifest['device']}, but the models are on "
                                f"{device}.")

    def engine(self, target, draft, *, cuda_graphs: bool | None = None) -> DFlashEngine:
        """A DFlashEngine over (target, draft) whose draft and verify steps are this artifact's programs."""
        self.check_models(target, draft)
        shape = self.manifest["engine"]
        return DFlashEngine(target, draft, max_batch=shape["max_batch"], max_seq_len=shape["max_seq_len"],
                            block_size=shape["block_size"], draft_window_size=shape["context_window"],
                            cuda_graphs=cuda_graphs, steps=self.steps())

    def generate(self, target, draft, input_ids, **kwargs):
        """`td.generate` through the artifact's programs (kwargs: those of DFlashEngine.generate)."""
        return self.engine(target, draft).generate(input_ids, **kwargs)
