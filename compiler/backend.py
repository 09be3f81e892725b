"""`torch.compile(model, backend="dflash")` (registered in pyproject under `torch_dynamo_backends`).

Dynamo graph → AOT (functionalized inference ATen graph) → parameters frozen into constants (those the graph
does not mutate; KV caches stay inputs) → OUR pass pipeline and lowering (merged weights built once from the
frozen values), or its output from the compile cache (compile_cache.py) → Inductor compiles the rewritten graph
(its own AOT pass decomposes what remains; dflash and provider ops stay opaque kernels inside it). With
`inductor=False` the rewritten graph runs eagerly (debugging). Training graphs (anything requiring grad) are out
of scope: they go to Inductor unchanged, with one warning.
"""

import dataclasses
import logging
from pathlib import Path

import torch
import torch.fx as fx

from torch_dflash.errors import InputError

from . import compile_cache, lowering, report

log = logging.getLogger("torch_dflash")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    target: str = "auto"                  # auto | cpu | cuda | rocm | ascend
    disable: tuple[str, ...] = ()         # pass names to skip, e.g. ("mhc_post_pre",)
    inductor: bool = True                 # False: run the rewritten graph eagerly
    report: str | None = None             # write each CompileReport as JSON to this path
    cudagraphs: bool = False              # Inductor's CUDA graphs
    snapshots: bool = False               # keep each pass's before/after code in the report
    cache: bool = True                    # the compile cache (off also with TORCH_DFLASH_CACHE_DISABLE=1)

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"Unknown dflash backend option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        if isinstance(options.get("disable"), str):
            options["disable"] = (options["disable"],)
        options["disable"] = tuple(options.get("disable", ()))
        return cls(**options)


class DFlashGraphPass:
    """Our pipeline + lowering over one ATen graph (`run`), and where its CompileReport goes (`publish`)."""

    def __init__(self, options: BackendOptions, graph_name: str):
        self.options, self.graph_name = options, graph_name
        self.target = lowering.resolve_target(options.target)

    def run(self, gm: fx.GraphModule) -> report.CompileReport:
        from torch_dflash.passes.pipeline import default_pass_manager

        manager = default_pass_manager(disabled=_disabled(self.options), keep_snapshots=self.options.snapshots)
        pipeline = manager.run(gm)
        choices = lowering.lower(gm, self.target)
        return report.CompileReport.build(self.target, pipeline, choices, self.graph_name)

    def publish(self, compile_report: report.CompileReport) -> None:
        report.record(compile_report)
        if self.options.report:
            Path(self.options.report).write_text(compile_report.to_json(snapshots=self.options.snapshots))


def _disabled(options: BackendOptions) -> tuple[str, ...]:
    """The passes to skip: the user's, and with Inductor on the ones whose ops Inductor fuses better itself."""
    from torch_dflash.passes.pipeline import skipped_before_inductor

    return skipped_before_inductor(options.disable) if options.inductor else options.disable


def _needs_grad(gm: fx.GraphModule, example_inputs) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for p in gm.parameters()) or any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


_COUNTER = [0]


def dflash_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.compile_fx import compile_fx

    opts = BackendOptions.parse(options)
    if _needs_grad(gm, example_inputs):
        log.warning("torch-dflash compiles inference graphs; this graph requires grad, so Inductor compiles it "
                    "unchanged (run the model under torch.no_grad() or torch.inference_mode()).")
        return compile_fx(gm, example_inputs)
    _COUNTER[0] += 1
    graph_pass = DFlashGraphPass(opts, f"graph#{_COUNTER[0]}")

    # Dynamo hands nn.Module parameters in as graph inputs (the real Parameter objects); freeze those.
    user_params = {i: x for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)}

    def forward_compiler(aot_gm: fx.GraphModule, aot_inputs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the passes compute merged weights from real frozen tensors
            kept = freeze_parameters(aot_gm, user_params)
            aot_gm = compile_cache.rewrite(aot_gm, graph_pass)
        if not opts.inductor:
            run = aot_gm.forward
        else:
            patches = {"triton.cudagraphs": opts.cudagraphs}
            run = compile_fx(aot_gm, [aot_inputs[i] for i in kept], config_patches=patches)
        return make_boxed_func(lambda *args: run(*[args[i] for i in kept]))

    # keep_inference_input_mutations: KV-cache writes stay in the graph (copy_ into the input) so Inductor writes the
    # new tokens in place; without it AOT returns each whole new cache as an output and copies it back per step.
    return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, keep_inference_input_mutations=True)


def freeze_parameters(aot_gm: fx.GraphModule, user_params: dict[int, torch.Tensor]) -> list[int]:
    """Turn the placeholders that hold parameters (AOT's lifted params_flat, then the user inputs that are
    nn.Parameters) and that the graph does not mutate into get_attr constants (inference only), so passes see
    weight values and merged weights are built once. Returns the indices of the inputs the graph still takes.
    Like Inductor's freezing: weights changed in place after compiling are not seen."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    flat = list(context.params_flat or []) if context is not None else []
    meta = context.fw_metadata if context is not None else None
    values = {i: t for i, t in enumerate(flat) if isinstance(t, torch.Tensor)}
    values.update({len(flat) + i: t for i, t in user_params.items()})
    placeholders = [n for n in aot_gm.graph.nodes if n.op == "placeholder"]
    kept = []
    for i, node in enumerate(placeholders):
        mutated = meta is not None and i < len(meta.input_info) and meta.input_info[i].mutates_data
        if i in values and not mutated:
            name = f"_frozen_param{i}"
            aot_gm.register_buffer(name, values[i].detach(), persistent=False)
            with aot_gm.graph.inserting_before(node):
                constant = aot_gm.graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
            aot_gm.graph.erase_node(node)
        else:
            kept.append(i)
    aot_gm.recompile()
    return kept
