"""``make bench``: the official SFT recipe against our default SFT path, same weights, same data, one run.

Why: the claim "we train faster than upstream" must come from one measurement in which machine noise hits
both sides. This script

1. writes a corpus with a realistic duration mix (log-normal, median 5.8 s, clipped to 1-30 s; tone-in-noise
   audio, since the content does not change the compute) as ONE JSONL in the official format
   ``{"audio": path, "text": "language English<asr_text>..."}``, read by both sides;
2. writes ONE model directory in the original ("thinker") layout that qwen-asr loads: small random widths
   (``--size``) with the real 151,936-row vocabulary (the tokenizer's base vocabulary padded with unreachable
   entries to Qwen's 151,643, the special tokens after it, embeddings sized 151,936), through our
   original-layout export;
3. runs (a) ``finetuning/qwen3_asr_sft.py`` at commit 7c6daf7, byte-identical (sha256-checked, see
   :mod:`benchmarks.official_launcher`), in the compat venv, and (b) ``python -m qwen3asr_train recipe=sft
   model=checkpoint ...`` at our defaults, alternating a/b/a/b (``--repeats``), one epoch each;
4. times both at the same point (the end of every optimizer step), drops the first ``--warmup-steps`` steps of
   each run, and prints audio-s/s, real tokens/s, padding fraction and peak RSS per side and as ratios.

Only what the official script cannot run without is passed to it: ``--eval_file`` (it hard-codes
``eval_strategy="steps"``), ``--batch_size`` / ``--grad_acc`` (its defaults 32 x 4 are sized for a GPU; see
``--official-batch-size``), ``--epochs 1`` and save/log intervals beyond the run. Everything else is its
default, including fp16 weights on a CPU (it picks bf16 only on a GPU of capability >= 8) and 4 loader workers.

    python -m benchmarks.bench_sft [--clips 16] [--repeats 2] [--workdir exp/bench] [--out bench.json] [our overrides...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "benchmarks" / "official_launcher.py"
REAL_VOCAB = 151_936
"""Rows of the released models' embedding and head (``text_config.vocab_size``)."""
QWEN_BASE_VOCAB = 151_643
"""Entries of Qwen's byte-level BPE before the special tokens (``<|endoftext|>`` is 151,643)."""
DURATION_MEDIAN_S = 5.8
DURATION_SIGMA = 0.8
MIN_S, MAX_S = 1.0, 30.0
WORDS_PER_SECOND = 2.5

log = logging.getLogger("bench_sft")

SIZES: dict[str, dict[str, int]] = {
    # model=small (configs/model/small.yaml): audio encoder 2 x 64, LLM 2 x 128
    "small": dict(
        audio_d_model=64,
        audio_layers=2,
        audio_heads=4,
        audio_ffn=256,
        downsample_hidden_size=32,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_head_dim=32,
        text_ffn=384,
    ),
    # model=tiny (the test size)
    "tiny": dict(
        audio_d_model=16,
        audio_layers=1,
        audio_heads=2,
        audio_ffn=32,
        downsample_hidden_size=4,
        text_hidden=16,
        text_layers=2,
        text_heads=2,
        text_kv_heads=1,
        text_head_dim=8,
        text_ffn=32,
    ),
}


# ------------------------------------------------------------------------------------------------ data
def draw_durations(n: int, seed: int) -> list[float]:
    """``n`` clip lengths: log-normal (median 5.8 s, sigma 0.8) clipped to 1-30 s, rounded to 10 ms."""
    rng = random.Random(seed)
    return [
        round(min(MAX_S, max(MIN_S, rng.lognormvariate(math.log(DURATION_MEDIAN_S), DURATION_SIGMA))), 2)
        for _ in range(n)
    ]


def write_corpus(directory: Path, n: int, seed: int) -> tuple[Path, Path, float]:
    """Clips + ``train.jsonl`` (official format) + a one-row ``eval.jsonl``; returns them and the total seconds."""
    from qwen3asr_train.testing import WORDS, write_clip

    rng = random.Random(seed + 1)
    rows = []
    for i, seconds in enumerate(draw_durations(n, seed)):
        wav = write_clip(directory / "wavs" / f"clip-{i:04d}.wav", seconds, seed * 10_000 + i)
        words = max(1, round(seconds * WORDS_PER_SECOND))
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"audio": str(wav), "text": f"language English<asr_text>{text}"})
    train = directory / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    valid = directory / "eval.jsonl"
    valid.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    total = sum(draw_durations(n, seed))
    return train, valid, total


# ----------------------------------------------------------------------------------------------- model
def real_vocab_tokenizer(texts: list[str], base_entries: int = QWEN_BASE_VOCAB) -> Any:
    """Our tiny byte-level BPE (trained on ``texts``) with its base vocabulary padded to ``base_entries``.

    The padding entries are unreachable (no merge produces them), so token ids of real text are those of the
    small BPE, while the special tokens sit after the padded base vocabulary as in Qwen's tokenizer
    (``<|endoftext|>`` = 151,643, ...) and the tokenizer files have the real size.
    """
    from qwen3asr_train.model.tiny import build_tokenizer

    return build_tokenizer(texts, base_entries=base_entries)


def write_model(directory: Path, texts: list[str], size: str, seed: int = 0) -> dict[str, int]:
    """A random model with the real vocabulary, written in the original layout (what qwen-asr loads)."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    from qwen3asr_train.config.schema import TinyModelConfig
    from qwen3asr_train.model.export import save_original
    from qwen3asr_train.model.tiny import build_config, build_processor, he_init_audio_convs

    tokenizer = real_vocab_tokenizer(texts)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, TinyModelConfig(**SIZES[size]))
    config.text_config.vocab_size = REAL_VOCAB
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ASRForConditionalGeneration(config)
        he_init_audio_convs(model)
    save_original(model, processor, directory)
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "vocab_rows": REAL_VOCAB, "tokenizer_entries": len(tokenizer)}


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Side:
    """One side's command line and where its step records go."""

    name: str
    argv: list[str]
    clock: Path
    log: Path


def official_side(
    compat_python: str,
    model_dir: Path,
    train: Path,
    valid: Path,
    out: Path,
    batch_size: int,
    grad_acc: int,
    epochs: float = 1.0,
) -> Side:
    clock = out / "clock.json"
    argv = [
        compat_python,
        str(LAUNCHER),
        "--clock-out",
        str(clock),
        "--",
        "--model_path",
        str(model_dir),
        "--train_file",
        str(train),
        "--eval_file",
        str(valid),
        "--output_dir",
        str(out / "official_out"),
        "--batch_size",
        str(batch_size),
        "--grad_acc",
        str(grad_acc),
        "--epochs",
        f"{epochs:g}",
        "--log_steps",
        "100000",
        "--save_steps",
        "100000",
    ]
    return Side("official", argv, clock, out / "log.txt")


def our_side(model_dir: Path, train: Path, out: Path, extra: list[str]) -> Side:
    clock = out / "clock.json"
    argv = [
        sys.executable,
        "-m",
        "qwen3asr_train",
        "recipe=sft",
        "model=checkpoint",
        f"model.path={model_dir}",
        f"data.train={train}",
        "trainer.max_epochs=1",
        f"run_dir={out / 'run'}",
        "trainer.enable_progress_bar=false",
        "recipe.export_on_end=false",  # after the timed steps; skipped to keep the bench short
        "+trainer.callbacks.bench_clock._target_=benchmarks.step_clock.StepClock",
        f"+trainer.callbacks.bench_clock.out={clock}",
        *extra,
    ]
    return Side("ours", argv, clock, out / "log.txt")


def run_side(side: Side, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one side to completion; its step records plus the process wall time (start-up included)."""
    side.log.parent.mkdir(parents=True, exist_ok=True)
    side.clock.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(side.log, "w") as handle:
        try:
            proc = subprocess.run(
                side.argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            )
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:  # the steps finished so far are in the clock file (the official side)
            returncode = None
    wall = time.perf_counter() - start
    if returncode is None:
        if not side.clock.exists():
            raise RuntimeError(
                f"{side.name} run passed --timeout {timeout:.0f} s before its first step; log {side.log}"
            )
        log.warning("%s run stopped at the %.0f s timeout: using the steps it finished", side.name, timeout)
        record = json.loads(side.clock.read_text())
        record.update(process_wall_s=wall, partial=True)
        return record
    if returncode != 0 or not side.clock.exists():
        tail = side.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{side.name} run failed (exit {returncode}); log {side.log}:\n{tail}")
    record = json.loads(side.clock.read_text())
    record["process_wall_s"] = wall
    return record


# ------------------------------------------------------------------------------------------- summaries
def summarise(record: dict[str, Any], warmup_steps: int) -> dict[str, float]:
    """Rates over the steps after the first ``warmup_steps`` (timed from the end of the last warm-up step).

    ``elapsed`` covers whole optimizer steps (data wait, forward, backward, optimizer) of the timed steps.
    """
    steps = record["steps"]
    if len(steps) <= warmup_steps:
        raise ValueError(f"{record.get('side')}: {len(steps)} steps, need more than the {warmup_steps} warm-up steps")
    timed = steps[warmup_steps:]
    start = steps[warmup_steps - 1]["t"] if warmup_steps > 0 else record["t_begin"]
    elapsed = timed[-1]["t"] - start
    total = {key: sum(s.get(key, 0.0) for s in timed) for key in ("audio_s", "real_tokens", "positions", "rows")}
    # rows of the LM head (151,936-way logits): the official model computes them at every position
    default_rows = "positions" if record.get("side") == "official" else "target_tokens"
    head_rows = sum(s.get("head_rows", s.get(default_rows, 0.0)) for s in timed)
    return {
        "steps": float(len(timed)),
        "elapsed_s": elapsed,
        "audio_s": total["audio_s"],
        "audio_s_per_s": total["audio_s"] / elapsed,
        "real_tokens_per_s": total["real_tokens"] / elapsed,
        "padding_fraction": 1.0 - total["real_tokens"] / max(total["positions"], 1.0),
        "rows_per_step": total["rows"] / len(timed),
        "head_rows_per_audio_s": head_rows / max(total["audio_s"], 1e-9),
        "s_per_step": elapsed / len(timed),
        "peak_rss_mb": float(record.get("peak_rss_mb", float("nan"))),
        "process_wall_s": float(record.get("process_wall_s", float("nan"))),
    }


def pool(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Several runs of one side as one: rates = summed work / summed time; peak memory = the largest."""
    elapsed = sum(s["elapsed_s"] for s in summaries)
    audio = sum(s["audio_s"] for s in summaries)
    tokens = sum(s["real_tokens_per_s"] * s["elapsed_s"] for s in summaries)
    positions = sum(
        s["real_tokens_per_s"] * s["elapsed_s"] / max(1e-12, 1.0 - s["padding_fraction"]) for s in summaries
    )
    return {
        "runs": float(len(summaries)),
        "elapsed_s": elapsed,
        "audio_s_per_s": audio / elapsed,
        "real_tokens_per_s": tokens / elapsed,
        "padding_fraction": 1.0 - tokens / max(positions, 1.0),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in summaries),
        "s_per_step": elapsed / sum(s["steps"] for s in summaries),
        "process_wall_s": sum(s["process_wall_s"] for s in summaries) / len(summaries),
        "head_rows_per_audio_s": sum(s["head_rows_per_audio_s"] * s["audio_s"] for s in summaries) / audio,
    }


def ratios(ours: dict[str, float], official: dict[str, float]) -> dict[str, float]:
    """ours / official for the rates and the padding fraction, official / ours for memory (>1 = ours better)."""
    return {
        "audio_s_per_s": ours["audio_s_per_s"] / official["audio_s_per_s"],
        "real_tokens_per_s": ours["real_tokens_per_s"] / official["real_tokens_per_s"],
        "padding_fraction": ours["padding_fraction"] / max(official["padding_fraction"], 1e-12),
        "peak_rss_official_over_ours": official["peak_rss_mb"] / ours["peak_rss_mb"],
    }


def markdown(result: dict[str, Any]) -> str:
    """The printed table (also what docs/performance.md quotes)."""
    o, u, r = result["official"], result["ours"], result["ratio"]
    lines = [
        "| | official recipe | ours | ours / official |",
        "|---|---|---|---|",
        f"| audio-s/s | {o['audio_s_per_s']:.2f} | {u['audio_s_per_s']:.2f} | **{r['audio_s_per_s']:.2f}x** |",
        f"| real tokens/s | {o['real_tokens_per_s']:.0f} | {u['real_tokens_per_s']:.0f} | {r['real_tokens_per_s']:.2f}x |",
        f"| padding fraction (decoder) | {o['padding_fraction']:.1%} | {u['padding_fraction']:.1%} | "
        f"{r['padding_fraction']:.2f}x |",
        f"| peak RSS, training process | {o['peak_rss_mb']:.0f} MB | {u['peak_rss_mb']:.0f} MB | "
        f"official uses {r['peak_rss_official_over_ours']:.2f}x |",
        f"| s per optimizer step | {o['s_per_step']:.2f} | {u['s_per_step']:.2f} | |",
        f"| LM-head rows per audio-second | {o['head_rows_per_audio_s']:.1f} | {u['head_rows_per_audio_s']:.1f} | "
        f"{u['head_rows_per_audio_s'] / o['head_rows_per_audio_s']:.2f}x |",
        f"| process wall time per run (start-up incl.) | {o['process_wall_s']:.0f} s | {u['process_wall_s']:.0f} s | |",
    ]
    per_run = ", ".join(f"{x:.2f}x" for x in result["per_repeat_audio_ratio"])
    lines.append(f"\nper-repeat audio-s/s ratios: {per_run}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """CPU model and core count (``/proc/cpuinfo``), Python and the date (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "python": platform.python_version(),
    }


def default_compat_python() -> str:
    return os.environ.get("QWEN3ASR_COMPAT_PYTHON", str(ROOT / ".venv-compat" / "bin" / "python"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="official SFT recipe vs ours, same weights and data (make bench)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "exp" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default <workdir>/bench.json)")
    parser.add_argument("--clips", type=int, default=16, help="clips in the corpus (our side: one epoch)")
    parser.add_argument("--repeats", type=int, default=2, help="a/b pairs, alternating")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps of each run left out of the timing")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--official-batch-size",
        type=int,
        default=2,
        help="its --batch_size (its default 32 is sized for GPUs; on a CPU it trains in fp16, whose matmuls run at "
        "3-5 GFLOP/s on AVX2 machines: a step of 4 clips took ~2.5 CPU-minutes on an AMD EPYC)",
    )
    parser.add_argument("--official-grad-acc", type=int, default=1, help="its --grad_acc (ours: 1 at defaults)")
    parser.add_argument(
        "--official-epochs",
        type=float,
        default=0.25,
        help="its --epochs: a fraction of the corpus (HF rounds the steps up), since each of its CPU steps costs "
        "about a CPU-minute per 2 clips; ours trains the whole epoch. Both draw from the same clips",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--compat-python", default=default_compat_python())
    parser.add_argument("--only", choices=["both", "ours", "official"], default="both", help="debugging")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("ours_overrides", nargs="*", help="extra overrides for our side, e.g. data.packing=true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.only != "ours" and not Path(args.compat_python).exists():
        raise SystemExit(
            f"{args.compat_python}: no compat venv; run `make compat-venv` (or set QWEN3ASR_COMPAT_PYTHON)"
        )
    if args.only != "ours":
        sys.path.insert(0, str(ROOT))
        from benchmarks.official_launcher import upstream_bytes

        upstream_bytes()  # refuses an edited copy before any work

    work = args.workdir
    data_dir, model_dir = work / "data", work / "model"
    train, valid, total_audio = write_corpus(data_dir, args.clips, args.seed)
    texts = [json.loads(line)["text"].split("<asr_text>", 1)[1] for line in train.read_text().splitlines()]
    model_info = write_model(model_dir, texts, args.size, args.seed)
    log.info("corpus: %d clips, %.0f s of audio; model: %s", args.clips, total_audio, model_info)

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),
        "PYTHONWARNINGS": "ignore",
    }
    records: dict[str, list[dict[str, Any]]] = {"official": [], "ours": []}
    for k in range(args.repeats):
        sides = []
        if args.only in ("both", "official"):
            sides.append(
                official_side(
                    args.compat_python,
                    model_dir,
                    train,
                    valid,
                    work / f"official-{k}",
                    args.official_batch_size,
                    args.official_grad_acc,
                    args.official_epochs,
                )
            )
        if args.only in ("both", "ours"):
            sides.append(our_side(model_dir, train, work / f"ours-{k}", list(args.ours_overrides)))
        for side in sides:
            log.info("repeat %d/%d: %s", k + 1, args.repeats, side.name)
            record = run_side(side, env, args.timeout)
            summary = summarise(record, args.warmup_steps)
            log.info("%s: %.2f audio-s/s over %d steps", side.name, summary["audio_s_per_s"], summary["steps"])
            records[side.name].append(summary)

    result: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "corpus": {"clips": args.clips, "audio_s": total_audio, "durations": "log-normal median 5.8 s, 1-30 s"},
        "model": {"size": args.size, **model_info},
        "official_args": {
            "batch_size": args.official_batch_size,
            "grad_acc": args.official_grad_acc,
            "epochs": args.official_epochs,
        },
        "ours_overrides": list(args.ours_overrides),
        "warmup_steps": args.warmup_steps,
        "runs": records,
    }
    for name in ("official", "ours"):
        if records[name]:
            result[name] = pool(records[name])
    if records["official"] and records["ours"]:
        result["ratio"] = ratios(result["ours"], result["official"])
        result["per_repeat_audio_ratio"] = [
            u["audio_s_per_s"] / o["audio_s_per_s"] for o, u in zip(records["official"], records["ours"], strict=True)
        ]
        print(markdown(result))  # noqa: T201 - the command's output
    out = args.out or work / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
