"""Where the CPU time of one demo SFT step goes: the data path versus the model, user versus system time.

Why a script of its own: a 0.6M-parameter model should not need 0.7 CPU-s per step, and guessing where the
time goes (feature extraction? resampling? Lightning?) is how the wrong part gets optimised. This builds the
demo's run exactly as ``recipe=sft`` does (``stages.sft.prepare``), then measures, with the process's own
CPU clock (``getrusage``: user and system seconds, so other jobs on a shared machine do not count):

* data: the loader with ``data.num_workers=0`` (decode, speed perturbation, log-mel, token ids, padding)
  for ``--steps`` optimizer steps;
* model: forward (``SFTModule.forward_sums``: CE + CTC), backward and an AdamW step on those batches, after
  3 warm-up steps; the Lightning loop itself is not included (compare with a real run's CPU-s per step);
* optionally (``--ops``) the top operators of ``torch.profiler`` over 10 steps.

Run it with the same environment as the recipe (``run.sh`` exports the malloc thresholds); the 2026-12-02
"cheap step" entry of docs/results.md shows the system time that glibc's settings decide.

Usage: python recipes/demo_sft/step_cost.py --corpus exp/demo_sft/corpus [--steps 30] [--ops] [override ...]
(overrides as on the command line of ``python -m qwen3asr_train experiment=demo_sft``, e.g.
``data.max_batch_seconds=15``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from qwen3asr_train.config.load import CONFIG_DIR, register_schemas, to_typed  # noqa: E402
from qwen3asr_train.stages import sft  # noqa: E402

log = logging.getLogger("step_cost")

WARMUP_STEPS = 3
"""Model steps run before timing (first-call allocations and kernel selection)."""


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measure(corpus: Path, overrides: list[str], steps: int, ops: bool) -> dict[str, float]:
    """CPU seconds per optimizer step of the data path and of the model (see the module docstring).

    The run directory is a temporary one, removed afterwards: each call writes a resolved config and
    logger files there, and the test suite calls this on every run.
    """
    with tempfile.TemporaryDirectory(prefix="step_cost_") as run_dir:
        return _measure(corpus, overrides, steps, ops, run_dir)


def _measure(corpus: Path, overrides: list[str], steps: int, ops: bool, run_dir: str) -> dict[str, float]:
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose(
            "config",
            overrides=[
                "experiment=demo_sft",
                f"data.train={corpus / 'train.jsonl'}",
                "~evaluation.sets.heldout",  # the demo config names exp/demo_sft/corpus/test.jsonl
                "data.num_workers=0",
                f"run_dir={run_dir}",
                *overrides,
            ],
        )
    cfg = to_typed(raw)
    module, datamodule, _trainer, _processor = sft.prepare(cfg)
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())

    user0, sys0 = cpu_times()
    windows = [next(batches) for _ in range(steps + WARMUP_STEPS)]
    user1, sys1 = cpu_times()
    micro = [b for w in windows for b in (w if isinstance(w, list) else [w])]
    per_window = len(micro) / len(windows)

    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.recipe.optim.lr)

    def step(batch: dict) -> None:
        sums = module.forward_sums(batch)
        loss = sums["ce_sum"] + module.recipe.ctc_weight * sums.get("ctc_sum", torch.zeros(()))  # ()
        (loss / batch["window_target_tokens"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in micro[: int(WARMUP_STEPS * per_window)]:
        step(batch)
    timed = micro[int(WARMUP_STEPS * per_window) :]
    user2, sys2 = cpu_times()
    for batch in timed:
        step(batch)
    user3, sys3 = cpu_times()
    n_model_steps = len(timed) / per_window
    padded = sum(b["input_features"].shape[0] * b["input_features"].shape[2] for b in micro)
    valid = sum(int(b["input_features_mask"].sum()) for b in micro)
    result = {
        "steps": steps,
        "data_user_s_per_step": (user1 - user0) / len(windows),
        "data_sys_s_per_step": (sys1 - sys0) / len(windows),
        "model_user_s_per_step": (user3 - user2) / n_model_steps,
        "model_sys_s_per_step": (sys3 - sys2) / n_model_steps,
        "rows_per_step": sum(b["input_features"].shape[0] for b in micro) / len(windows),
        "audio_s_per_step": sum(b["audio_seconds"] for b in micro) / len(windows),
        "padded_frame_fraction": 1.0 - valid / padded,
    }
    if ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in timed[: int(10 * per_window)]:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("exp/demo_sft/corpus"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps timed (after 3 warm-up steps)")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=demo_sft")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if not (args.corpus / "train.jsonl").is_file():
        parser.error(f"{args.corpus / 'train.jsonl'} not found (make it with recipes/demo_sft/run.sh --stop-stage 0)")
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)  # as the recipe runs (the Makefile exports OMP_NUM_THREADS=1)
    result = measure(args.corpus, args.overrides, args.steps, args.ops)
    total = sum(v for k, v in result.items() if k.endswith("_s_per_step") and k != "audio_s_per_step")
    print(json.dumps({**{k: round(v, 4) for k, v in result.items()}, "total_cpu_s_per_step": round(total, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
