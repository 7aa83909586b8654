"""Check manifests the way training will, before a run: a clean manifest, every rejected row, a summary.

Why a separate pass: a training run stops at the first bad row (``data.on_bad_row=error``) or drops rows
(``skip``); cleaning a corpus needs the complete list at once, with file, line and reason, and the
distribution of what is left. The checks are the training code's own (:func:`~qwen3asr_train.data.manifest.read_manifest`
with the data config's limits: JSON, UTF-8, fields, language, text, audio header, segment inside the
file, duration limits, word times), plus, for aligner manifests, the aligner's word units. ``decode=True``
also decodes every segment (what training does later; slow, but it finds corrupt data behind a good header).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from qwen3asr_train.config.schema import DataConfig
from qwen3asr_train.data.audio import AudioError, load_audio
from qwen3asr_train.data.manifest import ManifestError, SkipReport, Utterance, decode_line, open_lines, read_manifest

log = logging.getLogger(__name__)


def validate_manifests(
    manifests: list[str | Path],
    out_dir: str | Path,
    data: DataConfig | None = None,
    aligner: bool = False,
    decode: bool = False,
) -> dict[str, Any]:
    """Write ``clean.jsonl``, ``rejects.jsonl``, ``summary.json`` and ``durations.png`` to ``out_dir``.

    ``clean.jsonl`` holds the accepted rows as they were written, with ``audio`` made absolute (so the
    file works from any directory). Returns the summary.
    """
    from qwen3asr_train.data.datamodule import row_checks

    data = data or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = row_checks(data)
    rejects = SkipReport()
    kept: list[Utterance] = []
    total_rows = 0
    for manifest in manifests:
        manifest = Path(manifest)
        total_rows += sum(1 for line in manifest.open("rb") if line.strip()) if manifest.is_file() else 0
        report = SkipReport()
        try:
            items = read_manifest(manifest, checks, "skip", report)
        except ManifestError as exc:  # missing or entirely unusable manifest
            report.add(exc.reason, str(exc), str(manifest))
            items = []
        if aligner and items:
            from qwen3asr_train.data.aligner import usable_for_alignment

            items = usable_for_alignment(items, "skip", str(manifest), report)
        if decode:
            items = _decodable(items, report)
        rejects.extend(report, str(manifest))
        kept.extend(items)
    _write_clean(kept, out / "clean.jsonl")
    rejects.write(out / "rejects.jsonl")
    summary = _summary(manifests, total_rows, kept, rejects)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _histogram([u.duration for u in kept], out / "durations.png")
    log.info("%d of %d rows kept; rejected by reason: %s", len(kept), total_rows, dict(rejects.counts))
    return summary


def _decodable(items: list[Utterance], report: SkipReport) -> list[Utterance]:
    ok = []
    for utt in items:
        try:
            load_audio(utt.audio, utt.offset, utt.duration, where=f"manifest {utt.source}")
        except AudioError as exc:
            report.add("audio_decode_failed", str(exc), utt.source)
            continue
        ok.append(utt)
    return ok


def _write_clean(items: list[Utterance], path: Path) -> None:
    """Accepted rows verbatim (re-read from their file and line), ``audio`` absolute."""
    by_file: dict[str, set[int]] = {}
    for utt in items:
        file, _, line = utt.source.rpartition(":")
        by_file.setdefault(file, set()).add(int(line))
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for file, lines in by_file.items():
        for number, raw in enumerate(open_lines(Path(file)), start=1):
            if number in lines:
                rows[(file, number)] = json.loads(decode_line(raw, f"{file}:{number}").removeprefix("\ufeff"))
    with open(path, "w", encoding="utf-8") as handle:
        for utt in items:
            file, _, line = utt.source.rpartition(":")
            row = rows[(file, int(line))]
            row["audio"] = utt.audio
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _summary(manifests: list[str | Path], total: int, kept: list[Utterance], rejects: SkipReport) -> dict[str, Any]:
    durations = sorted(u.duration for u in kept)

    def pct(q: float) -> float:
        return round(durations[min(len(durations) - 1, int(q * len(durations)))], 3) if durations else 0.0

    return {
        "manifests": [str(m) for m in manifests],
        "rows": total,
        "kept": len(kept),
        "rejected": rejects.total,
        "rejected_by_reason": dict(rejects.counts),
        "hours": round(sum(durations) / 3600, 4),
        "duration_seconds": {"min": pct(0.0), "p50": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
        "languages": dict(Counter(u.language or "None (no speech)" for u in kept)),
    }


def _histogram(durations: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(durations, bins=min(50, max(5, len(durations) // 5 or 1)))
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.set_title(f"{len(durations)} utterances, {sum(durations) / 3600:.2f} h")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
