"""Server-directed waits (issue 17): every rate-limit header form, the `llm.max_wait_s` ceiling, waits shown.

Forms are checked twice: parsed at a fixed clock (`parse_wait(..., now=)`), and end to end through the fault
server, which sends each form on a 429. Waits above the ceiling are how the end-to-end checks read the parsed
value without waiting for it: the request fails at once with a reason that names the header and the seconds.
"""

from __future__ import annotations

import re

import pytest

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.runner import _Progress, run_requests, wait_text
from pipeline.llm.testserver import FaultyOpenAIServer, render_header
from pipeline.llm.types import LLMRequest, LLMResult
from pipeline.llm.waits import parse_wait, server_wait, unreadable_why

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(("value", "ms", "seconds"), [
    ("20", False, 20.0),                                  # Retry-After delta-seconds
    ("1.5", False, 1.5),                                  # non-standard float seconds (the openai SDK reads them)
    ("1500", True, 1.5),                                  # retry-after-ms
    ("6m0s", False, 360.0),                               # OpenAI x-ratelimit-reset-tokens
    ("1m30s", False, 90.0),
    ("2m59.56s", False, 179.56),                          # Groq
    ("250ms", False, 0.25),                               # OpenAI x-ratelimit-reset-requests
    ("1h", False, 3600.0),
    ("Fri, 15 Jan 2027 08:01:30 GMT", False, 90.0),       # HTTP-date (IMF-fixdate)
    ("Friday, 15-Jan-27 08:01:30 GMT", False, 90.0),      # HTTP-date (obsolete RFC 850 form)
    ("2027-01-15T08:01:30Z", False, 90.0),                # RFC 3339 (Anthropic)
    ("2027-01-15T09:01:30+01:00", False, 90.0),           # ISO-8601 with an offset
    (str(int(NOW) + 90), False, 90.0),                    # epoch seconds (GitHub-style x-ratelimit-reset)
    (str(int(NOW * 1000) + 90_000), False, 90.0),         # epoch milliseconds (OpenRouter)
    ("Fri, 15 Jan 2027 07:59:00 GMT", False, 0.0),        # a reset a minute ago (or a little clock skew): go now
    (str(int(NOW) - 60), False, 0.0),
    ("0", False, 0.0),
    ("999999999", True, 999_999.999),                     # a -ms header is milliseconds, whatever its size below 1e9
])
def test_every_wait_form_parses_at_a_fixed_clock(value, ms, seconds):
    assert parse_wait(value, ms=ms, now=NOW) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("value", ["soon", "tomorrow", "1 minute", "5x", "", "inf", "nan", "12:30"])
def test_unknown_forms_are_none_never_a_number(value):
    assert parse_wait(value, now=NOW) is None


@pytest.mark.parametrize(("value", "ms", "why"), [
    ("-5", False, "a negative wait"),
    ("-1", True, "a negative wait"),
    ("1500000000", False, "in the past"),                 # epoch 2017: not "go now"
    ("1000000000", False, "in the past"),                 # 2001
    ("1e12", False, "in the past"),                       # epoch milliseconds of 2001
    ("Wed, 21 Oct 2015 07:28:00 GMT", False, "in the past"),
    ("Fri, 15 Jan 2027 07:00:00 GMT", False, "in the past"),  # an hour ago: no reset a server would name
    ("1500000000", True, "1e9 ms or more"),               # retry-after-ms: 17 days, never read as epoch seconds
    (str(int(NOW * 1000) + 90_000), True, "1e9 ms or more"),  # epoch milliseconds in a -ms header: not an epoch
])
def test_implausible_values_are_none_never_go_now(value, ms, why):
    assert parse_wait(value, ms=ms, now=NOW) is None
    assert why in unreadable_why(value, ms=ms, now=NOW)


def test_which_header_decides():
    # retry-after-ms before retry-after, both before reset headers
    assert server_wait({"retry-after-ms": "1500", "retry-after": "9"}, 429).seconds == 1.5
    assert server_wait({"Retry-After": "9", "x-ratelimit-reset-requests": "1s"}, 429).header == "retry-after: 9"
    # exhausted limits decide; the longest of several exhausted ones
    both = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
            "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    assert server_wait(both, 200).seconds == 360.0
    assert server_wait({**both, "x-ratelimit-remaining-tokens": "5"}, 200).seconds == 2.0
    # nothing exhausted: no wait on an answer; on a 429 without remaining counts, the soonest reset
    assert server_wait({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"}, 200) is None
    assert server_wait({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "9s"}, 429).seconds == 2.0
    assert server_wait({"x-ratelimit-reset-requests": "2s"}, 200) is None
    # Azure's -1 remaining means "not applicable", not exhausted
    assert server_wait({"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-reset-tokens": "0"}, 200) is None
    # Anthropic's and the IETF draft's names
    anthropic = {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:30Z"}
    assert server_wait(anthropic, 200, now=NOW).seconds == 30.0
    assert server_wait({"ratelimit-remaining": "0", "ratelimit-reset": "7"}, 200).seconds == 7.0
    # an unknown form is reported (the caller warns once) and ignored
    heard: list[tuple[str, str]] = []
    assert server_wait({"retry-after": "whenever"}, 429, on_unknown=lambda n, v: heard.append((n, v))) is None
    assert heard == [("retry-after", "whenever")]


def test_the_test_server_renders_times_relative_to_sending():
    assert render_header("{epoch+90}", now=NOW) == str(int(NOW) + 90)
    assert render_header("{epoch_ms+90}", now=NOW) == str(int(NOW * 1000) + 90_000)
    assert render_header("{iso+90}", now=NOW) == "2027-01-15T08:01:30Z"
    assert render_header("{http_date+90}", now=NOW) == "Fri, 15 Jan 2027 08:01:30 GMT"


def _llm(srv: FaultyOpenAIServer, **kw) -> LLMSection:
    base = dict(base_url=srv.base_url, model="test-model", workers=0, concurrency=1, timeout_s=5.0,
                max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, max_tokens=50, max_wait_s=60,
                api_key_env="TEXTBOOK_TEST_NO_KEY")
    base.update(kw)
    return LLMSection(**base)


def _requests(llm: LLMSection, n: int) -> list[LLMRequest]:
    return [LLMRequest(messages=({"role": "user", "content": f"write about topic {i}"},),
                       params=llm.sampling_params(), tag={"i": i}) for i in range(n)]


# Each form a provider sends on a 429, asking for 90 s: above the 60 s ceiling, so the request fails at once with
# the parsed wait in its reason. Absolute forms are rendered by the server when it sends the 429, so the wait
# read is 90 s less the time the answer took to arrive (and the second an HTTP-date or epoch rounds to).
FORMS = {
    "retry-after seconds": {"retry-after": "90"},
    "retry-after HTTP-date": {"retry-after": "{http_date+90}"},
    "retry-after-ms": {"retry-after-ms": "90000"},
    "x-ratelimit-reset duration": {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"},
    "x-ratelimit-reset milliseconds": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "90000ms"},
    "x-ratelimit-reset seconds": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "90"},
    "x-ratelimit-reset epoch": {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "{epoch+90}"},
    "x-ratelimit-reset epoch ms": {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "{epoch_ms+90}"},
    "anthropic ISO-8601": {"anthropic-ratelimit-requests-remaining": "0",
                           "anthropic-ratelimit-requests-reset": "{iso+90}"},
    "IETF RateLimit-Reset": {"ratelimit-remaining": "0", "ratelimit-reset": "90"},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_header_form_from_the_server_is_read_and_the_ceiling_fails_the_request(tmp_path, form):
    headers = FORMS[form]
    with FaultyOpenAIServer(mode="thread", rate_429=1.0, headers_429=headers) as srv:
        llm = _llm(srv)
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 10), llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                         progress=False)
        stats = srv.stats()
    failed = [r for r in results if r.status == "failed"]
    assert failed and all(r.outcome == "server_wait" and r.attempts == 1 for r in failed)
    asked = float(re.search(r"asked to wait ([\d,.]+) s", failed[0].error).group(1).replace(",", ""))
    assert 85 <= asked <= 91, failed[0].error  # epoch forms round up to the next second
    name = next(k for k in headers if "reset" in k or "retry" in k)
    assert f"({name}: " in failed[0].error and "llm.max_wait_s=60" in failed[0].error
    # the run stops: nothing more is sent into a limit that will not lift in time (only what was already queued
    # in the worker: 1 slot + a prefetch of 2); a re-run sends the rest
    assert s.stopped_reason and name in s.stopped_reason
    assert s.skipped_reasons == {"server_wait": 10 - len(failed)} and len(failed) <= 3
    assert s.reconciled and stats["received"] == len(failed) and stats["answered_total"] == 0


def test_case_429_retry_after_one_day_fails_at_once_with_a_reason(tmp_path):
    """../shared/cases: a 429 with Retry-After: 86400 blocked the run silently. Now: the default ceiling (120 s,
    as the openai SDK) fails it with a reason naming what the server asked, and the run stops."""
    with FaultyOpenAIServer(mode="thread", rate_429=1.0, headers_429={"retry-after": "86400"}) as srv:
        llm = _llm(srv, concurrency=4, max_wait_s=LLMSection().max_wait_s)
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 20), llm, BudgetSection(), tmp_path / "l.sqlite",
                         on_result=results.append, progress=False)
        received = srv.stats()["received"]
    assert LLMSection().max_wait_s == 120
    failed = [r for r in results if r.status == "failed"]
    assert failed and all(r.outcome == "server_wait" and r.attempts == 1 for r in failed)
    assert "asked to wait 86,400 s (retry-after: 86400), above llm.max_wait_s=120" in failed[0].error
    assert "86400" in s.stopped_reason and s.failed_reasons == {"server_wait": len(failed)}
    # at most the requests already in flight (4 slots + prefetch 2) were sent; the rest skipped, named
    assert received == len(failed) <= 6 and s.skipped_reasons == {"server_wait": 20 - len(failed)}


def test_a_wait_under_the_ceiling_is_honoured_and_announced(tmp_path):
    with FaultyOpenAIServer(mode="thread", first_429=1, headers_429={"retry-after": "2"}) as srv:
        llm = _llm(srv)
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 2), llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                         progress=False)
    assert s.ok == 2 and sorted(r.attempts for r in results) == [1, 2]
    # the driver heard of the wait (it is what the progress line shows while it lasts)
    assert s.waits["count"] == 1 and 2.0 <= s.waits["longest_s"] <= 3.0


def test_the_progress_line_shows_a_running_wait():
    import time

    from pipeline.llm.types import RunSummary

    prog = _Progress(False, 10)
    assert "waiting" not in prog.info(RunSummary(), 0.0)
    prog.announce_wait(45, "server rate limit (retry-after: 45)", time.time() + 45)
    line = prog.info(RunSummary(), 0.0)
    # first: a terminal cuts the end of a long line, never its start
    assert re.match(r"waiting 4[45] s: server rate limit \(retry-after: 45\) \| ", line), line
    assert wait_text(45.2, "server rate limit") == "waiting 45 s: server rate limit"
    prog.announce_wait(1, "over", time.time() - 1)  # a wait that has ended is not shown
    prog.wait = (time.time() - 1, "over")
    assert "waiting" not in prog.info(RunSummary(), 0.0)


def test_an_unknown_header_form_is_ignored_with_one_warning(tmp_path, capfd):
    with FaultyOpenAIServer(mode="thread", first_429=3, headers_429={"retry-after": "in a while"}) as srv:
        llm = _llm(srv, concurrency=1, max_retries=5)
        s = run_requests(_requests(llm, 2), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
        assert srv.stats()["faults"]["429"] == 3
    # three 429s in that form: one warning; each request still answered after its own backoff
    assert s.ok == 2 and s.retries == 3
    assert len(s.warnings) == 1 and "retry-after: 'in a while'" in s.warnings[0]
    assert capfd.readouterr().err.count("ignored rate-limit header retry-after") == 1


@pytest.mark.parametrize("tty", [True, False])
def test_a_long_wait_is_visible_at_80_columns_and_without_a_terminal(tty, capfd):
    """The progress line at 80 columns shows the wait (it leads the line); a wait of 5 s or more is also printed
    as a line of its own, once for the 16 requests that heard the same 429, which is all a log shows."""
    import io
    import time

    from rich.console import Console

    from pipeline.llm.types import RunSummary

    screen = io.StringIO()
    prog = _Progress(True, 24, console=Console(file=screen, width=80, force_terminal=tty))
    until = time.time() + 45
    for i in range(16):
        prog.announce_wait(45, "server rate limit (retry-after: 45)", until + i * 0.001)
    prog.update(RunSummary(total=24, ok=3), 0.0, force=True)
    prog.close()
    shown = screen.getvalue()
    assert "waiting 4" in shown and "s: server rate limit" in shown, shown
    assert all(len(line) <= 80 for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).splitlines())
    # on stderr (in a terminal, rich prints it above the progress line, on its console)
    printed = capfd.readouterr().err + shown
    assert printed.count("llm: waiting 45 s: server rate limit (retry-after: 45)") == 1, printed


def test_wall_clock_waiting_is_reported_beside_the_sum_over_requests(tmp_path):
    """Four requests hear a 429 asking for 2 s at the same time: the sum over requests is about 8 s, the run
    waited about 2 s of wall-clock time (`waits.wall_s`)."""
    with FaultyOpenAIServer(mode="thread", first_429=4, headers_429={"retry-after": "2"}) as srv:
        llm = _llm(srv, concurrency=4)
        srv.hold(after=0)  # the four requests meet at the gate, so their 429s come back together
        results: list[LLMResult] = []

        def release_when_all_held() -> None:
            from waiting import wait_until

            wait_until(lambda: srv.stats()["held"] == 4, "four requests at the gate")
            srv.release()

        import threading

        t = threading.Thread(target=release_when_all_held)
        t.start()
        s = run_requests(_requests(llm, 4), llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                         progress=False)
        t.join()
    assert s.ok == 4 and s.waits["count"] == 4
    assert s.waits["total_s"] >= 4 * 2.0 and 2.0 <= s.waits["wall_s"] < s.waits["total_s"] / 2


def test_an_implausible_header_warns_once_and_the_request_backs_off(tmp_path):
    """`Retry-After: 1500000000` (an epoch of 2017) used to read as "go now", silently. Now: one warning, and the
    request waits by its own backoff (here 2-4 s, so the wait is announced), then is answered."""
    with FaultyOpenAIServer(mode="thread", first_429=2, headers_429={"retry-after": "1500000000"}) as srv:
        llm = _llm(srv, concurrency=2, backoff_base_s=4.0, backoff_max_s=4.0)
        s = run_requests(_requests(llm, 2), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
    assert s.ok == 2 and s.retries == 2
    assert len(s.warnings) == 1 and "retry-after: '1500000000'" in s.warnings[0] and "in the past" in s.warnings[0]
    # each retry waited its backoff (>= 2 s, announced); read as "go now" it would have waited under 1 s
    assert s.waits["count"] == 2 and s.waits["longest_s"] >= 2.0
