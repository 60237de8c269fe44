"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class TextbookError(Exception):
    """An error the user can act on: bad config, missing input, incompatible output directory."""


class ConfigError(TextbookError):
    """A run config that does not validate; the message names the file and the key."""


class ResourceUnavailable(TextbookError):
    """Something outside the project cannot be reached (a hub model or data set offline, an LLM endpoint).

    The message says exactly what is missing and how to provide it. `textbook run` records the stage as
    skipped, goes on with every stage that can still run, and marks the skipped ones in its summary and report.
    """
