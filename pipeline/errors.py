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


class NoInputDocuments(TextbookError):
    """A stage found no document to read: its upstream stages kept nothing, or its inputs are empty.

    `pipeline.run` fills in `funnel` (one dict per upstream stage: stage, read, kept, dropped {reason: n},
    errored {reason: n}, skipped, filters {filter: {reason: n}}), `hints` (lines naming the setting to change) and,
    in `run_pipeline`, `results` (the stage stats so far), so the CLI can show what emptied the run.
    """

    def __init__(self, message: str, funnel: list[dict] | None = None, hints: list[str] | None = None,
                 results: dict | None = None) -> None:
        super().__init__(message)
        self.funnel = funnel or []
        self.hints = hints or []
        self.results = results or {}
