"""The errors whose message is written for users: each names the key, file, sample or model at fault.
The command line prints one of them as one line and exits with status 2; the HTTP service answers 4xx."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key, value, flag or file is wrong; the message names it."""


class DataError(RuntimeError):
    """A dataset cannot be read or holds too many bad samples; the message names the path. `cause` (one
    of `vlp.data.sources.CAUSES`) is set when the error concerns one sample that can be skipped."""

    def __init__(self, message: str, cause: str | None = None):
        super().__init__(message)
        self.cause = cause


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is missing, incomplete or does not fit the model; the message says which."""


class ConversionError(ValueError):
    """A model or checkpoint that the target format cannot represent; the message says what and why."""


class UnsupportedTask(ValueError):
    """A checkpoint's model cannot do what was asked (captioning with a dual encoder, say); the message
    names both."""


class BadQuery(ValueError):
    """A request a predict function cannot use (an example box outside its image, no query at all); the
    message says which."""


class NonFiniteOutput(ValueError):
    """A model computed NaN or infinite values (its weights diverged in training, say)."""


class TrainingError(RuntimeError):
    """A run cannot go on (it diverged, its folder is in use); the message says why and what to do."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, CheckpointError, ConversionError, UnsupportedTask, BadQuery, NonFiniteOutput,
    TrainingError,
)
