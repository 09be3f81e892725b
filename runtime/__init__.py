"""torch_dflash.runtime — the DFLASH speculative-decoding engine (docs/runtime.md)."""

from .engine import Decode, DFlashEngine, GenerateOutput, generate
from .executors import Steps
from .stats import GenerateStats

__all__ = ["DFlashEngine", "Decode", "GenerateOutput", "GenerateStats", "Steps", "generate"]
