"""An experiment repeated over seeds, in one table: each arm's mean ± sd, and a recipe's lead over
its control.

A comparison counts only beyond the spread over seeds (docs/results.md, "The benchmarks"), so a
study runs the same experiment with ``run.seed=0,1,2`` into one folder each and summarises the
folders here. An arm ``X`` with an arm ``X-control`` beside it gets its relative lead,
``(control − X) / control``, in each folder (the same seed), then mean ± sd. When those arms
trained on different numbers of subjects (``eerpipe experiment subjects``), the lead is plotted
against the subjects and its trend, linear in log subjects, extrapolated with a 95 % prediction
interval: the question a 1,000-subject study asks about a 100,000-subject corpus.

One experiment run once per loss (the batch-size sweep with ``loss.name=eer``, then
``loss.name=multisimilarity``) has the same arms in every folder but other losses: each loss is a
series of its own, summarised beside the others, and when the arms differ in their batch, the
test EER of every series is plotted against the sessions per step (``batch.png``): whether one
loss gains more from the batch than another is read off the slopes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.experiment import CONTROL_SUFFIX

METRICS = {  # results.json key: the table's title; the validation split's, then the test split's
    "final_val_eer": "final val EER", "eer": "EER", "kvc_eer": "KVC EER",
    "per_subject_eer": "per-subject EER", "kvc_per_subject_eer": "KVC per-subject EER",
    "fnmr_at_fmr_1%": "FNMR@1%FMR", "fnmr_at_fmr_0.1%": "FNMR@0.1%FMR",
    "kvc_fnmr_at_fmr_1%": "KVC FNMR@1%FMR", "kvc_fnmr_at_fmr_0.1%": "KVC FNMR@0.1%FMR",
}
LEAD_METRICS = ("eer", "kvc_eer")  # the test EER under both protocols


@dataclass(frozen=True)
class Trend:
    """``lead = intercept + slope · log10(subjects)``, fitted on every seed's lead."""

    intercept: float
    slope: float
    at: int  # subjects of the prediction
    predicted: float
    low: float  # 95 % prediction interval of one more seed's lead there
    high: float


def summarize(folders: list[Path], out: Path, predict_at: int | None = None) -> dict[str, Any]:
    """Write ``summary.md``, ``summary.json`` and, for leads at several training-set sizes,
    ``lead.png`` in ``out``, for all test subjects and for each participant list the experiment
    scored (``--participants``: ``lead-NAME.png``); with arms at several batches, ``batch.png``.
    Return the summary: per part, or per series (loss) and then per part when there are several."""
    runs = [_arms(folder) for folder in folders]
    names = list(runs[0])
    for folder, run in zip(folders, runs):
        if set(run) != set(names):
            raise ValueError(f"{folder}: its arms {sorted(run)} differ from {folders[0]}'s {sorted(names)}: "
                             "summarise folders of the same experiment")
    out.mkdir(parents=True, exist_ok=True)
    series = _series(runs)
    summary: dict[str, Any] = {"folders": [str(folder) for folder in folders]}
    text, batches = [], {}
    for label, members in series.items():
        parts, markdown = _summarize_series(members, out, predict_at, label if len(series) > 1 else "")
        summary.update({label: parts} if len(series) > 1 else parts)
        text.append(markdown)
        batches[label] = parts["all"]["arms"]
    if _differ_in_batch(next(iter(batches.values()))):
        _plot_batches(batches, out / "batch.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(text))
    return summary


def _series(runs: list[dict[str, dict[str, Any]]]) -> dict[str, list[dict[str, dict[str, Any]]]]:
    """The folders' runs grouped by their arms' losses, named by those losses."""
    series: dict[str, list[dict[str, dict[str, Any]]]] = {}
    for run in runs:
        losses = sorted({str(row.get("loss", "")) for row in run.values()})
        series.setdefault(", ".join(losses), []).append(run)
    return series


def _summarize_series(runs: list[dict[str, dict[str, Any]]], out: Path, predict_at: int | None,
                      label: str) -> tuple[dict[str, Any], str]:
    """One series' summary, per part (every test subject, then each participant list's), and its
    markdown; its lead plots named after the part (and the series, when there are several)."""
    names = list(runs[0])
    summary, text = {}, []
    for part in [None, *runs[0][names[0]].get("groups", {})]:
        rows = [_arm_row(name, [_metrics(run[name], part) for run in runs]) for name in names]
        leads = [_lead_row(name, runs, part) for name in names if f"{name}{CONTROL_SUFFIX}" in runs[0]]
        sizes = {lead["train_subjects"] for lead in leads}
        trends = {metric: _trend(leads, metric, predict_at) for metric in LEAD_METRICS} if len(sizes) > 1 else {}
        summary[part or "all"] = {"arms": rows, "leads": leads,
                                  "trends": {metric: trend.__dict__ for metric, trend in trends.items() if trend}}
        title = "all test subjects" if part is None else f"the test subjects of {part}"
        text.append(f"## {label + ': ' if label else ''}{title}\n\n" + _markdown(rows, leads, trends, len(runs)))
        if len(sizes) > 1:
            name = "-".join(["lead", *([label.replace(", ", "_")] if label else []), *([part] if part else [])])
            _plot_leads(leads, trends, out / f"{name}.png", title)
    return summary, "\n".join(text)


def _arms(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{path}: no experiment results (eerpipe experiment … --out {folder} writes them)")
    return {row["arm"]: row for row in json.loads(path.read_text())["arms"]}


def _metrics(row: dict[str, Any], part: str | None) -> dict[str, Any]:
    """An arm's results on every test subject (``part`` None) or on one participant list's."""
    return row if part is None else {**row, **row["groups"][part]}


def _arm_row(name: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"arm": name, "seeds": len(seeds)}
    for key in ("train_subjects", "steps", "sessions"):
        row[key] = seeds[0].get(key)
    for key in METRICS:
        row[key] = _mean_sd([seed[key] for seed in seeds])
    return row


def _lead_row(name: str, runs: list[dict[str, dict[str, Any]]], part: str | None) -> dict[str, Any]:
    """The relative lead of arm ``name`` over its control, in each folder, then mean ± sd."""
    row: dict[str, Any] = {"arm": name, "train_subjects": runs[0][name].get("train_subjects")}
    control = f"{name}{CONTROL_SUFFIX}"
    for key in LEAD_METRICS:
        per_seed = [1 - _metrics(run[name], part)[key] / _metrics(run[control], part)[key] for run in runs]
        row[key] = {"per_seed": per_seed, "mean_sd": _mean_sd(per_seed)}
    return row


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (none from one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _trend(leads: list[dict[str, Any]], metric: str, predict_at: int | None) -> Trend | None:
    """Least squares over every (log10 subjects, seed's lead) point; the interval is Student's t
    for one new observation at ``predict_at`` (none without a size to predict at or with fewer
    than three points)."""
    from scipy import stats

    x = np.array([math.log10(lead["train_subjects"]) for lead in leads for _ in lead[metric]["per_seed"]])
    y = np.array([value for lead in leads for value in lead[metric]["per_seed"]])
    if predict_at is None or len(x) < 3:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    scale = math.sqrt(float(residual @ residual) / (len(x) - 2))
    at = math.log10(predict_at)
    spread = scale * math.sqrt(1 + 1 / len(x) + (at - x.mean()) ** 2 / float(((x - x.mean()) ** 2).sum()))
    predicted, half = intercept + slope * at, float(stats.t.ppf(0.975, len(x) - 2)) * spread
    return Trend(float(intercept), float(slope), predict_at, float(predicted), float(predicted - half),
                 float(predicted + half))


def _pct(value: tuple[float, float | None]) -> str:
    mean, sd = value
    return f"{100 * mean:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def _markdown(rows: list[dict[str, Any]], leads: list[dict[str, Any]], trends: dict[str, Trend | None],
              folders: int) -> str:
    lines = [f"Mean ± sample sd over {folders} folders (seeds), %: the validation EER at the end of training "
             "(choose on it), then the test split's metrics.", "",
             "| arm | training subjects | steps | sessions | " + " | ".join(METRICS.values()) + " |",
             "|:--|" + "--:|" * (3 + len(METRICS))]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['train_subjects']} | {row['steps']} | {row['sessions']} | "
                     + " | ".join(_pct(row[key]) for key in METRICS) + " |")
    if leads:
        lines += ["", f"Relative lead over the `{CONTROL_SUFFIX}` arm, 1 − EER / control's EER, %:", "",
                  "| arm | training subjects | session EER lead | KVC EER lead |", "|:--|--:|--:|--:|"]
        lines += [f"| {lead['arm']} | {lead['train_subjects']} | {_pct(lead['eer']['mean_sd'])} | "
                  f"{_pct(lead['kvc_eer']['mean_sd'])} |" for lead in leads]
    for metric, trend in trends.items():
        if trend:
            lines += ["", f"{METRICS[metric]} lead = {100 * trend.intercept:.2f} {100 * trend.slope:+.2f} · "
                      f"log10(subjects) %; at {trend.at:,} subjects {100 * trend.predicted:.1f} % (95 % prediction "
                      f"interval {100 * trend.low:.1f} … {100 * trend.high:.1f} %)"]
    return "\n".join(lines) + "\n"


def _plot_leads(leads: list[dict[str, Any]], trends: dict[str, Trend | None], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    subjects = [lead["train_subjects"] for lead in leads]
    for metric in LEAD_METRICS:
        means = [100 * lead[metric]["mean_sd"][0] for lead in leads]
        spreads = [100 * (lead[metric]["mean_sd"][1] or 0) for lead in leads]
        line = axes.errorbar(subjects, means, yerr=spreads, marker="o", capsize=3, label=METRICS[metric])
        trend = trends.get(metric)
        if trend:
            xs = np.geomspace(min(subjects), trend.at, 50)
            axes.plot(xs, 100 * (trend.intercept + trend.slope * np.log10(xs)), linestyle="--",
                      color=line[0].get_color(), alpha=0.6)
            axes.errorbar([trend.at], [100 * trend.predicted], yerr=[[100 * (trend.predicted - trend.low)],
                          [100 * (trend.high - trend.predicted)]], marker="s", capsize=3, color=line[0].get_color())
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set(xscale="log", xlabel="training subjects", ylabel="test EER lead over the control, % (mean ± sd)",
             title=f"Lead against training subjects: {title}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def _sessions_per_step(row: dict[str, Any]) -> float:
    return row["sessions"] / row["steps"]


def _differ_in_batch(rows: list[dict[str, Any]]) -> bool:
    """Arms that trained the same subjects on batches of different sizes: a batch sweep."""
    return len({row["train_subjects"] for row in rows}) == 1 and len({_sessions_per_step(row) for row in rows}) > 1


def _plot_batches(series: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Each series' test EER (mean ± sd over seeds) against its arms' sessions per step, one panel
    per protocol."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.6, 4.2), layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(LEAD_METRICS)), LEAD_METRICS):
        for label, rows in series.items():
            rows = sorted(rows, key=_sessions_per_step)
            axes.errorbar([_sessions_per_step(row) for row in rows], [100 * row[metric][0] for row in rows],
                          yerr=[100 * (row[metric][1] or 0) for row in rows], marker="o", capsize=3, label=label)
        axes.set(xlabel="sessions per step (global batch)", ylabel=f"test {METRICS[metric]}, %",
                 title=f"{METRICS[metric]} against the batch, mean ± sd")
        axes.set_xscale("log", base=2)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
