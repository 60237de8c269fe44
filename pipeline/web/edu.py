"""The web stage's educational-value cut, taken after scoring: a second pass over the scored documents.

With `web.edu.filter`, the datatrove tasks score every page that passed the other filters and write it to
`out/scored/` (fate `scored` in their ledgers); no page is dropped for its score inside a task. When every task
is done, `apply_edu_cut` reads the stored scores and splits `out/scored/` into `out/kept/` and `out/removed/`,
so the cut can depend on the whole run and changing it never re-scores:

- `keep_top` with `keep_top_of: run` (the default): the top `keep_top` fraction of the pages this run scored,
  exactly round(keep_top x scored) pages, ranked by score; ties at the cut are broken by a hash of the page's
  provenance (input file, offset, id), so the same input keeps the same pages whatever the task split.
- `keep_top` with `keep_top_of: calibration`: the score that keeps that fraction of the model's calibration
  sample (recorded in classifier.json); the share of this run it keeps can be far from `keep_top`.
- `threshold`: that score; neither: the model's recorded default cut-off.

A page a guard stopped (`meta.edu_guard`) is never kept, whatever the rule (`guard_<gate>`); a page below the
cut is dropped as `below_cutoff`. The pass writes a ledger (`out/ledger/edu_cut.json`) in the format of the
tasks' ledgers, and its counts per input file must equal the `scored` counts of the tasks (else TextbookError).
Re-running it first removes what an earlier pass wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TextbookError

LEDGER = "edu_cut.json"
PREFIX = "edu"  # out/kept/edu-*.parquet, out/removed/edu-*.parquet


def _meta(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    try:
        m = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _tiebreak(meta: dict[str, Any]) -> int:
    """Stable per-page key from its provenance (independent of how pages were split between tasks)."""
    key = json.dumps([meta.get("input_file"), meta.get("input_offset"), meta.get("source_id")], default=str)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def rule_of(edu: Any, model_dir: str | None) -> dict[str, Any]:
    """{'rule', 'cutoff' (None for a run cut), 'keep_top', 'keep_top_of'} from the `web.edu` config."""
    if edu.keep_top is not None and edu.keep_top_of == "run":
        return {"rule": f"keep the top {edu.keep_top:.0%} of the pages this run scored", "cutoff": None,
                "keep_top": edu.keep_top, "keep_top_of": "run"}
    from pipeline.classify.datatrove_steps import EduScoreFilter

    threshold = edu.threshold
    keep_top = edu.keep_top if edu.keep_top_of == "calibration" else None
    cutoff, how = EduScoreFilter._cutoff(threshold, keep_top, model_dir)
    if keep_top is not None:
        how = f"keep_top {keep_top:.0%} of the model's calibration sample"
    return {"rule": f"score >= {cutoff:.4g} ({how})", "cutoff": float(cutoff), "keep_top": edu.keep_top,
            "keep_top_of": edu.keep_top_of if edu.keep_top is not None else None}


def _clear(out_root: Path) -> None:
    for sub in ("kept", "removed"):
        d = out_root / sub
        if d.is_dir():
            for p in d.glob(f"{PREFIX}-*.parquet"):
                p.unlink()
    (out_root / "ledger" / LEDGER).unlink(missing_ok=True)


def _run_top_mask(files: list[Path], fraction: float) -> tuple[list[np.ndarray], float | None]:
    """Pass 1 of a run cut: which pages (per file, in row order) are among the top `fraction` of all scored
    pages, gated pages excluded; and the lowest kept score."""
    import pyarrow.parquet as pq

    scores, keys, eligible, sizes = [], [], [], []
    for f in files:
        t = pq.read_table(f, columns=["edu_score", "meta"])
        metas = [_meta(m) for m in t.column("meta").to_pylist()]
        s = t.column("edu_score").to_numpy(zero_copy_only=False).astype(np.float64)
        scores.append(np.nan_to_num(s, nan=-np.inf))
        keys.append(np.fromiter((_tiebreak(m) for m in metas), dtype=np.uint64, count=len(metas)))
        eligible.append(np.array([not m.get("edu_guard") for m in metas], dtype=bool) & ~np.isnan(s))
        sizes.append(len(metas))
    n = sum(sizes)
    if n == 0:
        return [], None
    all_s, all_k, all_e = np.concatenate(scores), np.concatenate(keys), np.concatenate(eligible)
    k = min(int(math.floor(fraction * n + 0.5)), int(all_e.sum()))
    idx = np.flatnonzero(all_e)
    order = idx[np.lexsort((all_k[idx], -all_s[idx]))][:k]
    keep = np.zeros(n, dtype=bool)
    keep[order] = True
    lowest = float(all_s[order].min()) if k else None
    return np.split(keep, np.cumsum(sizes)[:-1]), lowest


def apply_edu_cut(out_root: Path, edu: Any, model_dir: str | None, sample_rate: float = 1.0) -> dict[str, Any]:
    """Split `out_root/scored/*.parquet` into kept/ and removed/ by the rule of `edu` (the `web.edu` section);
    write the ledger; return the figures for the stage stats: rule, cutoff, scored, kept, dropped (per
    reason), keep_rate (kept / scored), keep_top, keep_top_of."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import atomic_path, atomic_write_text
    from pipeline.web.fates import sampled

    _clear(out_root)
    files = sorted((out_root / "scored").glob("*.parquet"))
    rule = rule_of(edu, model_dir)
    masks: list[np.ndarray] | None = None
    if rule["cutoff"] is None:
        masks, rule["cutoff"] = _run_top_mask(files, rule["keep_top"])
    counts: Counter[tuple[str, str, str]] = Counter()
    reasons: Counter[str] = Counter()
    for n_file, f in enumerate(files):
        table = pq.read_table(f)
        metas = [_meta(m) for m in table.column("meta").to_pylist()]
        s = table.column("edu_score").to_pylist()
        keep = np.zeros(len(metas), dtype=bool)
        why: list[str | None] = []
        for i, (m, score) in enumerate(zip(metas, s, strict=True)):
            if score is None:
                why.append("unscored")
            elif m.get("edu_guard"):
                why.append(f"guard_{m['edu_guard']}")
            elif (masks[n_file][i] if masks is not None else score >= rule["cutoff"]):
                keep[i] = True
                why.append(None)
            else:
                why.append("below_cutoff")
        for m, w in zip(metas, why, strict=True):
            file = m.get("input_file") or "?"
            counts[(file, "kept", "") if w is None else (file, "dropped", "edu")] += 1
            if w is not None:
                reasons[w] += 1
        if keep.any():
            with atomic_path(out_root / "kept" / f"{PREFIX}-{f.name}") as tmp:
                pq.write_table(table.filter(pa.array(keep)), tmp, compression="zstd")
        drop = [w is not None and sampled(str(m.get("source_id")), sample_rate) for m, w in zip(metas, why, strict=True)]
        if any(drop):
            removed = table.filter(pa.array(drop))
            text = [f"edu: {w}" for w, d in zip(why, drop, strict=True) if d]
            removed = removed.set_column(removed.schema.get_field_index("reason"), "reason",
                                         pa.array(text, type=pa.string()))
            with atomic_path(out_root / "removed" / f"{PREFIX}-{f.name}") as tmp:
                pq.write_table(removed, tmp, compression="zstd")
    ledger = {"step": "edu_cut", "rank": -1,
              "counts": [[file, fate, reason, n] for (file, fate, reason), n in sorted(counts.items())],
              "detail": {f"edu: {w}": n for w, n in sorted(reasons.items())}}
    atomic_write_text(out_root / "ledger" / LEDGER, json.dumps(ledger) + "\n")
    scored = sum(counts.values())
    kept = sum(n for (_, fate, _), n in counts.items() if fate == "kept")
    return {**rule, "scored": scored, "kept": kept, "dropped": dict(sorted(reasons.items())),
            "keep_rate": kept / scored if scored else None}


def check_reconciled(scored_per_file: dict[str, int], out_root: Path) -> None:
    """The cut's kept + dropped per input file must equal what the tasks scored (TextbookError otherwise)."""
    path = out_root / "ledger" / LEDGER
    cut: Counter[str] = Counter()
    if path.is_file():
        for file, _fate, _reason, n in json.loads(path.read_text())["counts"]:
            cut[file] += n
    if dict(cut) != {k: v for k, v in scored_per_file.items() if v}:
        raise TextbookError(f"web.edu: the cut's counts per file {dict(cut)} differ from the scored counts "
                            f"{scored_per_file} (state in {out_root}); re-run with --force")
