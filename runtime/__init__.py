"""torch_dflash.runtime — the DFLASH speculative-decoding engine (docs/runtime.md)."""

from .engine import DFlashEngine, GenerateOutput, generate
from .executors import identity_compile
from .stats import GenerateStats

__all__ = ["DFlashEngine", "GenerateOutput", "GenerateStats", "generate", "identity_compile"]
