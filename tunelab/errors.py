"""Errors a user can cause. Each message names the file, row or key and says how to fix it."""


class TunelabError(ValueError):
    """Base class for user-facing errors; the CLI prints them without a traceback."""


class ConfigError(TunelabError):
    """A config key, value or combination is invalid."""


class DataError(TunelabError):
    """Input data is malformed; the message names file, row and field."""


class CheckpointError(TunelabError):
    """A checkpoint or model directory is missing, incomplete or does not match."""
