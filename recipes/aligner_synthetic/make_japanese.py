"""Synthetic Japanese speech with word times (espeak-ng ``ja`` voice), for the multilingual aligner set.

Why a separate script: the corpus generator (``qwen3asr-data synth``) has no Japanese. espeak reads kanji as
"Chinese letter", so each word is spoken from its kana reading while the manifest keeps the usual written
form (kanji and kana, no spaces). The word times are espeak's word events per spoken word, trimmed to the
audible sound like the other languages. They are NOT cut the way the aligner cuts Japanese (nagisa on the
written text), which is the point: the aligner's word-unit policy re-cuts rows whose units merge whole
words (``猫山`` from ``猫`` + ``山``) and skips rows where nagisa cuts inside a spoken word, counted per language.

Usage: .venv/bin/python recipes/aligner_synthetic/make_japanese.py OUT_DIR --num-train 400 --num-test 40
Writes OUT_DIR/wavs/*.wav and OUT_DIR/{train,test}.jsonl (rows like the synthetic corpus's).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import soundfile as sf

from qwen3asr_train.tools.synthetic import (
    ESPEAK_RATE,
    PAD_S,
    PEAK_DBFS,
    PITCH,
    RATE_WPM,
    SAMPLE_RATE,
    VARIANTS,
    Espeak,
    resample,
    word_spans,
)

log = logging.getLogger("make_japanese")

VOCABULARY: tuple[tuple[str, str], ...] = tuple(
    tuple(e.split(":"))  # type: ignore[misc]
    for e in """猫:ねこ 犬:いぬ 山:やま 川:かわ 水:みず 空:そら 花:はな 本:ほん 学校:がっこう 先生:せんせい
    電車:でんしゃ 時間:じかん 友達:ともだち 天気:てんき 今日:きょう 明日:あした 食べる:たべる 見る:みる 行く:いく
    大きい:おおきい 小さい:ちいさい 赤い:あかい 青い:あおい 新しい:あたらしい 音楽:おんがく 日本:にほん
    東京:とうきょう 朝:あさ 夜:よる 魚:さかな 鳥:とり 雨:あめ 海:うみ 町:まち の:の と:と を:を は:は""".split()
)
"""(written, kana reading) pairs; particles are words of their own, as nagisa cuts them."""


def render(rng: np.random.Generator, n_words: int) -> tuple[np.ndarray, str, list[dict]] | None:
    """One clip: (16 kHz audio, written text, word rows), or ``None`` when espeak's events do not fit."""
    picks = [VOCABULARY[k] for k in rng.integers(len(VOCABULARY), size=n_words)]
    spoken = [reading for _, reading in picks]
    voice = "ja" + VARIANTS[rng.integers(len(VARIANTS))]
    syn = Espeak.get().synthesize(
        " ".join(spoken), voice, rate=int(rng.integers(*RATE_WPM)), pitch=int(rng.integers(*PITCH))
    )
    expected = (np.cumsum([0] + [len(t) + 1 for t in spoken[:-1]]) + 1).tolist()
    if syn.switched_language or syn.word_positions != expected:
        return None
    spans = word_spans(syn.audio, syn.word_samples)
    if spans is None:
        return None
    s0, e0 = spans[0][0], spans[-1][1]
    speech = resample(syn.audio[s0:e0] / 32768.0, ESPEAK_RATE, SAMPLE_RATE)
    speech *= 10 ** (rng.uniform(*PEAK_DBFS) / 20) / (np.abs(speech).max() + 1e-9)
    lead, trail = (int(rng.uniform(*PAD_S) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    duration = audio.size / SAMPLE_RATE

    def sec(sample: int) -> float:
        return min(round((sample - s0) / ESPEAK_RATE + lead / SAMPLE_RATE, 3), duration)

    words = [{"word": w, "start": sec(a), "end": sec(b)} for (w, _), (a, b) in zip(picks, spans, strict=True)]
    return np.clip(audio, -1, 1).astype(np.float32), "".join(w for w, _ in picks), words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=40)
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out_dir).resolve()
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    for split, count, key in (("train", args.num_train, 0), ("test", args.num_test, 1)):
        rows, rejected = [], 0
        for index in range(count):
            rng = np.random.default_rng(np.random.SeedSequence([args.seed, key, index]))
            for _ in range(100):
                clip = render(rng, int(rng.integers(args.min_words, args.max_words + 1)))
                if clip is not None:
                    break
                rejected += 1
            else:
                raise RuntimeError(f"no clean Japanese sentence for {split} {index} in 100 tries")
            audio, text, words = clip
            clip_id = f"ja-{split}-{index:06d}"
            path = out / "wavs" / f"{clip_id}.wav"
            sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
            row = {"id": clip_id, "audio": str(path), "text": text, "language": "Japanese"}
            rows.append({**row, "duration": audio.size / SAMPLE_RATE, "words": words})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log.info("%s: %d Japanese clips (%d sentences redrawn)", split, len(rows), rejected)


if __name__ == "__main__":
    main()
