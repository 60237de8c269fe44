"""The generate stage's fixed start-up (issue 20): what the driver imports before its first request, and the
judging process building its validator while the driver plans. Throughput of the whole command is measured by
`benchmarks/bench_generate.py --command` (results in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.config import load_config
from pipeline.generate.judge import Judge, JudgeProcess, JudgeSetup
from pipeline.generate.stage import plan


def test_the_driver_imports_no_pyarrow_numpy_or_openai_until_it_needs_them():
    """pyarrow and numpy are the judging process's (it writes the documents, it runs the diversity guard);
    openai is imported by the worker, which starts while the judge loads. Importing them in the driver put
    them on the critical path before the first request."""
    code = ("import sys, json; import pipeline.cli, pipeline.run, pipeline.generate.stage, pipeline.generate.judge, "
            "pipeline.llm.runner, pipeline.config; "
            "print(json.dumps(sorted(m for m in ('pyarrow', 'numpy', 'openai', 'jinja2', 'torch') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_a_preloaded_validator_is_the_one_the_judge_uses(tmp_path):
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "generate.n=2", "generate.web_seed_fraction=0"])
    Judge.preload(cfg)
    preloaded = Judge._preloaded[Judge._validator_key(cfg)]
    p = plan(cfg, [])
    setup = JudgeSetup(cfg, tmp_path / "kept", tmp_path / "removed", p.specs, {k: f.prompt_id for k, f in
                                                                               p.formats.items()})
    judge = Judge(setup)
    assert judge.validator is preloaded and Judge._validator_key(cfg) not in Judge._preloaded
    other = load_config(None, [f"run.out={tmp_path / 'out'}", "generate.n=2", "generate.min_tokens=7"])
    Judge.preload(other)  # other settings: not used for this setup
    assert Judge(setup).validator is not Judge._preloaded[Judge._validator_key(other)]
    Judge._preloaded.clear()


def test_the_judging_process_preloads_then_judges_and_reports(tmp_path):
    """Through the real child process: preload, setup, no results, close: the accounting comes back and the
    child has exited (it skips its interpreter teardown once it has reported)."""
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "generate.n=2", "generate.web_seed_fraction=0"])
    p = plan(cfg, [])
    judge = JudgeProcess()
    judge.preload(cfg)
    judge.start(JudgeSetup(cfg, tmp_path / "kept", tmp_path / "removed", p.specs,
                           {k: f.prompt_id for k, f in p.formats.items()}))
    final = judge.close()
    assert final["stats"]["read"] == 0 and judge.proc.returncode == 0
