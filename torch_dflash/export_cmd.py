"""`torch-dflash export`: load (or build) the model pair, export it (artifact.py) with progress, list the files."""

import contextlib
import importlib.util

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from torch_dflash.artifact import export
from torch_dflash.demo import build_demo_pair, resolve_device
from torch_dflash.errors import InputError
from torch_dflash.kernel_export import check_archs
from torch_dflash.models import load_draft, load_target

DEVICES = ("cpu", "cuda", "rocm", "ascend")


def torch_device(device: str) -> torch.device:
    """Where the models run for a lowering target: ROCm GPUs are 'cuda' in torch; Ascend is 'npu' where
    torch_npu sees one, else CPU (the programs then run the reference ops; the Ascend source is still written)."""
    if device not in DEVICES:
        raise InputError(f"Unknown device '{device}'; choose one of {', '.join(DEVICES)}.")
    if device == "ascend":
        npu = getattr(torch, "npu", None)
        found = importlib.util.find_spec("torch_npu") is not None and npu is not None and npu.is_available()
        return torch.device("npu" if found else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    gpu = resolve_device("cuda")
    if (device == "rocm") != bool(getattr(torch.version, "hip", None)):
        raise InputError(f"--device {device} does not match this torch build, which is for "
                         f"{'ROCm' if torch.version.hip else 'CUDA'}; use --device "
                         f"{'rocm' if torch.version.hip else 'cuda'}.")
    return gpu


def load_pair(target_dir, draft_dir, random_config: bool, device: torch.device):
    """(target, draft) from checkpoint directories, or the demo's random pair with --random-config."""
    if random_config:
        if target_dir or draft_dir:
            raise InputError("Give either --random-config or --target and --draft, not both.")
        return build_demo_pair(0, device=device)
    if not (target_dir and draft_dir):
        raise InputError("Give --target DIR and --draft DIR (or --random-config for a random pair).")
    return load_target(target_dir, device=device), load_draft(draft_dir, device=device)


def default_archs(device: str, model_device: torch.device) -> list[str]:
    """The local GPU's arch for cuda/rocm exports (when the AOT table knows it), none otherwise."""
    if device not in ("cuda", "rocm"):
        return []
    props = torch.cuda.get_device_properties(model_device)
    arch = props.gcnArchName.split(":")[0] if device == "rocm" else f"sm_{props.major}{props.minor}"
    from torch_dflash.compiler.triton.aot import ARCHS

    return [arch] if arch in ARCHS else []


class StepProgress:
    """One rich progress line per export step (spinner, then ✓ and its time); the kernel step counts kernels."""

    def __init__(self, console: Console, quiet: bool):
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓[/green]"), TextColumn("{task.description}"),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                                 disable=quiet)
        self.task = None

    @contextlib.contextmanager
    def step(self, name: str):
        self.task = self.progress.add_task(name, total=1, detail="")
        yield
        self.progress.update(self.task, completed=1)

    def kernel(self, done: int, total: int, name: str) -> None:
        self.progress.update(self.task, detail=f"{done}/{total} kernels")


def run(console: Console, args) -> None:
    device = torch_device(args.device)
    archs = [a for a in (args.gpu_arch or "").split(",") if a] or default_archs(args.device, device)
    check_archs(archs)
    target, draft = load_pair(args.target, args.draft, args.random_config, device)
    progress = StepProgress(console, args.quiet)
    with progress.progress:
        artifact = export(target, draft, args.out, device=args.device, gpu_archs=archs, mlir=args.mlir,
                          max_batch=args.batch_max, max_seq_len=args.max_seq_len, step=progress.step,
                          on_kernel=progress.kernel)
    files = Table(title=f"{artifact.path} (target {artifact.manifest['target']})")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    names = [*artifact.manifest["files"], "manifest.json"]
    for name in (n for n in names if "/" not in n):
        files.add_row(name, f"{(artifact.path / name).stat().st_size:,}")
    kernels = [n for n in names if n.startswith("kernels/")]
    if kernels:
        size = sum((artifact.path / n).stat().st_size for n in kernels)
        files.add_row(f"kernels/ ({len(kernels)} files)", f"{size:,}")
    console.print(files)
    if not args.quiet:
        from torch_dflash.inspect_cmd import summary_tables

        for table in summary_tables(artifact.reports):
            console.print(table)
