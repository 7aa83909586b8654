"""Write a manifest with word times out as an MFA-style corpus + alignments (wav/.lab + TextGrid per utterance).

Usage:
    python data_tools/manifest_to_mfa_layout.py exp/corpus/train.jsonl --corpus-dir exp/mfa_corpus \\
        --alignments-dir exp/mfa_out [--speaker synthetic]

Why: the aligner pipeline (recipes/aligner_synthetic) starts from TextGrids, as a real one starts from
``mfa align`` output; on the offline demo corpus the word times are known, so this tool plays MFA's role
and the pipeline then runs the same TextGrid import a user runs on real MFA output. Audio files are
symlinked, transcripts written as ``<utt>.lab``, and each TextGrid has a ``words`` tier with the word
intervals and empty intervals for the silences between them (as MFA writes them).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from praatio import textgrid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--corpus-dir", required=True)
    parser.add_argument("--alignments-dir", required=True)
    parser.add_argument("--speaker", default="synthetic")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus_dir) / args.speaker
    aligned = Path(args.alignments_dir) / args.speaker
    corpus.mkdir(parents=True, exist_ok=True)
    aligned.mkdir(parents=True, exist_ok=True)
    written = 0
    for line in open(args.manifest, encoding="utf-8"):
        row = json.loads(line)
        if not row.get("words"):
            continue
        utt = row["id"].replace("/", "_")
        wav = corpus / f"{utt}.wav"
        if not wav.exists():
            os.symlink(Path(row["audio"]).resolve(), wav)
        (corpus / f"{utt}.lab").write_text(row["text"] + "\n", encoding="utf-8")
        entries = [(w["start"], w["end"], w["word"]) for w in row["words"] if w["end"] > w["start"]]
        grid = textgrid.Textgrid()
        grid.addTier(textgrid.IntervalTier("words", entries, 0.0, max(row["duration"], entries[-1][1])))
        grid.save(str(aligned / f"{utt}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
        written += 1
    print(f"wrote {written} utterances to {corpus} and {aligned}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
