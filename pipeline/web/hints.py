"""Why the web stage kept nothing, in words a user can act on (`pipeline.run` asks when a later stage has no input).

The usual cause on record files (jsonl, json, parquet, a Hugging Face dataset) is the text field: the reader takes
`web.text_key` (default `text`; `web.sources[].text_key` per source), and a file whose `text` is a short snippet,
with the page in another field, loses every record to `min_length`. So when a length filter dropped most pages,
this looks at the first records of each input file and names the field that holds the longer text.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

# Filters whose drops mean "the text read was too short" (the text field is the usual suspect).
LENGTH_FILTERS = ("min_length", "gopher_quality", "c4_quality")
PEEK_RECORDS = 50
PEEK_FILES = 3


def explain_empty(cfg: Any, stats: dict[str, Any]) -> list[str]:
    """Hint lines for a web stage that kept no page: what dropped them, and the setting to change.

    `cfg` is the run config, `stats` the web stage's stats.json. Reads at most PEEK_RECORDS records of at most
    PEEK_FILES input files; never raises (an input it cannot read gives no field hint)."""
    section = cfg.web
    read, kept = int(stats.get("read", 0)), int(stats.get("kept", 0))
    if kept:
        return []
    if read == 0:
        return ["web read no record from its inputs (web.inputs, web.sources): check the paths and their types"]
    dropped: dict[str, int] = stats.get("dropped", {})
    length_drops = sum(dropped.get(f, 0) for f in LENGTH_FILTERS)
    if length_drops * 2 < read:
        top = max(dropped.items(), key=lambda kv: kv[1], default=None)
        return [f"web: '{top[0]}' dropped {top[1]:,} of {read:,} pages; its settings are under "
                f"web.filters.{top[0]} (or web.edu)"] if top else []
    lines = [f"web: {length_drops:,} of {read:,} pages were too short for the length filters "
             f"(web.filters.min_length.min_chars={section.filters.min_length.min_chars}, "
             f"min_words={section.filters.min_length.min_words}). On jsonl, json, parquet or Hugging Face records the "
             f"page text is read from the field named by web.text_key (now '{section.text_key}'; "
             "web.sources[].text_key per source)"]
    lines += _field_hints(section)
    return lines


def _field_hints(section: Any) -> list[str]:
    """`file: field 'content' holds longer text (mean N chars) than 'text' (mean M chars): --set web.text_key=content`."""
    from pipeline.web.units import plan_units

    try:
        units, _ = plan_units(section, tasks=1)
    except Exception:  # noqa: BLE001 - a hint must never be the error
        return []
    out = []
    for unit in [u for u in units if u.kind in ("jsonl", "json", "parquet")][:PEEK_FILES]:
        lengths = _string_field_lengths(Path(unit.path), unit.kind)
        if not lengths:
            continue
        mean = {k: sum(v) / len(v) for k, v in lengths.items()}
        current = mean.get(unit.text_key, 0.0)
        best = max(mean, key=lambda k: mean[k])
        if best != unit.text_key and mean[best] >= 2 * current and mean[best] >= section.filters.min_length.min_chars:
            setting = (f"web.text_key to '{best}' (--set web.text_key={best})" if unit.text_key == section.text_key
                       else f"this source's web.sources[].text_key to '{best}'")
            out.append(f"{unit.path}: field '{best}' holds the longer text (mean {mean[best]:,.0f} characters) and "
                       f"'{unit.text_key}' a short one (mean {current:,.0f}): set {setting}")
    return out


def _string_field_lengths(path: Path, kind: str) -> dict[str, list[int]]:
    """Lengths of every top-level string field over the first PEEK_RECORDS records of a file ({} if unreadable)."""
    lengths: dict[str, list[int]] = defaultdict(list)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(path).iter_batches(batch_size=PEEK_RECORDS), None)
            records = batch.to_pylist() if batch is not None else []
        else:
            from pipeline.textio import Gap, iter_json_records

            records = [r.value for r in itertools.islice(iter_json_records(path), PEEK_RECORDS)
                       if not isinstance(r, Gap) and isinstance(r.value, dict)]
    except Exception:  # noqa: BLE001 - a hint must never be the error
        return {}
    for rec in records:
        for k, v in rec.items():
            if isinstance(v, str):
                lengths[k].append(len(v))
    return dict(lengths)
