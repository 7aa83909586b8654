"""Plots: error-rate bars (fixed axis, legend outside, values from hand-counted errors), training curves from
``metrics.csv`` and the hook's step folders, alignment plots (one per language, labels measured not to
overlap), and the links in ``summary.md``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qwen3asr_train.eval.plots import (
    alignment_figure,
    error_rate_figure,
    label_rows,
    one_per_language,
    read_metrics_csv,
    validation_series,
    write_before_after,
    write_eval_index,
    write_run_plots,
    write_training_curves,
)
from qwen3asr_train.eval.report import score_results, summarize_set, write_summary

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Row:
    """What scoring reads from a decode result."""

    id: str
    language: str
    reference: str
    hypothesis: str
    audio_seconds: float = 2.0
    truncated: bool = False
    forced_language: str | None = None
    dialect: str | None = None


def summary_of(pairs: dict[str, list[tuple[str, str]]], set_name: str = "dev") -> dict:
    """``{set: summary}`` for (reference, hypothesis) pairs per language, through the real scoring code."""
    rows = [
        Row(f"{lang}-{i}", lang, ref, f"language {lang}<asr_text>{hyp}")
        for lang, items in pairs.items()
        for i, (ref, hyp) in enumerate(items)
    ]
    aggregator, records = score_results(set_name, rows)
    return {set_name: summarize_set(aggregator, set_name, records)}


# Hand counts. English (WER): "a b c d" -> "a x c": 1 sub + 1 del over 4 words = 50 %;
# "e f" -> "e f" = 0 -> corpus 2/6 = 33.3 %. Chinese (CER): "你好世界" -> "你好" = 2 del / 4 = 50 %.
BEFORE = {"English": [("a b c d", "a x c"), ("e f", "e f")], "Chinese": [("你好世界", "你好")]}
# after: English "a b c d" -> "a b c d", "e f" -> "e g" = 1/6 = 16.7 %; Chinese "你好世界" -> "你好世界" = 0 %
AFTER = {"English": [("a b c d", "a b c d"), ("e f", "e g")], "Chinese": [("你好世界", "你好世界")]}
# insertions beyond 100 %: "a" -> "a b c d" = 3 ins / 1 = 300 %
WORSE = {"English": [("a", "a b c d")], "Chinese": [("你好世界", "你好世界")]}


def bars_of(fig) -> dict[str, list[float]]:
    ax = fig.axes[0]
    return {c.get_label(): [b.get_height() for b in c] for c in ax.containers}


def test_before_after_bars_fixed_axis_and_legend_outside(tmp_path: Path) -> None:
    results = {"before": summary_of(BEFORE), "after": summary_of(AFTER), "worse": summary_of(WORSE)}
    fig = error_rate_figure(results, "demo model, step 1200")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Chinese (CER)", "English (WER)"]  # summary order
    heights = bars_of(fig)
    assert heights["before"] == pytest.approx([50.0, 100 * 2 / 6])
    assert heights["after"] == pytest.approx([0.0, 100 * 1 / 6])
    assert heights["worse"] == pytest.approx([0.0, 100.0])  # 300 % drawn at the top edge ...
    labels = [t.get_text() for t in ax.texts]
    assert "300.0" in labels and "33.3" in labels and "0.0" in labels  # ... with its true value written on it
    assert ax.get_ylim() == (0.0, 108.0)  # the same axis whatever the values
    assert ax.get_title() == "demo model, step 1200"
    fig.canvas.draw()
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["before", "after", "worse"]
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # right of the plot area, not on a bar

    path = write_before_after({"before": summary_of(BEFORE), "after": summary_of(AFTER)}, tmp_path)
    assert path == tmp_path / "before_after.png" and path.read_bytes()[:8] == PNG


def test_summary_md_links_the_chart_and_names_the_model(tmp_path: Path) -> None:
    paths = write_summary(tmp_path, summary_of(AFTER), title="exp/sft/export, step 1200")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# Evaluation: exp/sft/export, step 1200\n")
    assert "![error rate per language](error_rates.png)" in markdown
    assert paths["plot"].read_bytes()[:8] == PNG
    payload = json.loads(paths["json"].read_text())
    assert payload["title"] == "exp/sft/export, step 1200" and set(payload["sets"]) == {"dev"}


def make_run(tmp_path: Path) -> Path:
    """A run directory as the csv logger and the evaluation hook leave it (two evaluated steps)."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    rows = ["epoch,step,train/loss,train/lr,val/dev/wer"]
    rows += [f"0,{s},{5.0 / (1 + s / 10):.6f},0.001," for s in range(9, 120, 10)]
    rows += ["0,59,,,0.5", "1,59,2.0,0.001,"]  # the hook's row; a resumed run re-logging step 59 (kept last)
    (run / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    write_summary(run / "eval" / "step-00000060", summary_of(BEFORE), title="run, step 60")
    write_summary(run / "eval" / "step-00000120", summary_of(AFTER), title="run, step 120")
    return run


def test_training_curves_read_the_csv_and_the_step_folders(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    logged = read_metrics_csv(run / "logs" / "metrics.csv")
    assert [s for s, _ in logged["train/loss"]] == list(range(9, 120, 10))
    assert dict(logged["train/loss"])[59] == 2.0 and dict(logged["train/loss"])[9] == pytest.approx(5.0 / 1.9)
    assert logged["val/dev/wer"] == [(59, 0.5)]
    # by-language scoring of a mixed-family set (WER + CER): the curve is the macro error rate
    # before: mean(33.3 %, 50 %) = 41.7 %; after: mean(16.7 %, 0 %) = 8.3 %
    series = validation_series(run)
    assert list(series) == ["dev macro ER %"]
    steps, rates = zip(*series["dev macro ER %"], strict=True)
    assert steps == (60, 120) and rates == pytest.approx([100 * (2 / 6 + 0.5) / 2, 100 * (1 / 6) / 2])
    path = write_training_curves(run)
    assert path == run / "training_curves.png" and path.read_bytes()[:8] == PNG
    # Lightning's row "step 9" is the 10th optimizer step: drawn at 10, on the axis of the step folders
    (loss_line,) = [line for line in fig_lines(run) if line.get_label() == "train/loss"]
    assert list(loss_line.get_xdata()) == list(range(10, 121, 10))


def fig_lines(run: Path) -> list:
    from matplotlib.figure import Figure

    captured: list[Figure] = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        captured.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = keep
    try:
        write_training_curves(run)
    finally:
        Figure.savefig = original
    return [line for ax in captured[0].axes for line in ax.get_lines()]


def test_training_curves_need_something_to_draw(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="qwen3asr_train.eval.plots")
    assert write_training_curves(tmp_path) is None
    assert "no training curves" in caplog.text


def test_run_plots_and_the_eval_index_link_everything(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    written = write_run_plots(run)
    assert set(written) == {"training_curves", "error_rates_by_step", "index"}
    index = written["index"].read_text()
    assert "![training curves](../training_curves.png)" in index
    assert "![error rates by step](error_rates_by_step.png)" in index
    assert "| 60 | [summary.md](step-00000060/summary.md) | [error_rates.png](step-00000060/error_rates.png) |" in index
    for link in ("../training_curves.png", "error_rates_by_step.png", "step-00000120/summary.md"):
        assert (run / "eval" / link).resolve().is_file(), link
    assert write_eval_index(tmp_path / "empty") is None


def test_one_per_language_takes_every_language() -> None:
    langs = ["en", "en", "en", "zh", "en", "fr", "zh", "fr"]
    assert one_per_language(langs, lambda x: x) == [0, 3, 5]
    assert one_per_language(langs, lambda x: x, per_language=2) == [0, 1, 3, 5, 6, 7]


def test_label_rows_by_hand() -> None:
    # labels 0.4 s wide centred on spans: [0.0,0.4], [0.2,0.6] overlaps -> row 1, [0.5,0.9] fits row 0
    # after a 0.05 gap? 0.4 + 0.05 <= 0.5 yes; [0.55,0.95] overlaps both rows' last labels -> row 2
    spans = [(0.0, 0.4), (0.2, 0.6), (0.5, 0.9), (0.55, 0.95)]
    assert label_rows(spans, [0.4] * 4, gap=0.05) == [0, 1, 0, 2]


def test_alignment_labels_do_not_overlap_and_legend_names_the_lanes() -> None:
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, 32000).astype(np.float32)  # 2 s
    words = ["supercalifragilistic", "a", "tiny", "cramped", "labels", "everywhere", "x", "overlapping"]
    starts = np.linspace(0.1, 1.7, len(words))  # 8 words in 1.8 s: long labels on short spans
    ref = [(float(s), float(s) + 0.18) for s in starts]
    pred = [(s + 0.03, e + 0.05) for s, e in ref]
    fig = alignment_figure(audio, words, pred, ref, title="dev / English: u1 (AAS 40 ms)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() in words]
    assert len(labels) == 2 * len(words)
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlaps = [
        (labels[i].get_text(), labels[j].get_text())
        for i in range(len(boxes))
        for j in range(i)
        if boxes[i].overlaps(boxes[j])
    ]
    assert overlaps == []
    axes_box = ax.get_window_extent(renderer)
    assert all(axes_box.y0 <= b.y0 and b.y1 <= axes_box.y1 for b in boxes)  # inside the plot, not cut off
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["reference word span", "predicted word span", "waveform"]
    assert ax.get_title() == "dev / English: u1 (AAS 40 ms)"
