"""torch_dflash.compiler — op library, capture, pass pipeline driver, lowering per target, backend."""

from . import ops, providers

__all__ = ["ops", "providers"]
