"""Exceptions that `core` raises for bad user input.

Every error here is an expected failure. Its message names the offending value and what to do, so
the CLI and the service can show it to the user as it is, without a traceback.
"""


class HardeningError(ValueError):
    """Base class of the errors caused by user input (files, settings, dataset references)."""


class CheckpointError(HardeningError):
    """A checkpoint file is unreadable, unsafe, or does not fit the requested architecture."""


class DatasetError(HardeningError):
    """A dataset reference is malformed, outside the allowed roots, or its files are unreadable."""


class ConfigError(HardeningError):
    """A setting (architecture name, score name, hyperparameter) is invalid."""


class MaskError(HardeningError):
    """A mask or weights artifact is corrupt or belongs to another checkpoint."""


class Cancelled(Exception):
    """Raised inside a long run when its caller asked it to stop."""
