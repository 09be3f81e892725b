"""Errors a user can cause. Each carries one sentence that says what is wrong and where.

This module is a leaf: every layer (models included) may import it.
"""


class DFlashError(Exception):
    """Base class of every error torch-dflash raises for bad input; the message is one clear sentence."""


class CheckpointError(DFlashError):
    """A checkpoint directory or file is missing, corrupt, truncated or holds tensors of the wrong name or shape."""


class ConfigError(DFlashError):
    """A model config is unknown, incomplete or inconsistent (e.g. a draft that does not match its target)."""


class InputError(DFlashError):
    """Arguments of a call are invalid (empty prompt, block larger than the cache, bad token id, ...)."""
