"""Pictures of a run and of its evaluations: error rates per language (one result, before/after, or per
checkpoint), training curves, and word alignments.

Why these and not more: a newcomer looks for three things — did the error rate go down (bars on a fixed
0-100 % axis, so two charts compare by eye, with model and step in the title), did training behave (loss and
validation WER/CER/AAS against the step), and do the aligner's boundaries sit on the words (one sample per
language, labels that never overlap, a legend). All figures are bare matplotlib ``Figure`` objects on the
Agg canvas: no pyplot global state, no display.

Entry points (plain functions, called by the stages and the evaluation hook):

* :func:`plot_error_rates` / :func:`write_before_after` — grouped bars per ``set / language``, one bar per
  result (``{"before": summary, "after": summary}`` or ``{"step 600": ..., "step 1200": ...}``), where a
  summary is ``summary.json`` (or its ``"sets"``) as :func:`qwen3asr_train.eval.report.write_summary` writes it.
* :func:`write_training_curves` — ``<run_dir>/training_curves.png`` from ``<run_dir>/logs/metrics.csv`` and
  the hook's ``<run_dir>/eval/step-<N>/summary.json`` / ``alignment_summary.json``.
* :func:`plot_alignment` + :func:`one_per_language` — alignment figures for a sample of every language.
* :func:`write_eval_index` — ``<run_dir>/eval/summary.md`` linking every picture and step summary.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

Span = tuple[float, float]
T = TypeVar("T")

ERROR_RATE_AXIS_MAX = 100.0
"""Error-rate charts always span 0-100 %: a rescaled axis makes 3 % look like 90 % next to another chart.
Rates above 100 % (insertions) are drawn at the top edge with their true value written on the bar."""

TRAINING_CURVES = "training_curves.png"
EVAL_INDEX = "summary.md"
STEP_DIR = re.compile(r"^step-(\d+)$")
RATE_METRICS = ("wer", "cer", "mer")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png", bbox_inches="tight")
    return path


def _sets_of(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{set: summarize_set(...)}`` from a ``summary.json`` payload or from its ``"sets"`` directly."""
    return summary["sets"] if "sets" in summary and "normalizer_version" in summary else summary


# ------------------------------------------------------------------------------------------- error rates


def error_rate_groups(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Bar groups and values: ``(["set / language (METRIC)", ...], {result: {group: rate %}})``.

    Groups are the speech languages (those with reference units) of every set of every result, in first-seen
    order; a set with one speech language shows only its name when every result has just that set.
    """
    groups: list[str] = []
    values: dict[str, dict[str, float]] = {}
    many_sets = len({name for summary in results.values() for name in _sets_of(summary)}) > 1
    for label, summary in results.items():
        values[label] = {}
        for set_name, s in _sets_of(summary).items():
            for lang, c in s["languages"].items():
                if not c["ref_units"] or c["rate"] is None:
                    continue
                head = f"{set_name} / {lang}" if many_sets else lang
                group = f"{head} ({c['metric'].upper()})"
                if group not in groups:
                    groups.append(group)
                values[label][group] = 100.0 * float(c["rate"])
    return groups, values


def error_rate_figure(results: Mapping[str, Mapping[str, Any]], title: str) -> Any:
    """The figure :func:`plot_error_rates` saves (tests measure its bars, axis and legend)."""
    groups, values = error_rate_groups(results)
    if not groups:
        raise ValueError(f"no speech language with reference units in {list(results)}")
    n = max(len(results), 1)
    width = 0.8 / n
    fig = _figure(max(5.0, 0.6 + len(groups) * (0.35 + 0.45 * n)), 4.0)
    ax = fig.add_subplot()
    colors = _series_colors(list(results))
    for k, label in enumerate(results):
        xs = [i + (k - (n - 1) / 2) * width for i, g in enumerate(groups) if g in values[label]]
        rates = [values[label][g] for g in groups if g in values[label]]
        bars = ax.bar(xs, [min(r, ERROR_RATE_AXIS_MAX) for r in rates], width, label=label, color=colors[label])
        ax.bar_label(bars, labels=[f"{r:.1f}" for r in rates], fontsize=7, padding=1)  # 0 % bars stay visible
    rotate = len(groups) > 4
    ax.set_xticks(range(len(groups)), groups, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylim(0, ERROR_RATE_AXIS_MAX * 1.08)  # headroom for the value labels of 100 % bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("error rate (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # outside the bars
    return fig


def plot_error_rates(path: str | Path, results: Mapping[str, Mapping[str, Any]], title: str) -> Path:
    """Grouped bars of the error rate per set/language, one bar per result, on a fixed 0-100 % axis.

    Args:
        path: PNG to write.
        results: ``{label: summary}`` in legend order (e.g. ``{"before": ..., "after": ...}``); a summary
            is ``summary.json`` or its ``"sets"`` mapping.
        title: Says what was evaluated: model and step (e.g. ``"demo_sft/export, step 1200"``).
    """
    return _save(error_rate_figure(results, title), Path(path))


def _series_colors(labels: Sequence[str]) -> dict[str, Any]:
    """Before/after in grey/blue; checkpoints along a sequential colormap (later = darker)."""
    from matplotlib import colormaps

    if list(labels) == ["before", "after"]:
        return {"before": "0.65", "after": "tab:blue"}
    if len(labels) == 1:
        return {labels[0]: "tab:blue"}
    cmap = colormaps["viridis"]
    return {label: cmap(0.15 + 0.7 * i / (len(labels) - 1)) for i, label in enumerate(labels)}


def write_before_after(results: Mapping[str, Mapping[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Before/after (or per-checkpoint) error-rate bars; ``results`` as in :func:`plot_error_rates`.

    ``out`` is the PNG path, or a folder (then ``<out>/before_after.png``). The default title names the
    compared results.
    """
    out = Path(out)
    path = out if out.suffix == ".png" else out / "before_after.png"
    return plot_error_rates(path, results, title or "error rate per language: " + " vs ".join(results))


def load_summary(path: str | Path) -> dict[str, Any]:
    """``summary.json`` of an evaluation (a file, or the folder holding it)."""
    path = Path(path)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation summary (recipe=eval or the evaluation hook writes it)")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ training curves


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` sorted by step; a step logged twice (resume) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("step"):
                continue
            try:
                step = int(float(row["step"]))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: step {row['step']!r} is not a number") from None
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series.setdefault(key, {})[step] = number
    return {key: sorted(points.items()) for key, points in series.items()}


def eval_step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The hook's ``<run_dir>/eval/step-<N>/`` folders as ``(N, path)``, by step."""
    root = Path(run_dir) / "eval"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def validation_series(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step validation numbers from the hook's step folders (any logger, even ``logger=none``).

    Keys: ``"<set> <METRIC> %"`` (corpus rate when a set's speech languages share one metric, else
    ``"<set> macro ER %"``) for ASR; ``"<set> AAS ms"`` and ``"<set> baseline AAS ms"`` for aligners.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for step, folder in eval_step_dirs(run_dir):
        if (folder / "summary.json").is_file():
            for set_name, s in _sets_of(load_summary(folder)).items():
                metrics = {c["metric"] for c in s["languages"].values() if c["ref_units"]}
                if len(metrics) == 1 and s["corpus"]["rate"] is not None:
                    key, value = f"{set_name} {metrics.pop().upper()} %", s["corpus"]["rate"]
                elif s.get("macro") is not None:
                    key, value = f"{set_name} macro ER %", s["macro"]
                else:
                    continue
                series.setdefault(key, []).append((step, 100.0 * float(value)))
        if (folder / "alignment_summary.json").is_file():
            summary = json.loads((folder / "alignment_summary.json").read_text(encoding="utf-8"))
            for set_name, langs in summary["model"].items():
                series.setdefault(f"{set_name} AAS ms", []).append((step, float(langs["all"]["aas_ms"])))
                base = summary["energy_baseline"][set_name]["all"]["aas_ms"]
                series.setdefault(f"{set_name} baseline AAS ms", []).append((step, float(base)))
    return series


def write_training_curves(run_dir: str | Path, title: str | None = None) -> Path | None:
    """``<run_dir>/training_curves.png``: training (and validation) loss, validation WER/CER, and AAS for
    aligners, against the optimizer step.

    Reads ``<run_dir>/logs/metrics.csv`` (the csv logger) and the evaluation hook's step folders. Returns
    ``None``, with an info line naming what is missing, when the run has neither (``logger=none`` without
    evaluation sets, or a run that has not logged yet): the run itself is fine, there is just nothing to draw.
    """
    run_dir = Path(run_dir)
    csv_path = run_dir / "logs" / "metrics.csv"
    logged = read_metrics_csv(csv_path) if csv_path.is_file() else {}
    validation = validation_series(run_dir)
    # Lightning writes the row of optimizer step k (counted from 1, as global_step and the hook's step folders
    # count) with step = k - 1 (its counter of stepped batches before the increment): shift it onto the same axis.
    losses = {k: [(s + 1, v) for s, v in logged[k]] for k in ("train/loss", "val/loss") if k in logged}
    rates = {k: v for k, v in validation.items() if k.endswith("%")}
    aas = {k: v for k, v in validation.items() if k.endswith("AAS ms")}
    panels = [p for p in (losses, rates, aas) if p]
    if not panels:
        log.info("no training curves for %s: no train/loss in %s and no eval/step-*/ summaries", run_dir, csv_path)
        return None
    fig = _figure(7.5, 2.6 * len(panels) + 0.4)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    k = 0
    if losses:
        ax = axes[k]
        k += 1
        for key, points in losses.items():
            steps, values = zip(*points, strict=True)
            marker = "o" if len(points) < 30 else None
            ax.plot(steps, values, label=key, marker=marker, markersize=3, linewidth=1.2)
        ax.set_ylabel("loss")
        values_all = [v for pts in losses.values() for _, v in pts]
        if min(values_all) > 0 and max(values_all) / min(values_all) > 5:  # log only for a wide range
            ax.set_yscale("log")
    if rates:
        ax = axes[k]
        k += 1
        for key, points in rates.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key, marker="o", markersize=4)
            for s, v in points:
                ax.annotate(f"{v:.1f}", (s, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        ax.set_ylim(0, max(ERROR_RATE_AXIS_MAX, max(v for pts in rates.values() for _, v in pts)) * 1.08)
        ax.set_ylabel("validation error (%)")
    if aas:
        ax = axes[k]
        for key, points in aas.items():
            steps, values = zip(*points, strict=True)
            baseline = "baseline" in key
            ax.plot(
                steps,
                values,
                label=key,
                marker=None if baseline else "o",
                markersize=4,
                linestyle="--" if baseline else "-",
            )
        ax.set_ylim(bottom=0)
        ax.set_ylabel("AAS (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("optimizer step")
    last = max(s for group in panels for pts in group.values() for s, _ in pts)
    axes[0].set_title(title or f"{run_dir.name}: training curves up to step {last}", fontsize=10)
    return _save(fig, run_dir / TRAINING_CURVES)


def write_checkpoint_comparison(run_dir: str | Path, title: str | None = None) -> Path | None:
    """``<run_dir>/eval/error_rates_by_step.png``: per-language bars for every evaluated step of an ASR run
    (``None`` when fewer than one step folder has a ``summary.json``)."""
    run_dir = Path(run_dir)
    results = {
        f"step {step}": load_summary(folder)
        for step, folder in eval_step_dirs(run_dir)
        if (folder / "summary.json").is_file()
    }
    if not results:
        return None
    return plot_error_rates(
        run_dir / "eval" / "error_rates_by_step.png",
        results,
        title or f"{run_dir.name}: error rate per language at each evaluated step",
    )


def write_eval_index(run_dir: str | Path) -> Path | None:
    """``<run_dir>/eval/summary.md``: the run's pictures and a line per evaluated step (its table and chart)."""
    run_dir = Path(run_dir)
    steps = eval_step_dirs(run_dir)
    if not steps:
        return None
    lines = [f"# Evaluations of {run_dir.name}", ""]
    if (run_dir / TRAINING_CURVES).is_file():
        lines += ["Training curves:", "", f"![training curves](../{TRAINING_CURVES})", ""]
    if (run_dir / "eval" / "error_rates_by_step.png").is_file():
        lines += [
            "Error rate per language at each evaluated step:",
            "",
            "![error rates by step](error_rates_by_step.png)",
            "",
        ]
    lines += ["| step | summary | pictures |", "|---|---|---|"]
    for step, folder in steps:
        tables = [p.name for p in (folder / "summary.md", folder / "alignment_summary.md") if p.is_file()]
        pictures = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*.png"))
        pictures += sorted(p.name for p in folder.glob("plots-*") if p.is_dir())
        links = ", ".join(f"[{t}]({folder.name}/{t})" for t in tables) or "-"
        pics = ", ".join(f"[{p}]({folder.name}/{p})" for p in pictures) or "-"
        lines.append(f"| {step} | {links} | {pics} |")
    path = run_dir / "eval" / EVAL_INDEX
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_run_plots(run_dir: str | Path) -> dict[str, Path]:
    """Everything for a run directory at once: training curves, per-step error rates, the eval index.

    Called by the evaluation hook after every evaluation and meant for the end of every run; returns the
    files written (a picture with nothing to draw is left out, see each function).
    """
    written = {
        "training_curves": write_training_curves(run_dir),
        "error_rates_by_step": write_checkpoint_comparison(run_dir),
        "index": write_eval_index(run_dir),
    }
    return {k: v for k, v in written.items() if v is not None}


# ------------------------------------------------------------------------------------------- biasing

BIASING_PANELS = (
    ("recall", "keyword recall (%)"),
    ("false_alarm_utterance_rate", "false alarms (% of utterances)"),
    ("false_alarm_rate", "false alarms (% of distractors)"),
    ("u_wer", "WER on other words (%)"),
    ("hallucination_rate", "no-speech hallucination (%)"),
)
"""The panels of the biasing chart: ``eval/biasing.py`` rate key and axis label (all on a fixed 0-100 % axis)."""


def biasing_figure(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str) -> Any:
    """The figure :func:`plot_biasing` saves: one panel per rate, x = hot-word list size (symlog, so 0 and 1,000
    share an axis), one line per set; undefined points (no distractors at size 0) are left out."""
    fig = _figure(3.6 * len(BIASING_PANELS), 3.6)
    axes = fig.subplots(1, len(BIASING_PANELS))
    colors = _series_colors(list(summary))
    sizes = sorted({int(n) for per_size in summary.values() for n in per_size})
    for ax, (key, label) in zip(axes, BIASING_PANELS, strict=True):
        for name, per_size in summary.items():
            points = sorted((int(n), 100 * e[key]) for n, e in per_size.items() if e.get(key) is not None)
            if points:
                xs, ys = [x for x, _ in points], [min(y, ERROR_RATE_AXIS_MAX) for _, y in points]
                ax.plot(xs, ys, marker="o", label=name, color=colors[name])
                for x, (_, y) in zip(xs, points, strict=True):
                    if y > ERROR_RATE_AXIS_MAX:  # drawn at the top edge, true value written (as error-rate bars)
                        ax.annotate(f"{y:.0f}", (x, ERROR_RATE_AXIS_MAX), fontsize=7, ha="center", va="bottom")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_ylim(0, ERROR_RATE_AXIS_MAX * 1.05)
        ax.set_xlabel("hot-word list size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes:  # a set may appear in some panels only (a no-speech set: hallucination only)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.4)
    return fig


def plot_biasing(path: str | Path, summary: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str) -> Path:
    """Recall, false alarms and WER on the other words against the list size (``biasing.png``).

    Args:
        path: PNG to write.
        summary: ``{set: {size: entry}}`` as ``eval.biasing.summarize`` returns it.
        title: Says what was evaluated (model and step).
    """
    return _save(biasing_figure(summary, title), Path(path))


# ------------------------------------------------------------------------------------------- alignments


def one_per_language(items: Sequence[T], language_of: Any, per_language: int = 1) -> list[int]:
    """Indices of the first ``per_language`` items of every language, in item order.

    Why: the first few utterances of a set are usually one language; a plot per language shows whether
    every language is aligned, which is what a multilingual aligner has to get right.
    """
    taken: dict[Any, int] = {}
    chosen = []
    for i, item in enumerate(items):
        lang = language_of(item)
        if taken.get(lang, 0) < per_language:
            taken[lang] = taken.get(lang, 0) + 1
            chosen.append(i)
    return chosen


def label_rows(spans: Sequence[Span], widths: Sequence[float], gap: float) -> list[int]:
    """Row (0, 1, ...) of each label so that no two labels in a row overlap.

    A label is centred on its span and ``widths[i]`` wide (in seconds at the figure's scale); greedy: the
    first row whose last label ends ``gap`` before this one starts.
    """
    ends: list[float] = []
    rows = []
    for (start, end), width in zip(spans, widths, strict=True):
        centre = (start + end) / 2
        left, right = centre - width / 2, centre + width / 2
        for row, last in enumerate(ends):
            if last + gap <= left:
                ends[row] = right
                rows.append(row)
                break
        else:
            ends.append(right)
            rows.append(len(ends) - 1)
    return rows


def alignment_figure(
    audio: np.ndarray,
    words: Sequence[str],
    pred: Sequence[Span],
    ref: Sequence[Span] | None = None,
    title: str = "",
    sample_rate: int = 16000,
) -> Any:
    """The figure :func:`plot_alignment` saves (tests measure its labels)."""
    from matplotlib.patches import Patch

    duration = max(len(audio) / sample_rate, max((e for _, e in [*pred, *(ref or [])]), default=0.0), 0.1)
    fig_width = min(max(6.0, 2.2 * duration), 40.0)
    fontsize = 8
    seconds_per_inch = duration / (fig_width * 0.8)
    char_seconds = fontsize / 72 * 0.62 * seconds_per_inch  # average glyph width at this font size
    lanes = [(ref, "tab:green", 1.0, "reference"), (pred, "tab:red", -1.0, "predicted")]
    rows_of = {
        name: label_rows(spans, [char_seconds * (len(w) + 1) for w in words], gap=char_seconds * 0.5)
        for spans, _, _, name in lanes
        if spans is not None
    }
    max_rows = max((max(r, default=0) + 1 for r in rows_of.values()), default=1)
    fig = _figure(fig_width, 2.6 + 0.5 * max_rows)
    ax = fig.add_subplot()
    top = float(np.abs(audio).max()) if len(audio) and np.abs(audio).max() > 0 else 1.0
    ax.plot(np.arange(len(audio)) / sample_rate, audio / top, color="0.55", linewidth=0.5)
    texts = []
    for spans, color, side, name in lanes:
        if spans is None:
            continue
        for (start, end), word, row in zip(spans, words, rows_of[name], strict=True):
            low, high = (0.0, 1.05) if side > 0 else (-1.05, 0.0)
            ax.fill_between([start, end], low, high, color=color, alpha=0.15, linewidth=0)
            ax.plot([start, start], [0, side * 1.05], color=color, linewidth=0.8)
            ax.plot([end, end], [0, side * 1.05], color=color, linewidth=0.8, linestyle=":")
            y = side * (1.2 + LABEL_ROW * row)
            texts.append(ax.text((start + end) / 2, y, word, color=color, ha="center", va="center", fontsize=fontsize))
    ax.set_xlim(0, duration)
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    handles = [
        Patch(color=c, alpha=0.35, label=f"{name} word span") for spans, c, _, name in lanes if spans is not None
    ]
    handles.append(Patch(color="0.55", label="waveform"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "word alignment", fontsize=9)
    _separate_labels(fig, ax, texts)
    return fig


def plot_alignment(path: str | Path, *figure_args: Any, **figure_kwargs: Any) -> Path:
    """Waveform with the reference (green, above) and predicted (red, below) word spans as shaded boxes.

    Each lane stacks its labels on as many rows as needed so that no two labels overlap (rows are planned
    from the label widths, then the drawn labels are measured and moved if the plan was short); a legend
    names the lanes.
    """
    return _save(alignment_figure(*figure_args, **figure_kwargs), Path(path))


LABEL_ROW = 0.3
"""Vertical distance between label rows, in units of the waveform's peak."""


def _fit_ylim(ax: Any, texts: Sequence[Any]) -> None:
    ys = [t.get_position()[1] for t in texts]
    ax.set_ylim(min([*ys, -1.1]) - 0.25, max([*ys, 1.1]) + 0.25)


def _separate_labels(fig: Any, ax: Any, texts: Sequence[Any], max_passes: int = 8) -> None:
    """Move a label one row outward while it overlaps an earlier one, at the final axis limits."""
    renderer = fig.canvas.get_renderer()
    for _ in range(max_passes):
        _fit_ylim(ax, texts)
        moved = False
        boxes = []
        for text in texts:
            box = text.get_window_extent(renderer)
            if any(box.overlaps(other) for other in boxes):
                x, y = text.get_position()
                text.set_position((x, y + (LABEL_ROW if y > 0 else -LABEL_ROW)))
                moved = True
            else:
                boxes.append(box)
        if not moved:
            return
    log.warning("alignment plot: labels still overlap after %d passes", max_passes)
