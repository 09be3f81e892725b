"""manifest.json of an export directory: what produced it and the sha256 of every file in it.

An artifact is accepted only as it was written: by this version of torch, triton and torch-dflash (a program
saved by another torch may not load, or load and run differently) and with every file unchanged.
"""

import hashlib
import importlib.metadata
import json
from pathlib import Path

import torch

from torch_dflash.errors import DFlashError

FORMAT = "torch-dflash-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(DFlashError):
    """An export directory is missing, foreign (not written by torch-dflash), stale (other versions) or tampered."""


def versions() -> dict[str, str | None]:
    def installed(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "triton": installed("triton"), "torch-dflash": installed("torch-dflash")}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out: Path, facts: dict) -> dict:
    """Write manifest.json: `facts` + format, versions and the sha256 of every other file under `out`."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **facts,
                "files": {p.relative_to(out).as_posix(): sha256(p) for p in files}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(out: str | Path, *, check_versions: bool = True) -> dict:
    """The manifest of export directory `out`, after checking it is ours, current and unmodified."""
    out = Path(out)
    if not out.is_dir():
        raise ArtifactError(f"No export directory at {out}.")
    path = out / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{out} is not a torch-dflash export: it has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not ours or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} is not a torch-dflash manifest; {out} was not written by torch-dflash export.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{out} has artifact format {manifest.get('format_version')}, this torch-dflash reads "
                            f"format {FORMAT_VERSION}; export it again.")
    if check_versions:
        recorded = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
        stale = [f"{name} {was} (now {now})" for name, now in versions().items() if (was := recorded.get(name)) != now]
        if stale:
            raise ArtifactError(f"{out} is stale: it was exported with {', '.join(stale)}; export it again.")
    for name, digest in manifest["files"].items():
        file = out / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{path} lists {name}, a file outside the export directory.")
        if not file.is_file():
            raise ArtifactError(f"{file} is missing from the export; export it again.")
        if sha256(file) != digest:
            raise ArtifactError(f"{file} was modified after export (its sha256 differs from {MANIFEST}).")
    return manifest
