"""SIGTERM and SIGHUP end `textbook` the way Ctrl-C does: an exception in the main thread, so every `with` block and
`finally` unwinds (the local LLM server and the judging process are stopped, the server's log is kept, the ledger
closed). SIGKILL runs no handler: the local server then goes by its parent-death signal (`pipeline.llm.server`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread by `install_signal_handlers`. A BaseException, like
    KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum: int, frame: Any) -> None:
    # step aside: a second signal during the clean-up takes the default action and ends the process at once
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise `Terminated`. No-op outside the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    # a parent may have left them blocked (the mask is inherited across exec): then no handler would ever run
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Around a call that installs its own handlers (`ray.init` sets SIGTERM to `sys.exit(15)`): ours, where they
    were installed, are put back after it."""
    ours = threading.current_thread() is threading.main_thread() and any(
        signal.getsignal(sig) is _handler for sig in SIGNALS)
    try:
        yield
    finally:
        if ours:
            install_signal_handlers()
