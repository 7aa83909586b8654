"""Step-cost breakdown of GSPO on CPU: plain rollouts vs shared-prefix rollouts, in one run.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gspo_step_cost.py             # random model=small, tone clips
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gspo_step_cost.py --model-path exp/demo_sft/export \\
        --manifest exp/demo_sft/corpus/test.jsonl                                # a trained export, real lengths

Each configuration trains the real ``recipe=gspo`` stage (``stages/gspo.py`` under Lightning) for
``--warmup`` rollout batches, then ``--batches`` measured ones, and reads the stage's own phase timer
(``rl/timing.py``): generation (prompts + encoder + sampling), rewards (+ advantages), old log-probs,
update forward (log-probs with grad + loss), backward + optimizer (incl. gradient clipping). "other" is
the rest of the measured optimizer steps' time (Lightning, logging, data hand-over). The step is the time
per optimizer step (a rollout batch is amortised over its ``steps_per_generation`` steps); the ratio is step / (update forward + backward + optimizer). Times are the training process's CPU
time (``time.process_time``; one torch thread), medians over ``--repeats`` interleaved runs: on a machine
shared with other jobs wall time swings with their load (the wall-clock ratios are printed too). The
configurations:

* ``plain``: ``recipe.shared_prefix=false recipe.reuse_prompt_state=false`` (prompts repeated G times
  before ``generate``, every log-prob pass re-encodes and re-runs prompt + completion per row);
* ``shared-hf-recompute``: the previous default (one prefill per prompt, continuations sampled from the
  shared cache through the transformers forward, ``recipe.fast_decode=false``; the behaviour log-probs are
  recomputed over the rollout's prompt state, ``recipe.sampler_logprobs_in_process=false``);
* ``shared-hf``: as above, with the behaviour log-probs taken from the sampler (the same numbers in float32);
* ``shared``: the defaults (as ``shared-hf``, with the lean decode step of ``rl/fast_decode.py``).

A random model almost never emits its end token, so every completion runs to the length budget
(``tokens_per_second`` × the longest clip + ``min_new_tokens``): the worst case for generation.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from qwen3asr_train.config.load import CONFIG_DIR, register_schemas, to_typed  # noqa: E402
from qwen3asr_train.rl import rewards  # noqa: E402
from qwen3asr_train.stages import gspo  # noqa: E402
from qwen3asr_train.testing import write_manifest  # noqa: E402

PHASES = ("generation", "rewards", "old_logprobs", "update_forward", "backward_optimizer")
CONFIGS = {
    "plain": ["recipe.shared_prefix=false", "recipe.reuse_prompt_state=false"],
    "shared-hf-recompute": [
        "recipe.shared_prefix=true",
        "recipe.fast_decode=false",
        "recipe.sampler_logprobs_in_process=false",
    ],
    "shared-hf": ["recipe.shared_prefix=true", "recipe.fast_decode=false"],
    "shared": ["recipe.shared_prefix=true"],
}
DEFAULT = "shared"
"""The configuration ``recipe=gspo`` runs without overrides."""


class _Window(L.Callback):
    """Resets the stage's phase timer after the warm-up steps and times the measured steps (wall and CPU)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup_steps:
            pl_module.timer.reset()
            self.start = (time.perf_counter(), time.process_time())
        elif trainer.global_step > self.warmup_steps:
            self.end = (time.perf_counter(), time.process_time())
            self.steps = trainer.global_step - self.warmup_steps


def measure(overrides: list[str], warmup_steps: int) -> dict[str, dict[str, float]]:
    """Train with ``overrides``; per clock (``cpu``, ``wall``): seconds per optimizer step of each phase,
    ``other``, ``step``, ``update`` and ``ratio``."""
    for cached in (
        rewards._normalised,
        rewards._units,
        rewards._repetition,
    ):  # start every configuration from cold reward caches
        cached.cache_clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=overrides))
    window = _Window(warmup_steps)
    module, loader, trainer, _ = gspo.prepare(cfg, [window])
    trainer.fit(module, train_dataloaders=loader)
    if window.start is None or window.end is None or window.steps == 0:
        raise RuntimeError("no measured steps: raise --batches")
    out = {}
    for k, (clock, seconds) in enumerate((("wall", module.timer.seconds), ("cpu", module.timer.cpu_seconds))):
        per_step = {name: seconds.get(name, 0.0) / window.steps for name in PHASES}
        per_step["step"] = (window.end[k] - window.start[k]) / window.steps
        per_step["other"] = per_step["step"] - sum(per_step[name] for name in PHASES)
        per_step["update"] = per_step["update_forward"] + per_step["backward_optimizer"]
        per_step["ratio"] = per_step["step"] / per_step["update"]
        out[clock] = per_step
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: ms per optimizer step and share of the step, per configuration."""
    names = list(results)
    lines = ["| phase | " + " | ".join(f"{n} ms/step | {n} %" for n in names) + " |"]
    lines.append("|---|" + "---|---|" * len(names))
    for phase in (*PHASES, "other", "step"):
        cells = []
        for n in names:
            r = results[n]
            cells += [f"{1000 * r[phase]:.1f}", f"{100 * r[phase] / r['step']:.0f}"]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **step / update** | " + " | ".join(f"**{results[n]['ratio']:.2f}×** | " for n in names) + " |")
    return "\n".join(lines)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="model config group for a random model (default: small)")
    parser.add_argument("--model-path", default=None, help="an export to start from instead of a random model")
    parser.add_argument("--manifest", default=None, help="rollout manifest (default: synthetic tone clips)")
    parser.add_argument("--clips", type=int, default=32, help="synthetic clips (without --manifest)")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rollout-batch-size", type=int, default=8)
    parser.add_argument("--steps-per-generation", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="rollout batches before measuring")
    parser.add_argument("--batches", type=int, default=3, help="measured rollout batches")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only these configurations")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the median is reported")
    parser.add_argument("--num-workers", type=int, default=1, help="data.num_workers (the recipes use 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    register_schemas()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or str(
            write_manifest(
                Path(tmp), args.clips, seed=args.seed, min_seconds=args.min_seconds, max_seconds=args.max_seconds
            )
        )
        model = (
            [f"model={args.model}"]
            if args.model_path is None
            else ["model=checkpoint", f"model.path={args.model_path}"]
        )
        warmup_steps = args.warmup * args.steps_per_generation
        base = [
            "recipe=gspo",
            *model,
            f"data.train={manifest}",
            f"data.num_workers={args.num_workers}",
            "trainer=cpu",
            "logger=none",
            f"trainer.max_steps={warmup_steps + args.batches * args.steps_per_generation}",
            "trainer.checkpoint_every_n_steps=100000",
            "trainer.enable_progress_bar=false",
            f"recipe.group_size={args.group_size}",
            f"recipe.rollout_batch_size={args.rollout_batch_size}",
            f"recipe.steps_per_generation={args.steps_per_generation}",
            "recipe.export_on_end=false",
            f"seed={args.seed}",
        ]
        runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in args.only or list(CONFIGS)}
        for repeat in range(args.repeats):  # configurations interleaved, so a change in machine load hits all
            for name in runs:
                overrides = [*base, *CONFIGS[name], f"run_dir={tmp}/{name}-{repeat}"]
                runs[name].append(measure(overrides, warmup_steps))
    results = {clock: {name: _median([r[clock] for r in rs]) for name, rs in runs.items()} for clock in ("cpu", "wall")}
    settings = (
        f"model {args.model_path or args.model}, G={args.group_size}, {args.rollout_batch_size} utterances per "
        f"rollout batch, {args.steps_per_generation} minibatches, {args.batches} measured rollout batches x "
        f"{args.repeats} repeats (median), data.num_workers={args.num_workers}, torch threads {torch.get_num_threads()}"
    )
    print(f"GSPO step cost, CPU time of the training process ({settings})\n")  # noqa: T201
    print(table(results["cpu"]))  # noqa: T201
    print("\nwall clock: " + ", ".join(f"{n} {r['ratio']:.2f}×" for n, r in results["wall"].items()))  # noqa: T201
    if DEFAULT in runs:
        per_repeat = ", ".join(f"{r['cpu']['ratio']:.2f}×" for r in runs[DEFAULT])
        print(f"default ({DEFAULT}) step/update per repeat, CPU time: {per_repeat}")  # noqa: T201
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # noqa: T201
    if "plain" in runs:
        for name in runs:
            if name != "plain":
                speed = {c: results[c]["plain"]["step"] / results[c][name]["step"] for c in ("cpu", "wall")}
                print(f"{name}: step {speed['cpu']:.2f}× faster than plain (wall {speed['wall']:.2f}×)")  # noqa: T201
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
