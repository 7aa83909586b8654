"""``make gpu-check``: everything a lent CUDA machine should tell us, in one prepared run (< 10 minutes).

1. The GPU tests (``pytest -m gpu tests/test_gpu.py``): bf16-mixed SFT, flash-attention varlen packing =
   unpacked loss, FSDP and DeepSpeed ZeRO-2/3 two-step runs on one GPU with checkpoint save and resume
   (each skips with its reason where it cannot run, e.g. no flash-attn or no DeepSpeed build).
2. A throughput bench of the 0.6B and 1.7B architectures with random weights: our SFT forward (backbone +
   target-only chunked head and loss), backward and fused AdamW step under bf16 autocast with fp32 master
   weights, gradient checkpointing as the GPU configs set it, on synthetic micro-batches at the default
   budget (120 audio-seconds of a 1-30 s duration mix, packed when packing is available). It reports
   audio-s/s, real tokens/s, step time, MFU (model FLOPs per :class:`qwen3asr_train.training.ModelFlops` over
   the card's bf16 peak) and the peak allocated memory, next to the estimator's prediction
   (:mod:`qwen3asr_train.memory`) for the same micro-batch.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``$OUT`` when set, else ``./gpu_check_out``. Without CUDA it
exits with status 2 and says so; ``--dry-run`` runs every part on the CPU with a tiny model instead (the
plumbing test in tests/test_bench.py).

    python -m benchmarks.gpu_check [--dry-run] [--sizes 0.6B 1.7B] [--steps 8] [--skip-tests]
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
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from qwen3asr_train import memory

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_check")

TINY = dict(
    encoder_layers=1,
    d_model=16,
    encoder_attention_heads=2,
    encoder_ffn_dim=32,
    output_dim=16,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    downsample_hidden_size=4,
)
"""The dry-run model (the test size)."""


def out_dir(explicit: Path | None) -> Path:
    """``--out``, else ``$OUT`` (what a lent machine copies back), else ``./gpu_check_out``."""
    if explicit is not None:
        return explicit
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu_check_out")


# --------------------------------------------------------------------------------------------- tests
def run_gpu_tests(out: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m gpu`` on tests/test_gpu.py; counts from its JUnit XML, the log next to it."""
    junit = out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py", f"--junitxml={junit}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    result: dict[str, Any] = {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if junit.exists():
        cases = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            status, detail = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status, detail = child.tag, (child.get("message") or "")[:300]
            cases.append({"test": case.get("name"), "status": status, "detail": detail})
        result["cases"] = cases
        for status in ("passed", "failure", "error", "skipped"):
            result[status] = sum(c["status"] == status for c in cases)
    return result


# --------------------------------------------------------------------------------------------- bench
def synthetic_batch(
    seconds: list[float], vocab: int, device: torch.device, pack: bool, seed: int = 0
) -> dict[str, Any]:
    """A padded (or packed) SFT micro-batch of clips of these lengths: 20 prompt tokens, 2.5 words/s x 1.3
    tokens per word of target, random mel and ids; with the count keys our collators add."""
    from qwen3asr_train.data.audio import audio_tokens_for_frames

    samples = [memory.Sample(s, 20, max(4, round(s * 2.5 * 1.3) + 6)) for s in seconds]
    parts = [memory.make_batch(s, vocab, seed + i) for i, s in enumerate(samples)]
    length = max(p["input_ids"].shape[1] for p in parts)
    frames = max(p["input_features"].shape[2] for p in parts)
    pad = memory.special_ids(vocab)["pad"]
    batch: dict[str, Any] = {
        "input_ids": torch.full((len(parts), length), pad),
        "attention_mask": torch.zeros((len(parts), length), dtype=torch.long),
        "labels": torch.full((len(parts), length), -100),
        "input_features": torch.zeros((len(parts), memory.MEL_BINS, frames)),
        "input_features_mask": torch.zeros((len(parts), frames), dtype=torch.long),
    }
    for i, p in enumerate(parts):  # right padding, as our SFT collator
        n, f = p["input_ids"].shape[1], p["input_features"].shape[2]
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key][i, :n] = p[key][0]
        batch["input_features"][i, :, :f] = p["input_features"][0]
        batch["input_features_mask"][i, :f] = p["input_features_mask"][0]
    valid = [int(round(s * memory.FRAMES_PER_SECOND)) for s in seconds]
    batch.update(
        num_target_tokens=int((batch["labels"] != -100).sum()),
        num_real_tokens=int(batch["attention_mask"].sum()),
        num_audio_tokens=sum(audio_tokens_for_frames(f) for f in valid),
        num_audio_chunks=sum(math.ceil(f / memory.FRAMES_PER_SECOND) for f in valid),
        audio_seconds=float(sum(seconds)),
    )
    if pack:
        from qwen3asr_train.data.packing import pack_batch

        batch = pack_batch(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def budget_batches(n: int, budget_s: float, seed: int) -> list[list[float]]:
    """``n`` micro-batches of the 1-30 s log-normal mix (median 5.8 s), each filled up to ``budget_s`` seconds."""
    rng = random.Random(seed)
    batches = []
    for _ in range(n):
        clips: list[float] = []
        while True:
            s = round(min(30.0, max(1.0, rng.lognormvariate(math.log(5.8), 0.8))), 2)
            if clips and sum(clips) + s > budget_s:
                break
            clips.append(s)
        batches.append(clips)
    return batches


def defaults() -> dict[str, Any]:
    """Our default GPU-run settings, read from the configs so the bench follows them."""
    from qwen3asr_train.config.data import DataConfig
    from qwen3asr_train.config.recipes import SFTConfig

    data, sft = DataConfig(), SFTConfig()
    return {
        "budget_s": float(data.max_batch_seconds),
        "pack": bool(getattr(data, "packing", False)),
        "ce_chunk_tokens": int(getattr(sft, "ce_chunk_tokens", 0)),
    }


def model_flops(model: torch.nn.Module) -> Any:
    """:class:`qwen3asr_train.training.ModelFlops` of the model (None where that class does not exist)."""
    from qwen3asr_train import training

    flops = getattr(training, "ModelFlops", None)
    return flops.from_model(model) if flops is not None else None


def bench_size(
    name: str, size: dict[str, int], vocab: int, device: torch.device, steps: int, warmup: int, opts: dict[str, Any]
) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps of one micro-batch each; time the last ``steps``."""
    from transformers import Qwen3ASRForConditionalGeneration

    from qwen3asr_train.model.builder import select_attention

    torch.manual_seed(0)
    config = memory.asr_config(size, vocab=vocab)
    config._attn_implementation = select_attention("auto") if device.type == "cuda" else "sdpa"
    with torch.device(device):
        model = Qwen3ASRForConditionalGeneration(config)
    model.train()
    memory.enable_checkpointing(model, "full" if opts["checkpointing"] else "none")
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    flops = model_flops(model)
    batches = [
        synthetic_batch(c, vocab, device, opts["pack"], seed=i)
        for i, c in enumerate(budget_batches(warmup + steps, opts["budget_s"], seed=1))
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    totals = {"audio_s": 0.0, "real_tokens": 0.0, "positions": 0.0, "model_flops": 0.0}
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = memory.training_forward(model, batch, opts["ce_chunk_tokens"])
        (loss / max(batch["num_target_tokens"], 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            totals["audio_s"] += batch["audio_seconds"]
            totals["real_tokens"] += batch["num_real_tokens"]
            totals["positions"] += batch["input_ids"].numel()
            totals["model_flops"] += flops.of_batch(batch) if flops is not None else 0.0
    sync()
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention": config._attn_implementation,
        "steps": steps,
        "clips_per_step": sum(len(b) for b in budget_batches(warmup + steps, opts["budget_s"], 1)[warmup:]) / steps,
        "s_per_step": elapsed / steps,
        "audio_s_per_s": totals["audio_s"] / elapsed,
        "real_tokens_per_s": totals["real_tokens"] / elapsed,
        "real_token_fraction": totals["real_tokens"] / max(totals["positions"], 1.0),
        "model_tflops_per_s": totals["model_flops"] / elapsed / 1e12,
        "final_loss_per_token": float(loss.detach()) / max(batches[-1]["num_target_tokens"], 1),
    }
    if device.type == "cuda":
        from qwen3asr_train import training

        peak_fn = getattr(training, "peak_flops", None)
        peak = peak_fn(device, 0.0) if peak_fn is not None else 0.0
        result["peak_tflops_bf16"] = peak / 1e12 if peak else None
        result["mfu"] = totals["model_flops"] / elapsed / peak if peak else None
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / memory.GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / memory.GIB
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def predicted_gib(name: str, budget_s: float, ce_chunk: int, checkpointing: bool) -> float | None:
    """The estimator's 1-GPU total for this micro-batch (measured rates at the real widths; a few CPU-minutes)."""
    if name not in memory.REAL_SIZES:
        return None
    size = memory.REAL_SIZES[name]
    mode = "full" if checkpointing else "none"
    rates = memory.measure_rates(size, checkpointing=mode, ce_chunk_tokens=ce_chunk)
    scale = budget_s / memory.MicroBatch.audio_s
    batch = memory.MicroBatch(budget_s, memory.MicroBatch.tokens * scale, memory.MicroBatch.targets * scale)
    row = memory.estimate(name, rates, rates, batch, memory.StateOptions(gpus=1), ce_chunk, ("1 GPU",))[0]
    return row.total(checkpointing) / memory.GIB


# ------------------------------------------------------------------------------------------ summary
def markdown(result: dict[str, Any]) -> str:
    lines = [f"# gpu-check {result['date_utc']} on {result['device']}", ""]
    tests = result.get("tests")
    if tests:
        lines += [
            f"GPU tests: {tests.get('passed', 0)} passed, {tests.get('failure', 0)} failed, "
            f"{tests.get('error', 0)} errors, {tests.get('skipped', 0)} skipped ({tests['seconds']} s)",
            "",
        ]
        for case in tests.get("cases", []):
            lines.append(f"- {case['test']}: {case['status']} {case['detail']}".rstrip())
        lines.append("")
    lines += [
        "| model | s/step | audio-s/s | real tokens/s | real-token share | model TFLOP/s | MFU | peak alloc GiB | "
        "estimator GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in result.get("bench", []):
        mfu = f"{b['mfu']:.1%}" if b.get("mfu") else "n/a"
        peak = f"{b['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in b else "n/a"
        pred = f"{b['predicted_gib']:.1f}" if b.get("predicted_gib") else "n/a"
        lines.append(
            f"| {b['model']} | {b['s_per_step']:.3f} | {b['audio_s_per_s']:.0f} | {b['real_tokens_per_s']:.0f} | "
            f"{b['real_token_fraction']:.1%} | {b['model_tflops_per_s']:.1f} | {mfu} | {peak} | {pred} |"
        )
    lines += ["", f"settings: {json.dumps(result['settings'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU tests + 0.6B/1.7B throughput/MFU/memory bench (make gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: test the plumbing without a GPU")
    parser.add_argument("--sizes", nargs="+", default=list(memory.REAL_SIZES), choices=list(memory.REAL_SIZES))
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile)")
    parser.add_argument("--skip-tests", action="store_true", help="only the bench")
    parser.add_argument(
        "--estimate", action="store_true", help="also run the memory estimator for each size (a few CPU-minutes)"
    )
    parser.add_argument("--tests-timeout", type=float, default=420.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not args.dry_run and not torch.cuda.is_available():
        print(  # noqa: T201 - the command's answer
            "gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing was run. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or use --dry-run to test the "
            "plumbing on the CPU.",
            file=sys.stderr,
        )
        return 2
    out = out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    opts = {**defaults(), "checkpointing": True}
    run_opts = {**opts, "budget_s": 8.0} if args.dry_run else opts  # a tiny model's budget: a few clips
    result: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {**run_opts, "steps": args.steps, "warmup": args.warmup},
    }
    if not args.skip_tests:
        log.info("GPU tests")
        result["tests"] = run_gpu_tests(out, args.tests_timeout)
    result["bench"] = []
    sizes = {"tiny": TINY} if args.dry_run else {n: memory.REAL_SIZES[n] for n in args.sizes}
    vocab = 512 if args.dry_run else memory.VOCAB
    for name, size in sizes.items():
        log.info("bench %s", name)
        row = bench_size(name, size, vocab, device, args.steps, args.warmup, run_opts)
        if not args.dry_run and args.estimate:
            row["predicted_gib"] = predicted_gib(name, opts["budget_s"], opts["ce_chunk_tokens"], True)
        result["bench"].append(row)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a kill
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))  # noqa: T201
    failed = result.get("tests", {}).get("failure", 0) + result.get("tests", {}).get("error", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
