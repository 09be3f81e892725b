"""torch-dflash: a PyTorch compiler backend and runtime for DFLASH speculative decoding."""

from .errors import CheckpointError, ConfigError, DFlashError, InputError  # noqa: I001  (leaf first)
from torch_dflash import compiler, models
from torch_dflash.compiler import CompileReport, last_report
from torch_dflash.models import load_draft, load_target
from torch_dflash.runtime import DFlashEngine, GenerateOutput, generate
from torch_dflash.artifact import export, load_artifact

__all__ = ["CheckpointError", "ConfigError", "DFlashError", "InputError", "compiler", "models", "load_draft",
           "load_target", "DFlashEngine", "GenerateOutput", "generate", "CompileReport", "last_report", "export", "load_artifact"]
