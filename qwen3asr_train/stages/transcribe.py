"""``recipe=transcribe``: use a model on audio: transcripts from an ASR model, word times from a forced aligner.

Inputs (``recipe.inputs``, one or more): audio files, folders of audio files, or manifests. The model is an
export (either layout), a ``.ckpt`` or a training run directory. ASR writes ``transcripts.jsonl`` (id, audio,
language, text, and the raw output); a forced aligner needs the transcript of each input (the manifest's
``text``, or ``recipe.text`` for plain audio) and writes ``alignments.jsonl`` (words with start/end seconds)
plus one Praat TextGrid per input under ``textgrids/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import soundfile as sf

from qwen3asr_train.checkpoints import load_for_inference
from qwen3asr_train.config.schema import RunConfig, TranscribeConfig
from qwen3asr_train.data.audio import load_audio
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import AlignedWord, ManifestError, Utterance, read_manifests
from qwen3asr_train.data.prompts import parse_asr_output
from qwen3asr_train.data.word_units import split_words
from qwen3asr_train.eval.align_eval import ChainSettings, align
from qwen3asr_train.eval.alignment import write_textgrid
from qwen3asr_train.eval.decode import decode
from qwen3asr_train.languages import LanguageTable

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus"})
"""Files a folder input contributes (what soundfile decodes)."""


def collect_inputs(cfg: RunConfig) -> list[Utterance]:
    """Every input as an utterance, in the order given (folders sorted by name)."""
    recipe: TranscribeConfig = cfg.recipe
    language = LanguageTable().resolve(recipe.language)[0] if recipe.language else None
    utterances: list[Utterance] = []
    for raw in recipe.inputs:
        path = Path(raw)
        if path.suffix == ".jsonl":
            utterances += read_manifests([str(path)], row_checks(cfg.data), cfg.data.on_bad_row)
            continue
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise ManifestError(f"recipe.inputs: {path} holds no audio files ({sorted(AUDIO_SUFFIXES)})", "no_audio")
        for file in files:
            info = sf.info(str(file))
            utterances.append(
                Utterance(
                    id=file.stem,
                    audio=str(file),
                    duration=info.frames / info.samplerate,
                    text=recipe.text or "",
                    language=language,
                    source=str(file),
                )
            )
    return utterances


def run(cfg: RunConfig) -> dict[str, Any]:
    """Transcribe or align ``recipe.inputs`` with ``recipe.model_path`` (see the module docstring)."""
    recipe: TranscribeConfig = cfg.recipe
    out_dir = Path(recipe.output_dir or cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_for_inference(recipe.model_path, cfg.model)
    utterances = collect_inputs(cfg)
    samples = [
        Sample(u, load_audio(u.audio, u.offset, u.duration if u.offset else None, where=u.source), i)
        for i, u in enumerate(utterances)
    ]
    if hasattr(model, "generate"):
        results = decode(model, processor, samples, recipe.decode)
        path = out_dir / "transcripts.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for utt, result in zip(utterances, results, strict=True):
                parsed = parse_asr_output(result.hypothesis, result.forced_language)
                row = {"id": utt.id, "audio": utt.audio, "language": parsed.language, "text": parsed.text}
                handle.write(json.dumps({**row, "raw": result.hypothesis}, ensure_ascii=False) + "\n")
        log.info("wrote %d transcripts to %s", len(results), path)
        return {"transcripts": str(path), "count": len(results)}
    for sample in samples:  # the aligner aligns a known transcript: its word units, with placeholder times
        utt = sample.utt
        if not utt.text.strip() or utt.language is None:
            raise ManifestError(
                f"{utt.source}: aligning needs a transcript and a language (manifest text/language, or "
                f"recipe.text and recipe.language for plain audio)",
                "no_text",
            )
        utt.words = [AlignedWord(w, 0.0, 0.0) for w in split_words(utt.text, utt.language)]
    spans = align(
        model,
        processor,
        samples,
        recipe.decode.max_batch_seconds,
        recipe.decode.max_batch_size,
        decode=recipe.decode.align_decode,
        refine_seconds=recipe.decode.align_refine_seconds,
        chain=ChainSettings.from_decode(recipe.decode),
    )
    path = out_dir / "alignments.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for sample, pred in zip(samples, spans, strict=True):
            words = [w.word for w in sample.utt.words or []]
            timed = [{"word": w, "start": s, "end": e} for w, (s, e) in zip(words, pred, strict=True)]
            handle.write(json.dumps({"id": sample.utt.id, "audio": sample.utt.audio, "words": timed}) + "\n")
            write_textgrid(out_dir / "textgrids" / f"{sample.utt.id}.TextGrid", words, pred, sample.utt.duration)
    log.info("wrote %d alignments to %s", len(samples), path)
    return {"alignments": str(path), "count": len(samples)}
