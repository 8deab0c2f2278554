"""Errors that mean the user asked for something we cannot do; the CLI prints them as one line and exits 2.

A bug is not an ImageGPTError: it keeps its traceback.
"""


class ImageGPTError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ConfigError(ImageGPTError, ValueError):
    """A configuration we cannot honour (unknown preset, unsupported transformers option, bad size)."""


class CheckpointError(ImageGPTError, ValueError):
    """A checkpoint directory that is missing, incomplete or of the wrong kind."""


class ImageInputError(ImageGPTError, ValueError):
    """An image we cannot read or turn into tokens (unreadable file, impossible shape, empty batch)."""


class DataError(ImageGPTError, ValueError):
    """A dataset we cannot read or use (unknown format, no labels, unsafe archive)."""


class ArgumentError(ImageGPTError, ValueError):
    """An argument outside its allowed range (a keep fraction above 1, n < 1, a layer out of range)."""


class OutputError(ImageGPTError):
    """An output place that cannot be written (a file where a folder is needed, a read-only or full disk)."""


class ResourceError(ImageGPTError, MemoryError):
    """A size this machine cannot hold (memory or disk), refused before the allocation is tried."""


class Interrupted(ImageGPTError):
    """A signal (Ctrl-C, SIGTERM) stopped the command after it saved its work; the CLI exits 128 + signal,
    as a shell reports a command that a signal ended."""

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal
