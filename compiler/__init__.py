"""torch_dflash.compiler — op library, capture, pass pipeline driver, lowering per target, backend."""

from . import ops, providers
from .report import CompileReport, last_report

__all__ = ["CompileReport", "last_report", "ops", "providers"]
