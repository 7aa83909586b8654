"""Long evaluation clips made of held-out speech: consecutive rows of a manifest joined up to N seconds.

Why: the aligner must keep its accuracy late in long recordings, but synthetic corpora are short clips.
Joining held-out clips (same language, word times shifted, the text joined so it splits into the same
word units) gives long clips whose every word time is exact, from speech the model never trained on.

Usage: .venv/bin/python recipes/aligner_synthetic/make_long_set.py IN.jsonl OUT_DIR --max-seconds 30
Writes OUT_DIR/wavs/<id>.wav and OUT_DIR/long.jsonl (one row per joined clip, with "words").
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import soundfile as sf

from qwen3asr_train.config.data import DataConfig
from qwen3asr_train.data.aligner import concat_utterances
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.datamodule import row_checks
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import read_manifest

log = logging.getLogger("make_long_set")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="held-out manifest with word times")
    parser.add_argument("out_dir")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="longest joined clip")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="drop joined clips shorter than this")
    parser.add_argument("--gap-seconds", type=float, default=0.0, help="silence between joined clips")
    parser.add_argument("--num-classes", type=int, default=5000, help="classes of the aligner (limits the length)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    utts = read_manifest(args.manifest, row_checks(DataConfig()))
    dataset = UtteranceDataset(utts, "error")
    samples = [dataset.load(i) for i in range(len(utts))]
    joined = concat_utterances(
        [s for s in samples if s is not None], args.max_seconds, args.gap_seconds, num_classes=args.num_classes
    )
    out = Path(args.out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, sample in enumerate(joined):
        seconds = sample.audio.size / SAMPLE_RATE
        if seconds < args.min_seconds:
            continue
        clip_id = f"long-{k:04d}"
        path = (out / "wavs" / f"{clip_id}.wav").resolve()
        sf.write(path, sample.audio, SAMPLE_RATE, subtype="FLOAT")
        words = [{"word": w.word, "start": round(w.start, 4), "end": round(w.end, 4)} for w in sample.utt.words or []]
        row = {"id": clip_id, "audio": str(path), "text": sample.utt.text, "language": sample.utt.language}
        rows.append({**row, "duration": seconds, "words": words})
    (out / "long.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    total = sum(r["duration"] for r in rows)
    log.info("%d clips of %.1f s on average from %d rows -> %s", len(rows), total / max(len(rows), 1), len(utts), out)


if __name__ == "__main__":
    main()
