"""Statistics and reports of `textbook ablate`: per-arm figures over seeds, per-seed paired differences
against a baseline arm with a t-interval, results.md, and the learning-curve plot.

Every evaluation figure a run logs as `eval/<set>/<metric>` is compared when its metric has a known
direction (`METRICS`: bits per byte lower is better, accuracy higher is better). A paired difference pairs
the two arms' runs with the same seed (same initialisation and data order, same evaluation data), so the
seed-to-seed noise they share cancels; its interval is the Student t-interval over seeds,
mean ± t(0.975, n-1) · sd / √n. With one seed there is no spread to measure and the report says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# metric -> (direction, label); other metrics a run logs (acc_stderr, chance, n, loss) are not compared
METRICS: dict[str, tuple[str, str]] = {
    "bpb": ("lower", "bits per byte"),
    "answer_bpb": ("lower", "bits per byte of the right answer"),
    "acc": ("higher", "accuracy"),
    "acc_norm": ("higher", "accuracy, length-normalised"),
}
NO_SPREAD = "no spread measured (1 seed)"
PLOTTED = ("bpb", "answer_bpb", "acc_norm")  # the plot leaves out acc (acc_norm's companion; results.md has it)


def split_key(key: str) -> tuple[str, str] | None:
    """('heldout-edu', 'bpb') from 'eval/heldout-edu/bpb'; None for a key that is not a compared metric."""
    if not key.startswith("eval/"):
        return None
    rest = key[len("eval/"):]
    if "/" not in rest:
        return None
    name, metric = rest.rsplit("/", 1)
    return (name, metric) if metric in METRICS else None


def t_quantile(p: float, df: int) -> float:
    """Student t quantile: the value below which a t variable with `df` degrees of freedom falls with
    probability p (scipy.special.stdtrit, the inverse of the t CDF; t_quantile(0.975, 2) = 4.3027)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def describe(values: Mapping[int, float]) -> dict[str, Any]:
    """Mean, sample std (None with one value), min, max and the per-seed values of one arm and metric."""
    vals = list(values.values())
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "seeds": {str(k): v for k, v in sorted(values.items())}}


def paired_difference(base: Mapping[int, float], other: Mapping[int, float], direction: str = "lower",
                      level: float = 0.95) -> dict[str, Any]:
    """`other` minus `base` over the seeds both have: mean difference, its sd and the t-interval at `level`.

    direction: "lower" or "higher" is better, for the verdict: "better" / "worse" when the interval excludes
    0, "no difference beyond the interval" when it does not, NO_SPREAD with one common seed, "no common
    seeds" with none. sd, se and the interval are None below two seeds (never a zero-width interval)."""
    seeds = sorted(set(base) & set(other))
    d = [other[s] - base[s] for s in seeds]
    out: dict[str, Any] = {"n": len(d), "seeds": seeds, "diffs": d, "mean": None, "sd": None, "se": None,
                           "ci": None, "level": level}
    if not d:
        out["verdict"] = "no common seeds"
        return out
    out["mean"] = statistics.fmean(d)
    if len(d) < 2:
        out["verdict"] = NO_SPREAD
        return out
    sd = statistics.stdev(d)
    se = sd / math.sqrt(len(d))
    half = t_quantile(0.5 + level / 2, len(d) - 1) * se
    lo, hi = out["mean"] - half, out["mean"] + half
    out.update(sd=sd, se=se, ci=[lo, hi])
    if lo > 0 or hi < 0:
        good = (hi < 0) == (direction == "lower")
        out["verdict"] = "better" if good else "worse"
    else:
        out["verdict"] = "no difference beyond the interval"
    return out


def fmt_cell(c: Mapping[str, Any] | None, digits: int = 4) -> str:
    """'2.7081 ± 0.0210' (mean ± std over seeds) or '2.7081 (1 seed: no spread measured)'."""
    if not c:
        return "n/a"
    if c["std"] is None:
        return f"{c['mean']:.{digits}f} (1 seed: no spread measured)"
    return f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"


def fmt_paired(p: Mapping[str, Any] | None, base: str, digits: int = 4) -> tuple[str, str]:
    """('+0.0432 [+0.0100, +0.0764]', 'worse than web') for the difference column and the verdict column."""
    if not p or p["mean"] is None:
        return "n/a", (p or {}).get("verdict", "n/a")
    if p["ci"] is None:
        return f"{p['mean']:+.{digits}f} (no interval)", p["verdict"]
    lo, hi = p["ci"]
    verdict = p["verdict"] + (f" than {base}" if p["verdict"] in ("better", "worse") else "")
    return f"{p['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]", verdict


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: per evaluation figure, a table of arms (mean ± std over seeds, each seed, the paired
    difference against the baseline with its interval and verdict, and the unigram baseline for bits per
    byte), then the arms' own validation splits, the runs' status and the checks."""
    base = results["baseline"]
    level = int(round(results.get("level", 0.95) * 100))
    seeds = ", ".join(map(str, results["seeds"]))
    m = results.get("model") or {}
    lines = [f"# Ablation {results['name']}", ""]
    head = f"{results['tokens_per_run']:,} training tokens per run, seeds {seeds}."
    if m:
        head += (f" Model: {m['params']:,} parameters, {m['blocks_share']:.0%} of them in the transformer blocks "
                 f"({m['n_layers']} x {m['dim']}, vocabulary {m['vocab_size']:,}).")
    lines += [head, "",
              f"Baseline arm: **{base}**. Δ is the paired difference (arm minus {base}, same seed, same evaluation "
              f"data), its mean over seeds and the {level} % t-interval; a verdict needs the interval to exclude 0.",
              ""]
    st = results["status"]
    lines.append(f"Runs finished: {st['finished']} of {st['expected']}.")
    for label, key in (("not run yet", "missing"), ("made with another config (ignored)", "stale")):
        if st.get(key):
            lines.append(f"- {label}: " + ", ".join(f"{r['arm']} seed {r['seed']}" for r in st[key]))
    lines.append("")
    lines += controls_markdown(results, level)
    for key in results["metrics"]:
        name, metric = split_key(key) or ("?", "?")
        direction, label = METRICS[metric]
        lines += [f"## {name}: {label} ({direction} is better)", ""]
        unigram = metric == "bpb" and any(name in (a.get("unigram") or {}) for a in results["arms"].values())
        cols = ["arm", "mean ± std over seeds", "per seed", f"Δ vs {base} [{level} % CI]", "verdict"]
        cols += ["unigram bpb (arm's token frequencies)"] if unigram else []
        lines += ["| " + " | ".join(cols) + " |", "|---|---:|---|---:|---|" + ("---:|" if unigram else "")]
        for arm, row in results["arms"].items():
            c = row["metrics"].get(key)
            per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in c["seeds"].items()) if c else ""
            if arm == base:
                diff, verdict = "(baseline)", ""
            else:
                diff, verdict = fmt_paired(results["paired"].get(key, {}).get(arm), base)
            cells = [arm, fmt_cell(c), per_seed, diff, verdict]
            if unigram:
                u = (row.get("unigram") or {}).get(name)
                cells.append("n/a" if u is None else f"{u:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        if unigram:
            lines += ["", "A model at or above its unigram figure has learned nothing beyond token frequencies."]
        chance = (results.get("chance") or {}).get(name)
        if chance is not None and metric in ("acc", "acc_norm"):
            lines += ["", f"Chance: {chance:.4f} (mean of 1 / number of answers)."]
        lines.append("")
    own = {a: r["own_validation"] for a, r in results["arms"].items() if r.get("own_validation")}
    if own:
        lines += ["## Own validation split (each arm's own held-out text: not comparable across arms)", "",
                  "| arm | bits per byte | data epochs | training tokens available |", "|---|---:|---:|---:|"]
        for arm, c in own.items():
            row = results["arms"][arm]
            lines.append(f"| {arm} | {fmt_cell(c)} | {row.get('data_epochs')} | "
                         f"{row.get('train_tokens_available') or 0:,} |")
        lines.append("")
    checks = list(results.get("checks") or [])
    if any((r.get("data_epochs") or 0) > 1 for r in results["arms"].values()):
        checks.append("an arm with data epochs > 1 repeated its data to reach the token budget")
    if checks:
        lines += ["## Checks", ""] + [f"- {c}" for c in checks] + [""]
    return "\n".join(lines)


def controls_markdown(results: Mapping[str, Any], level: int) -> list[str]:
    """The controls section of results.md: can this harness, at this budget, tell data known to differ apart?
    One row per compared figure (high-label arm minus low-label arm, paired by seed) and a verdict sentence on
    the controls' held-out set; empty without controls."""
    c = results.get("controls")
    if not c:
        return []
    high, low = c["high"], c["low"]
    lines = [f"## Controls: does the harness separate data known to differ? ({high} minus {low})", ""]
    sep, held = c.get("separated"), c.get("eval_set")
    if sep is True:
        lines.append(f"**Yes**: {high} beats {low} beyond the {level} % interval on {held}; differences between the "
                     "arms at this budget can be read.")
    elif sep is False:
        lines.append(f"**No**: on {held} the interval of {high} minus {low} includes 0 (or favours {low}); at this "
                     "budget the harness does not separate data known to differ, so do not read a difference "
                     "between the other arms as a data effect.")
    else:
        lines.append(f"Not known yet: the controls' paired difference on {held or 'a held-out set'} needs both "
                     "control arms trained with two or more common seeds.")
    lines += ["", f"| figure | Δ {high} − {low} [{level} % CI] | verdict | per seed |", "|---|---:|---|---|"]
    for key, p in c["paired"].items():
        name, metric = split_key(key) or ("?", "?")
        diff, verdict = fmt_paired(p, low)
        per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(p["seeds"], p["diffs"], strict=True))
        lines.append(f"| {name} {metric} ({METRICS[metric][0]} is better) | {diff} | {verdict} | {per_seed} |")
    return lines + [""]


def _tokens_label(x: float, _pos: Any = None) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def plot(results: Mapping[str, Any], curves: Mapping[str, list[dict[str, list[tuple[int, float]]]]],
         path: Path) -> None:
    """ablation.png: one panel per plotted figure (set x metric in PLOTTED); per arm the mean over seeds against
    training tokens from the step-0 evaluation on, a band from the seeds' min to max, and for bits per byte
    the arm's unigram baseline as a dashed line of the same colour; accuracy panels show chance dotted.

    curves: arm -> one dict per seed, key -> [(tokens, value), ...] (from each run's log.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    keys = [k for k in results["metrics"] if (split_key(k) or ("", ""))[1] in PLOTTED]
    if not keys:
        return
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9}):
        fig, axes = plt.subplots(nrow, ncol, figsize=(max(6.5 * ncol, 7.5), 4.6 * nrow + 0.6), squeeze=False,
                                 layout="constrained")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax in axes.flat[len(keys):]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys, strict=False):
            name, metric = split_key(key) or ("?", "?")
            direction, label = METRICS[metric]
            for i, (arm, runs) in enumerate(curves.items()):
                color = colors[i % len(colors)]
                series = [dict(r.get(key, [])) for r in runs]
                series = [s for s in series if s]
                if not series:
                    continue
                xs = sorted(set.intersection(*(set(s) for s in series)))
                if not xs:
                    continue
                ys = np.array([[s[x] for x in xs] for s in series])
                n = len(series)
                ax.plot(xs, ys.mean(0), marker="o", markersize=3, color=color,
                        label=f"{arm} ({n} seed{'s' if n > 1 else ''})")
                if len(series) > 1:
                    ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.18, color=color)
                u = (results["arms"].get(arm, {}).get("unigram") or {}).get(name) if metric == "bpb" else None
                if u is not None:
                    ax.axhline(u, color=color, linestyle="--", linewidth=1, alpha=0.8, label=f"{arm}: unigram")
            chance = (results.get("chance") or {}).get(name)
            if chance is not None and metric in ("acc", "acc_norm"):
                ax.axhline(chance, color="grey", linestyle=":", linewidth=1.2, label="chance")
            ax.set_title(f"{name}: {label}\n({direction} is better)")
            ax.set_xlabel("training tokens")
            ax.set_ylabel(label)
            ax.xaxis.set_major_formatter(FuncFormatter(_tokens_label))
            ax.grid(alpha=0.3)
            ax.legend(loc="best", frameon=False)
        fig.suptitle(f"ablation {results['name']}: {results['tokens_per_run']:,} training tokens per run\n"
                     "line: mean over seeds; band: the seeds' min..max; dashed: unigram baseline", fontsize=11)
        from pipeline.io import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
