"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class TextbookError(Exception):
    """An error the user can act on: bad config, missing input, incompatible output directory."""


class ConfigError(TextbookError):
    """A run config that does not validate; the message names the file and the key."""
