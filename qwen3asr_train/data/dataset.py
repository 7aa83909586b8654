"""Datasets of utterances: audio loading with an explicit bad-audio policy, and the HF-datasets source.

Why a policy here: a corrupt file is often only discovered when it is decoded (in a worker, deep in an
epoch). ``on_bad_audio="error"`` stops with the file and manifest line; ``"skip"`` drops the item
from its micro-batch, logs it and counts it (the count is reported in the training metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qwen3asr_train.config.schema import HFDatasetConfig
from qwen3asr_train.data.audio import AudioError, load_audio
from qwen3asr_train.data.manifest import ManifestError, RowChecks, SkipReport, Utterance, parse_row
from qwen3asr_train.data.sampler import Window

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"


@dataclass
class Sample:
    """A decoded utterance: its record, mono 16 kHz audio, and its index in the dataset."""

    utt: Utterance
    audio: np.ndarray
    index: int


class UtteranceDataset:
    """Random access to decoded utterances (manifest rows, or HF-datasets rows via ``hf://<row>``)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        on_bad_audio: str = "error",
        hf_dataset: Any = None,
        hf_audio_column: str = "audio",
    ) -> None:
        self.utterances = list(utterances)
        self.on_bad_audio = on_bad_audio
        self.hf_dataset = hf_dataset
        self.hf_audio_column = hf_audio_column
        self.rejects_path: Path | None = None
        """Where rows skipped while decoding are appended (``<run_dir>/rejects.jsonl``); None: log only."""

    def __len__(self) -> int:
        return len(self.utterances)

    def load(self, index: int) -> Sample | None:
        """Decode one utterance; ``None`` when it is unreadable and the policy is ``skip``."""
        return self.load_utterance(self.utterances[index], index)

    def load_utterance(self, utt: Utterance, index: int) -> Sample | None:
        """Decode ``utt`` as the sample numbered ``index`` (the number keys its augmentation draws)."""
        try:
            source: Any = utt.audio
            if utt.audio.startswith(HF_PREFIX):
                source = _hf_audio_bytes(
                    self.hf_dataset[int(utt.audio[len(HF_PREFIX) :])][self.hf_audio_column], utt.source
                )
            audio = load_audio(source, utt.offset, utt.duration, where=f"manifest {utt.source}")
        except AudioError as exc:
            if self.on_bad_audio == "error":
                raise
            log.warning("skipping unreadable audio of %s (%s)", utt.id, utt.source, exc_info=True)
            if self.rejects_path is not None:
                self._append_reject(utt, str(exc))
            return None
        return Sample(utt, audio, index)

    def _append_reject(self, utt: Utterance, message: str) -> None:
        """One ``rejects.jsonl`` line for a row that passed the start checks but failed to decode.

        Appends (``O_APPEND``, one short write per line) so DataLoader worker processes can share the file.
        """
        file, _, line = utt.source.rpartition(":")
        row = {
            "file": file or utt.source,
            "line": int(line) if line.isdigit() else None,
            "reason": "audio_decode_failed",
            "message": message,
            "what": "decode",
        }
        with open(self.rejects_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]


class WindowDataset:
    """Maps a sampler :class:`Window` to its decoded samples (used with ``DataLoader(batch_size=None)``)."""

    def __init__(self, dataset: UtteranceDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, window: Window) -> tuple[Window, list[list[Sample]], int]:
        micro = []
        skipped = 0
        for k, indices in enumerate(window.micro_batches):
            if window.items is not None:  # the lazy path: the window carries its rows
                samples = [self.dataset.load_utterance(u, i) for u, i in zip(window.items[k], indices, strict=True)]
            else:
                samples = [self.dataset.load(i) for i in indices]
            kept = [s for s in samples if s is not None]
            skipped += len(samples) - len(kept)
            micro.append(kept)
        return window, micro, skipped


def _hf_audio_bytes(value: Any, where: str) -> bytes | str:
    """The encoded audio of an HF ``Audio(decode=False)`` cell (bytes, or a path)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
    if isinstance(value, bytes | str):
        return value
    raise AudioError(f"{where}: unsupported audio cell of type {type(value).__name__}")


def load_hf_source(
    cfg: HFDatasetConfig, checks: RowChecks, policy: str, rejects: SkipReport | None = None
) -> tuple[list[Utterance], Any]:
    """Rows of an HF dataset (``load_from_disk`` directory or ``load_dataset`` name) as utterances.

    The audio column is cast to ``Audio(decode=False)`` so decoding goes through soundfile (no
    torchcodec/FFmpeg needed); durations are read from the encoded audio headers.
    """
    import io

    import datasets
    import soundfile as sf

    assert cfg.path is not None
    if Path(cfg.path).is_dir():
        ds = datasets.load_from_disk(cfg.path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
    else:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    if cfg.audio_column not in ds.column_names or cfg.text_column not in ds.column_names:
        raise ManifestError(
            f"{cfg.path}: columns {ds.column_names} lack audio_column={cfg.audio_column!r} or "
            f"text_column={cfg.text_column!r} (set data.hf_train.*_column)"
        )
    for key in ("language_column", "context_column", "id_column"):
        column = getattr(cfg, key)
        if column is not None and column not in ds.column_names:
            raise ManifestError(
                f"{cfg.path}: data.hf_train.{key}={column!r} is not a column of {ds.column_names}"
                + (" (set language_column=null and data.hf_train.language=<name>)" if key == "language_column" else "")
            )
    if cfg.language_column is None and cfg.language is None:
        raise ManifestError(f"{cfg.path}: set data.hf_train.language_column or data.hf_train.language")
    if isinstance(ds.features[cfg.audio_column], datasets.Audio):
        ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))
    report = SkipReport()
    items = []
    hf_checks = replace(checks, check_audio=False)  # durations come from the encoded cells read below
    for i, row in enumerate(ds):
        where = f"{cfg.path}[{cfg.split}]:{i}"
        try:
            cell = _hf_audio_bytes(row[cfg.audio_column], where)
            try:
                info = sf.info(io.BytesIO(cell) if isinstance(cell, bytes) else cell)
            except Exception as exc:
                raise ManifestError(f"{where}: cannot read audio ({exc})", "audio_unreadable") from None
            language = row[cfg.language_column] if cfg.language_column else cfg.language
            record = {
                "audio": f"{HF_PREFIX}{i}",
                "text": row[cfg.text_column],
                "language": language,
                "duration": info.frames / info.samplerate,
                "id": str(row[cfg.id_column]) if cfg.id_column else f"hf-{i}",
            }
            if cfg.context_column:
                record["context"] = row[cfg.context_column] or ""
            items.append(parse_row(record, where, Path("."), hf_checks, i))
        except (ManifestError, AudioError) as exc:
            if policy == "error":
                raise
            report.add(getattr(exc, "reason", "audio_unreadable"), str(exc), where)
    report.log(str(cfg.path))
    if rejects is not None:
        rejects.extend(report)
    return items, ds
