"""A manifest with word times -> an MFA-style corpus (audio link + ``.lab`` per utterance) and its TextGrids.

Why: the aligner pipeline starts from TextGrids, as a real one starts from ``mfa align`` output. When the
word times are already known (the offline synthetic corpus, or a corpus aligned by another tool), this
writes exactly what MFA would have, so the pipeline then runs the same TextGrid import
(:func:`qwen3asr_train.tools.textgrid.mfa_corpus_to_manifest`) a user runs on real MFA output.

Layout written (one speaker folder, as MFA reads corpora):

* ``<corpus_dir>/<speaker>/<utt>.wav``: a symbolic link to the row's audio file, absolute, so it works
  wherever the corpus is read from. Relative ``audio`` paths are resolved against the manifest's folder,
  exactly as the trainer reads them (``qwen3asr_train.data.manifest.parse_row``), never against the
  current folder.
* ``<corpus_dir>/<speaker>/<utt>.lab``: the transcript (an upstream ``language X<asr_text>`` prefix removed).
* ``<alignments_dir>/<speaker>/<utt>.TextGrid``: a ``words`` tier with the word intervals and empty
  intervals for the silences between them (as MFA writes them).

Rows without ``words`` (no-speech clips) are counted and skipped. A row that cannot be written (audio file
missing, a segment of a longer file, an id used twice) is an error naming the manifest and line: a corpus
with silently missing utterances would train on less than the user thinks.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

ASR_TEXT = "<asr_text>"


class LayoutError(ValueError):
    """A manifest row that cannot become an MFA corpus entry; the message names file and line."""


def resolve_audio(audio: str, manifest: Path) -> Path:
    """The audio path as the trainer resolves it: absolute as is, relative against the manifest's folder."""
    path = Path(audio)
    return path if path.is_absolute() else (manifest.parent / path)


def manifest_to_mfa_layout(
    manifest: str | os.PathLike,
    corpus_dir: str | os.PathLike,
    alignments_dir: str | os.PathLike,
    speaker: str = "synthetic",
) -> Counter[str]:
    """Write the corpus and TextGrids for every row with word times; return the counts.

    Returns:
        ``written`` (utterances written) and ``skipped_no_words`` (rows without word times).

    Raises:
        FileNotFoundError: the manifest does not exist.
        LayoutError: a row is not JSON, lacks ``audio``/``text``, names a missing audio file, is a segment
            (``offset`` != 0) of a longer file, has no usable word interval, or repeats an id.
    """
    from praatio import textgrid

    from qwen3asr_train.data.audio import audio_info  # imports torch: not at module level (CLI --help)
    from qwen3asr_train.data.manifest import decode_line, open_lines

    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    corpus = Path(corpus_dir) / speaker
    aligned = Path(alignments_dir) / speaker
    corpus.mkdir(parents=True, exist_ok=True)
    aligned.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter(written=0, skipped_no_words=0)
    seen: dict[str, str] = {}
    for line_no, raw in enumerate(open_lines(manifest), start=1):
        where = f"{manifest}:{line_no}"
        text_line = decode_line(raw, where).removeprefix("\ufeff").strip()
        if not text_line:
            continue
        try:
            row = json.loads(text_line)
        except json.JSONDecodeError as err:
            raise LayoutError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise LayoutError(f"{where}: a row needs string 'audio' and 'text' fields")
        if not row.get("words"):
            counts["skipped_no_words"] += 1
            continue
        if float(row.get("offset", 0.0) or 0.0) != 0.0:
            raise LayoutError(
                f"{where}: offset={row['offset']} (a segment of a longer file); MFA aligns whole files, "
                "so cut the segment into its own file first"
            )
        audio = resolve_audio(row["audio"], manifest)
        if not audio.is_file():
            raise LayoutError(
                f"{where}: audio file not found: {audio} (relative paths are read against the manifest's folder)"
            )
        utt = str(row.get("id") or Path(row["audio"]).stem).replace("/", "_")
        if utt in seen:
            raise LayoutError(f"{where}: id {utt!r} already used at {seen[utt]}; MFA needs one file per utterance")
        seen[utt] = where
        entries = [(float(w["start"]), float(w["end"]), str(w["word"])) for w in row["words"] if w["end"] > w["start"]]
        if not entries:
            raise LayoutError(f"{where}: no word has end > start")
        text = row["text"].split(ASR_TEXT, 1)[1] if ASR_TEXT in row["text"] else row["text"]

        wav = corpus / f"{utt}{audio.suffix or '.wav'}"
        if wav.is_symlink() or wav.exists():  # a stale or broken link from an earlier run is replaced
            wav.unlink()
        os.symlink(audio.resolve(), wav)
        (corpus / f"{utt}.lab").write_text(text.strip() + "\n", encoding="utf-8")
        duration = row.get("duration")
        if duration is None:  # as the trainer does: the header gives the length
            frames, rate = audio_info(audio)
            duration = frames / rate
        end = max(float(duration), entries[-1][1])
        grid = textgrid.Textgrid()
        grid.addTier(textgrid.IntervalTier("words", entries, 0.0, end))
        grid.save(str(aligned / f"{utt}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
        counts["written"] += 1
    logger.info("%s: wrote %d utterances to %s and %s", manifest, counts["written"], corpus, aligned)
    return counts
