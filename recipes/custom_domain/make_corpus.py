"""Stage 1 of the custom-domain recipe: a synthetic "domain" corpus, a replay sample of the general corpus, and a
copy of the domain test set without context.

Why these three files:

* ``domain/{train,test}.jsonl``: English speech whose words are the general corpus's 24 words plus
  :data:`DOMAIN_WORDS`, ten medical terms the base model never heard or wrote (about 3 words in 10 are
  domain terms; 1-4 words per clip, the general corpus's speaking rates, all 26 English voice/variant pairs
  (also the demo's held-out ``+m3``/``+f3``), sentence case and punctuation). Every row carries the domain's hot words as ``context`` (``"aspirin, insulin, ..."``), which
  SFT and the evaluation put in the system turn of the prompt. ``test`` is held out: other sentences, not
  other voices.
* ``domain/test_nocontext.jsonl``: the same test rows without ``context``, so the report separates what the
  prompt's hot words do from what fine-tuning does.
* ``replay.jsonl``: ``--replay N`` rows drawn (seeded, without replacement) from the general training set; the
  replay run trains on the domain rows and these, one to one at the default, so it keeps seeing the general
  task while it learns the new words.

Your own domain data instead of the synthetic corpus: ``--domain-train`` and ``--domain-test`` (manifests with
a ``context`` per row if you have hot words) are copied to ``domain/`` and nothing is synthesised.

Usage: python recipes/custom_domain/make_corpus.py OUT_DIR --general-train exp/demo_sft/corpus/train.jsonl
       [--replay 600] [--num-train 600] [--num-test 100] [--workers 2] [--domain-train T --domain-test H]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled

from qwen3asr_train.data.manifest import read_jsonl  # noqa: E402
from qwen3asr_train.tools.synthetic import VOCABULARIES, make_corpus  # noqa: E402

log = logging.getLogger("custom_domain.make_corpus")

GENERAL_WORDS: tuple[str, ...] = tuple(word for word, _ in VOCABULARIES["en"][:24])
"""The general corpus's vocabulary (``recipes/demo_sft/make_corpus.py`` uses the first 24 English words)."""
DOMAIN_WORDS: tuple[str, ...] = (
    "aspirin",
    "insulin",
    "biopsy",
    "vaccine",
    "dosage",
    "syringe",
    "tumor",
    "allergy",
    "inhaler",
    "ibuprofen",
)
"""The domain's new words: none is in the general vocabulary, so the base model has never written them (its
byte-level tokenizer spells each in 4-9 pieces, docs/custom_domain.md)."""
DOMAIN_CONTEXT = ", ".join(DOMAIN_WORDS)
"""The hot-word context of every domain row, in the comma-separated form SFT's hot-word augmentation writes."""


def domain_corpus_options(num_train: int, num_test: int) -> dict:
    """``make_corpus`` options of the domain corpus: the general corpus's voices, rates and style, new words."""
    return dict(
        languages=("en",),
        num_train=num_train,
        num_test=num_test,
        seed=12,
        words_per_clip=(1, 4),
        rate_wpm=(140, 200),
        cased=True,
        vocabulary=GENERAL_WORDS + DOMAIN_WORDS,
        context=DOMAIN_CONTEXT,
    )


REPLAY_ID_PREFIX = "replay-"
"""Prefixed to the ids of replayed rows: training refuses ids repeated across manifests, and two synthetic corpora
(general and domain) number their clips the same way."""


def write_replay(general_train: Path, out: Path, n: int, seed: int = 0) -> int:
    """Write ``n`` rows of ``general_train`` (a seeded sample without replacement, in file order) to ``out``,
    each id prefixed with :data:`REPLAY_ID_PREFIX`.

    Raises:
        ValueError: when the general set has fewer than ``n`` rows (the replay ratio would silently change).
    """
    rows = read_jsonl(general_train)
    if n > len(rows):
        raise ValueError(f"{general_train}: {len(rows)} rows, fewer than the {n} replay rows asked for")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    tmp = out.with_suffix(".tmp")
    lines = [json.dumps({**rows[i], "id": REPLAY_ID_PREFIX + rows[i]["id"]}, ensure_ascii=False) for i in keep]
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(out)
    return n


def write_without_context(manifest: Path, out: Path) -> int:
    """Copy ``manifest`` to ``out`` with every row's ``context`` removed; returns the row count."""
    rows = read_jsonl(manifest)
    for row in rows:
        row.pop("context", None)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--general-train", type=Path, required=True, help="the base model's training manifest")
    parser.add_argument("--replay", type=int, default=600, help="general rows in replay.jsonl (0: none)")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")
    parser.add_argument("--domain-train", type=Path, help="your domain training manifest (skips synthesis)")
    parser.add_argument("--domain-test", type=Path, help="your domain held-out manifest (with --domain-train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if (args.domain_train is None) != (args.domain_test is None):
        parser.error("--domain-train and --domain-test go together")
    if args.domain_train:
        (args.out_dir / "domain").mkdir(parents=True, exist_ok=True)
        manifests = {"train": args.out_dir / "domain" / "train.jsonl", "test": args.out_dir / "domain" / "test.jsonl"}
        shutil.copyfile(args.domain_train, manifests["train"])
        shutil.copyfile(args.domain_test, manifests["test"])
    else:
        manifests = make_corpus(
            args.out_dir / "domain", workers=args.workers, **domain_corpus_options(args.num_train, args.num_test)
        )
    n = write_without_context(manifests["test"], args.out_dir / "domain" / "test_nocontext.jsonl")
    log.info("domain train %s, test %s (+ test_nocontext.jsonl, %d rows)", manifests["train"], manifests["test"], n)
    if args.replay:
        write_replay(args.general_train, args.out_dir / "replay.jsonl", args.replay)
        log.info("replay: %d rows of %s -> %s", args.replay, args.general_train, args.out_dir / "replay.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
