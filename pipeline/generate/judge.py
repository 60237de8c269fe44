"""Judging LLM results: every result ends as exactly one counted state, and a document (kept or removed).

Every token this run was billed is accounted to what it bought (`billed`): `kept` documents, or `dropped`, by
reason (a failure such as `failed_content_filter`, a validation drop such as `too_short`, or `unusable_answers`:
content-filtered / null answers before a request's usable one), tokens and USD at the run's prices and mode.

`Judge` validates one answer (`validate.Validator`: empty, length, refusal, preamble, meta-talk, placeholder, too
short, repetition, language, and code for code formats) and indexes it
in the diversity guard; it owns the stage's output files. `JudgeProcess` runs a `Judge` in a child process:
judging costs about 1.4 ms of CPU per answer (language id, MinHash, parquet rows), and in the driver process
that CPU competed for the GIL with the event loop that keeps `concurrency` requests in flight, which cut the
stage's request rate by a third. The driver only forwards results (batched, on a sender thread) and learns of
stopped grid cells from the child, so `should_send` stays a dictionary lookup.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import TextbookError
from pipeline.generate.sampler import PromptSpec
from pipeline.llm.types import LLMRequest, LLMResult
from pipeline.stats import StageStats

SOURCE = "synthetic"


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "unknown"


def _bill() -> dict[str, float]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}


def billed_reconciles(billed: dict[str, Any], summary: Any) -> bool:
    """The judge's kept + dropped bill equals what the LLM layer billed in this run (tokens exactly, USD to
    rounding): every billed token is accounted to what it bought."""
    kept, dropped = billed["kept"], billed["dropped"]
    return (kept["prompt_tokens"] + dropped["prompt_tokens"] == summary.prompt_tokens
            and kept["completion_tokens"] + dropped["completion_tokens"] == summary.completion_tokens
            and abs(kept["usd"] + dropped["usd"] - summary.cost_usd) <= 1e-5)


def failure_reason(error: str | None) -> str:
    """`failed_<kind>` from the LLM layer's error ('after 7 attempt(s): InternalServerError 500: ...' →
    failed_internalservererror_500): few, stable reason names for the stats."""
    text = re.sub(r"^(after \d+ attempt\(s\):\s*|worker error:\s*)+", "", error or "unknown")
    return f"failed_{_slug(text.split(':', 1)[0], 40)}"


def skip_reason(skipped: str) -> str:
    return f"skipped_{_slug(skipped.split(':', 1)[0], 40)}"


@dataclass
class JudgeSetup:
    """Everything a judge needs, picklable (it crosses into the child process)."""

    cfg: RunConfig
    kept_dir: Path
    removed_dir: Path
    specs: list[PromptSpec]
    prompt_ids: dict[str, str]  # format name → prompt_id


class Judge:
    # Preloaded validators (`Judge.preload`), by the settings they were built from: the judging process builds
    # its validator while the driver plans, instead of after the plan arrives.
    _preloaded: dict[str, Any] = {}

    @staticmethod
    def _validator_key(cfg: RunConfig) -> str:
        return cfg.generate.model_dump_json() + "\x1f" + str(cfg.tokenizer.path)

    @classmethod
    def preload(cls, cfg: RunConfig) -> None:
        """Build the validator (tokenizer, language id, checks) for `cfg` now; `Judge(setup)` with the same
        generate and tokenizer settings uses it."""
        from pipeline.generate.validate import Validator, detect_language

        cls._preloaded[cls._validator_key(cfg)] = Validator(cfg.generate, cfg.tokenizer.path)
        if cfg.generate.language:  # the language-id model loads on first use: load it now, not on the first answer
            detect_language("A sentence to load the language identification model with.")

    def __init__(self, setup: JudgeSetup) -> None:
        # here, not at module level: the driver imports this module for JudgeProcess and needs neither pyarrow
        # (the documents) nor numpy (the diversity guard)
        from pipeline.documents import RemovedWriters
        from pipeline.generate.diversity import DiversityGuard

        self.setup, self.cfg = setup, setup.cfg
        self.stats = StageStats("generate")
        self.guard = DiversityGuard(self.cfg.generate.diversity)
        self._validator: Any = None
        self.kept_rows: list[tuple[int, int, dict[str, Any]]] = []
        self.removed = RemovedWriters(setup.removed_dir)
        self.words_kept = self.completion_tokens = self.prompt_tokens = 0
        self._sent_params: dict[int, dict[str, Any]] = {}
        self.states: Counter[str] = Counter()
        # what this run was billed (cached results cost nothing now), split by the fate of what it paid for
        self.billed: dict[str, dict[str, float]] = {"kept": _bill(), "dropped": _bill()}
        self.billed_dropped_by_reason: dict[str, dict[str, float]] = {}

    @property
    def validator(self) -> Any:
        if self._validator is None:
            from pipeline.generate.validate import Validator

            self._validator = self._preloaded.pop(self._validator_key(self.cfg), None) or Validator(
                self.cfg.generate, self.cfg.tokenizer.path)
        return self._validator

    def sent_params(self, sample_index: int) -> dict[str, Any]:
        """The parameters a request was sent with, derived here rather than shipped with every result: all the
        stage's requests carry the config's sampling parameters (`stage.build_request`), and the seed sent is
        offset by the sample index (`LLMRequest.sent_params`)."""
        params = self._sent_params.get(sample_index)
        if params is None:
            request = LLMRequest(prompt="", params=self.cfg.llm.sampling_params(), sample_index=sample_index)
            params = self._sent_params[sample_index] = request.sent_params()
        return params

    def _doc(self, spec: PromptSpec, result: LLMResult, text: str, extra: dict[str, Any]) -> dict[str, Any]:
        # only what the answer's content depends on: how the request went (latency, attempts, served from the
        # ledger) differs between a first run, a resumed one and one on a cluster, so it lives in the ledger
        # (joined by request_key) and the stats, and the same data gives the same shards
        sample_index = result.tag["sample_index"]
        meta: dict[str, Any] = {
            "request_key": result.key, "spec_index": spec.index, "sample_index": sample_index,
            "params": self.sent_params(sample_index),
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "finish_reason": result.finish_reason,
        }
        if spec.leaf is not None:
            meta.update(subject=spec.leaf.subject, subtopic=spec.leaf.subtopic, concept=spec.leaf.concept)
        if spec.seed is not None:
            meta.update(seed_id=spec.seed.id, seed_edu_score=spec.seed.edu_score)
        meta.update(extra)
        from pipeline.documents import doc_id

        return {"id": doc_id(text) if text else result.key[:32], "text": text, "source": SOURCE,
                "topic": spec.topic, "audience": spec.audience, "format": spec.format,
                "prompt_id": self.setup.prompt_ids[spec.format], "model": result.model or self.cfg.llm.model,
                "url": spec.seed.url if spec.seed is not None else None, "meta": meta}

    def _bill(self, fate: str, reason: str | None, prompt_tokens: int, completion_tokens: int, usd: float) -> None:
        if not (prompt_tokens or completion_tokens or usd):
            return
        for bill in (self.billed[fate],) + ((self.billed_dropped_by_reason.setdefault(reason, _bill()),)
                                            if reason is not None else ()):
            bill["prompt_tokens"] += prompt_tokens
            bill["completion_tokens"] += completion_tokens
            bill["usd"] += usd

    def __call__(self, result: LLMResult) -> None:
        spec = self.setup.specs[result.tag["spec"]]
        self.stats.read()
        if result.skipped:
            reason = skip_reason(result.skipped)
            self.stats.drop(reason)
            self.removed.write(self._doc(spec, result, "", {"skipped": result.skipped}), reason)
            self.states["skipped"] += 1
            return
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        if not result.ok:
            reason = failure_reason(result.error)
            self.stats.error(reason)
            self._bill("dropped", reason, result.billed_prompt_tokens, result.billed_completion_tokens,
                       result.cost_usd)
            self.removed.write(self._doc(spec, result, "", {"error": result.error}), "failed")
            self.states["failed"] += 1
            return
        # unusable answers before this one (content filter, null content): billed, dropped by the LLM layer
        self._bill("dropped", "unusable_answers", result.unusable_prompt_tokens, result.unusable_completion_tokens,
                   result.unusable_cost_usd)
        answer_usd = result.cost_usd - result.unusable_cost_usd
        text = result.text or ""
        verdict = self.validator.check(text, result.finish_reason, spec.format)
        extra: dict[str, Any] = {"words": verdict.words}
        if verdict.detail is not None:
            extra["drop_detail"] = verdict.detail  # what fired: the phrase, the rule and its value, the block
        if verdict.tokens is not None:
            extra["tokens"] = verdict.tokens
        if verdict.language is not None:
            extra.update(language=verdict.language, language_score=round(verdict.language_score or 0, 3))
        if text.strip():
            extra.update(self.guard.observe(result.key, result.tag["cell"], text))
        doc = self._doc(spec, result, text, extra)
        if verdict.reason is not None:
            self.stats.drop(verdict.reason)
            self._bill("dropped", verdict.reason, result.prompt_tokens if not result.cached else 0,
                       result.completion_tokens if not result.cached else 0, answer_usd)
            self.removed.write(doc, verdict.reason)
            self.states["filtered"] += 1
            return
        if not result.cached:
            self._bill("kept", None, result.prompt_tokens, result.completion_tokens, answer_usd)
        self.stats.keep()
        self.states["ok"] += 1
        self.words_kept += verdict.words
        self.kept_rows.append((spec.index, result.tag["sample_index"], doc))

    def close(self) -> dict[str, Any]:
        """Write the kept documents (in spec order: the same config gives the same files whatever order answers
        came in) and return the judge's accounting for the stage stats."""
        from pipeline.documents import DocumentWriter

        rows = sorted(self.kept_rows, key=lambda r: (r[0], r[1]))
        with DocumentWriter(self.setup.kept_dir) as w:
            for _, _, doc in rows:
                w.write(doc)
        self.removed.close()
        return {"stats": self.stats.as_dict(), "states": dict(self.states),
                "kept_spec_indices": [spec_index for spec_index, _, _ in rows], "words_kept": self.words_kept,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "diversity": self.guard.stats(),
                "billed": {**self.billed, "dropped_by_reason": dict(sorted(self.billed_dropped_by_reason.items()))}}


# ------------------------------------------------------------------------------------------ child process
def child_main(inbox_fd: int, outbox_fd: int, factory: str = "pipeline.generate.judge:Judge") -> None:
    """Child: receive the setup, judge batches of results until None, report stopped cells as they
    happen, then write the outputs and send the accounting. `factory` ("module:name") builds the judge from the
    setup: anything with `__call__(result)`, `validator`, `guard.stopped` and `close() -> dict` (the rephrase stage
    has its own)."""
    import importlib
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops this process
    inbox, outbox = Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False)
    try:
        module_name, name = factory.split(":")
        cls = getattr(importlib.import_module(module_name), name)
        setup = inbox.recv()
        if isinstance(setup, tuple) and setup and setup[0] == "preload":  # `JudgeProcess.preload`
            if hasattr(cls, "preload"):
                cls.preload(setup[1])
            setup = inbox.recv()
        judge = cls(setup)
        judge.validator  # noqa: B018 - load tokenizer + language id before the first answer
        outbox.send(("ready",))
        reported: set[str] = set()
        while (batch := inbox.recv()) is not None:
            for result in batch:
                judge(result)
            for cell, info in judge.guard.stopped.items():
                if cell not in reported:
                    reported.add(cell)
                    outbox.send(("stop", cell, info))
        outbox.send(("done", judge.close()))
    except EOFError:  # the driver is gone (killed): nothing to report to
        return
    except BaseException as e:  # noqa: BLE001 - handed to the driver, which raises it
        outbox.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    # everything is written and reported: skip the interpreter's teardown (unloading pyarrow, the language-id
    # model, ...), which the driver would otherwise wait for (~0.3 s idle, seconds on a busy machine)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class JudgeProcess:
    """Parent side: `put(result)` never blocks the caller; `stopped` holds the cells the child's
    diversity guard stopped; `close()` returns the child's accounting (or raises its error).

    The child is a fresh interpreter (`python -c ...`), not a fork: the driver may hold Ray's threads, and a
    multiprocessing spawn would re-import the caller's `__main__` script."""

    def __init__(self, factory: str = "pipeline.generate.judge:Judge", stage: str = "generate") -> None:
        """Start the child interpreter now: its imports overlap with the driver's planning. `factory`: the judge
        class the child builds from the setup (see `child_main`); `stage` names the stage in errors."""
        from multiprocessing.connection import Connection

        self.stage = stage
        child_in, parent_out = os.pipe()
        parent_in, child_out = os.pipe()
        code = f"from pipeline.generate.judge import child_main; child_main({child_in}, {child_out}, {factory!r})"
        # the driver's import path (a notebook may have extended sys.path), as multiprocessing's spawn passes it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_in, child_out),
                                     stdin=subprocess.DEVNULL, env=env)
        os.close(child_in)
        os.close(child_out)
        self._to_child = Connection(parent_out, readable=False)
        self._from_child = Connection(parent_in, writable=False)
        self.stopped: dict[str, dict[str, Any]] = {}
        self.not_sent: Counter[str] = Counter()
        self.error: str | None = None
        self.final: dict[str, Any] | None = None
        self._ready = threading.Event()
        self._queue: queue.SimpleQueue[LLMResult | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="judge-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="judge-reader", daemon=True)
        self._reader.start()

    def preload(self, cfg: RunConfig) -> None:
        """Let the child build what judging needs for `cfg` (tokenizer, language id) while the caller plans;
        `start` then waits only for what is left. Call it before `start`, at most once."""
        self._to_child.send(("preload", cfg))

    def start(self, setup: JudgeSetup) -> None:
        """Hand the child its setup and wait until it can judge (tokenizer and language id loaded), so the
        diversity guard sees the first answers as they arrive and a broken setup fails before any request."""
        self._to_child.send(setup)
        self._sender.start()
        self._ready.wait()
        if self.error is not None:
            raise TextbookError(f"{self.stage}: judging failed: {self.error}")

    def _send_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 256:  # one pickle + one write for everything that arrived meanwhile
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            items = [b for b in batch if b is not None]
            try:
                if items:
                    self._to_child.send(items)
                if done:
                    self._to_child.send(None)
            except OSError:  # child died: the reader reports it
                return
            if done:
                return

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._from_child.recv()
            except (EOFError, OSError):
                if self.final is None and self.error is None:
                    code = self.proc.wait(timeout=30)
                    self.error = f"the judging process exited unexpectedly (exit code {code})"
                self._ready.set()
                return
            if msg[0] == "ready":
                self._ready.set()
            elif msg[0] == "stop":
                self.stopped[msg[1]] = msg[2]
            elif msg[0] == "done":
                self.final = msg[1]
                return
            else:
                self.error = msg[1]
                self._ready.set()
                return

    def should_send(self, cell: str) -> str | None:
        if cell in self.stopped:
            self.not_sent[cell] += 1
            return f"diversity_guard: cell '{cell}' repeats itself"
        return None

    def put(self, result: LLMResult) -> None:
        if self.error is not None:
            raise TextbookError(f"{self.stage}: judging failed: {self.error}")
        self._queue.put(result)

    def close(self) -> dict[str, Any]:
        self._queue.put(None)
        self._sender.join()
        self._reader.join()
        self.proc.wait()
        if self.error is not None or self.final is None:
            raise TextbookError(f"{self.stage}: judging failed: {self.error or 'no result from the judging process'}")
        self.final["diversity"]["requests_not_sent_per_cell"] = dict(self.not_sent)  # the guard never sees them
        return self.final

    def judge_requests(self, setup: Any, requests: list[LLMRequest], cfg: Any, state_dir: str | Path,
                       pool: Any = None) -> tuple[Any, dict[str, Any]]:
        """Start judging with `setup`, send `requests` through the LLM layer (the judge decides what is still worth
        sending per cell and receives every answer), then close: (RunSummary, the judge's final stats). Any
        failure aborts the judging process; `pool` (prestarted workers) is closed either way. `cfg` is the run's
        config (llm, budget); the local server's log goes under `state_dir`/llm-server."""
        from pipeline.llm.runner import run_requests

        try:
            self.start(setup)
            summary = run_requests(requests, cfg.llm, cfg.budget, cfg.llm.ledger_path(),
                                   should_send=lambda req: self.should_send(req.tag["cell"]),
                                   on_result=self.put, progress=True, pool=pool,
                                   server_log_dir=Path(state_dir) / "llm-server")
            return summary, self.close()
        except BaseException:
            self.abort()
            raise
        finally:
            if pool is not None:
                pool.close()  # run_requests closes it too; this covers a failure before the run

    def abort(self) -> None:
        """After a failure in the driver: stop the child without waiting for it to write anything."""
        self.proc.kill()
        self.proc.wait()
        self._queue.put(None)  # lets the sender thread end, if it started
