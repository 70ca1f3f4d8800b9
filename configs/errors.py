"""One exception base class for everything smear reports to a user."""


class SmearError(Exception):
    """An error a user can act on: says what was received, what is valid, what to do next.

    The CLI prints it as one line on stderr and exits non-zero.
    """


class ConfigError(SmearError):
    """A configuration key or value is invalid."""


class ModelNotFoundError(SmearError):
    """A model file or folder is missing."""


class ImageReadError(SmearError):
    """An input image cannot be read or decoded."""
