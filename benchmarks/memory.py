"""``make memory``: training memory per GPU for Qwen3-ASR-0.6B / 1.7B under each strategy (see qwen3asr_train/memory.py).

Measures the activation bytes per audio-second, decoder token and target token on 1-2-layer models of the
real widths (random weights, CPU, bf16 autocast), with and without gradient checkpointing (``full``: the
encoder and decoder layers plus the whole audio encoder, its convolution front-end included), extrapolates
to the full layer counts, adds the per-GPU states of each strategy, and prints both tables as markdown.

    python -m benchmarks.memory [--audio-s 120 --tokens 2200 --targets 450] [--gpus 8] [--ce-chunk 512]
        [--sizes 0.6B 1.7B] [--budget-gib 24] [--out memory.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from qwen3asr_train import memory

log = logging.getLogger("memory")


def read_cache(path: Path | None) -> dict:
    """Measured rates by "<size>, ckpt <mode>, chunk <n>" ({} without a cache file)."""
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def write_cache(path: Path, key: str, rates: dict) -> None:
    """Add one entry (re-reading the file first, so concurrent runs for other sizes keep theirs)."""
    data = read_cache(path)
    data[key] = rates
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="training memory per GPU (make memory)")
    parser.add_argument("--sizes", nargs="+", default=list(memory.REAL_SIZES), choices=list(memory.REAL_SIZES))
    parser.add_argument(
        "--audio-s", type=float, default=memory.MicroBatch.audio_s, help="audio seconds per micro-batch"
    )
    parser.add_argument("--tokens", type=float, default=memory.MicroBatch.tokens, help="decoder tokens per micro-batch")
    parser.add_argument(
        "--targets", type=float, default=memory.MicroBatch.targets, help="target tokens per micro-batch"
    )
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the sharded/data-parallel rows")
    parser.add_argument("--ce-chunk", type=int, default=512, help="recipe.ce_chunk_tokens (0: unchunked head)")
    parser.add_argument("--ddp-no-bucket-view", action="store_true", help="DDP without gradient_as_bucket_view")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="the card size the summary checks")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="JSON of measured rates: reused when it has the (size, mode, CE chunk) entry, updated after each measurement",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    batch = memory.MicroBatch(args.audio_s, args.tokens, args.targets)
    opts = memory.StateOptions(gpus=args.gpus, ddp_bucket_view=not args.ddp_no_bucket_view)
    rows: list[memory.Estimate] = []
    measured: dict[str, memory.ActivationRates] = {}
    for name in args.sizes:
        size = memory.REAL_SIZES[name]
        for mode in ("none", "full"):
            key = f"{name}, ckpt {mode}"
            cached = read_cache(args.cache).get(f"{key}, chunk {args.ce_chunk}")
            if cached is not None:
                measured[key] = memory.ActivationRates(**cached)
                log.info("%s: rates from %s", key, args.cache)
                continue
            start = time.perf_counter()
            measured[key] = memory.measure_rates(size, checkpointing=mode, ce_chunk_tokens=args.ce_chunk)
            log.info("measured %s in %.0f s: %s", key, time.perf_counter() - start, measured[key])
            if args.cache is not None:
                write_cache(args.cache, f"{key}, chunk {args.ce_chunk}", asdict(measured[key]))
        rows += memory.estimate(
            name, measured[f"{name}, ckpt none"], measured[f"{name}, ckpt full"], batch, opts, args.ce_chunk
        )

    print(f"## measured activation sizes (bf16 autocast, CE chunk {args.ce_chunk})\n")  # noqa: T201
    print(memory.rates_table(measured))  # noqa: T201
    print(  # noqa: T201
        f"\n## per GPU, micro-batch of {batch.audio_s:g} audio-s / {batch.tokens:g} decoder tokens / "
        f"{batch.targets:g} targets, {args.gpus} GPUs where sharded\n"
    )
    print(memory.markdown_table(rows))  # noqa: T201
    print()  # noqa: T201
    for row in rows:
        if row.strategy == "1 GPU":
            seconds = memory.largest_fitting_seconds(row, batch, args.budget_gib)
            print(  # noqa: T201
                f"{row.model}, 1 GPU, checkpointing: {row.total(True) / memory.GIB:.1f} GiB "
                f"({'fits' if row.total(True) / memory.GIB <= args.budget_gib else 'does not fit'} "
                f"{args.budget_gib:g} GiB); largest micro-batch that fits: ~{seconds:.0f} audio-s"
            )
    result = {
        "micro_batch": asdict(batch),
        "state_options": asdict(opts),
        "ce_chunk_tokens": args.ce_chunk,
        "rates": {k: asdict(v) for k, v in measured.items()},
        "rows": [{**asdict(r), "total_no_ckpt": r.total(False), "total_ckpt": r.total(True)} for r in rows],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
