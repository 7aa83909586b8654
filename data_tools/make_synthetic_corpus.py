"""Generate an offline synthetic speech corpus (espeak-ng) with exact word times.

Usage:
    python data_tools/make_synthetic_corpus.py OUT_DIR [--languages en fr zh] [--num-train 2000]
        [--num-test 200] [--seed 0] [--min-words 4] [--max-words 10] [--num-no-speech 0]
        [--snr-db LOW HIGH] [--workers 2]

Writes OUT_DIR/wavs/*.wav (16 kHz mono PCM16), OUT_DIR/{train,test}.jsonl (and no_speech.jsonl) and
OUT_DIR/corpus_config.json; rerunning with the same arguments returns at once. Needs the Debian package
espeak-ng (apt-get install -y espeak-ng libespeak-ng1). See qwen3asr_train/data/synthetic.py.
"""

from __future__ import annotations

import argparse
import logging
import time

from qwen3asr_train.data.synthetic import VOCABULARIES, make_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--languages", nargs="+", default=["en"], help=f"ISO codes from {sorted(VOCABULARIES)}")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=4, help="word units per clip (characters for Chinese)")
    parser.add_argument("--max-words", type=int, default=10)
    parser.add_argument("--num-no-speech", type=int, default=0, help="silence/noise clips in no_speech.jsonl")
    parser.add_argument("--snr-db", type=float, nargs=2, metavar=("LOW", "HIGH"), help="add noise at this SNR range")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocabulary-size", type=int, default=0, help="use only the first N words (0 = all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    manifests = make_corpus(
        args.out_dir,
        languages=tuple(args.languages),
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        words_per_clip=(args.min_words, args.max_words),
        num_no_speech=args.num_no_speech,
        noise_snr_db=tuple(args.snr_db) if args.snr_db else None,
        workers=args.workers,
        vocabulary_size=args.vocabulary_size,
    )
    for split, path in manifests.items():
        print(f"{split}: {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
