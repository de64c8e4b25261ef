"""Error types. Raised where the problem is known; the CLI turns them into one line."""


class WapsError(Exception):
    """Base of every error a user can cause. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class ModelError(WapsError):
    """The model cannot be read, traced or is outside what we support."""


class UnsupportedOpError(ModelError):
    """The graph holds operators with no quantized lowering; lists them by name."""


class DataError(WapsError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class ArtifactError(WapsError):
    """A .waps file is corrupt, of another format version, or inconsistent."""


class ConfigError(WapsError):
    """An option value is out of range or contradicts another."""


class CheckpointError(WapsError):
    """A calibration checkpoint is unreadable, or belongs to another run (options, model, data)."""
