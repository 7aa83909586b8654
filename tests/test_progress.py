"""Console progress lines (fake clock and trainer, rates and ETA against hand computations), the step progress
bar and interval means (on a real Lightning run, against means computed from the logged step values)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from qwen3asr_train.progress import (
    ConsoleProgress,
    IntervalMeans,
    StepProgressBar,
    format_duration,
    logger_writes_after_this_batch,
    progress_callbacks,
)


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def fake_trainer(max_steps: int, step: int = 0, world_size: int = 1) -> SimpleNamespace:
    optimizer = SimpleNamespace(param_groups=[{"lr": 3e-3}])
    return SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        world_size=world_size,
        is_global_zero=True,
        callback_metrics={"train/loss": torch.tensor(2.5)},
        optimizers=[optimizer],
    )


def drive(callback, trainer, clock, steps: int, seconds_per_step: float, batches_per_step: int, audio: float):
    """Run ``steps`` optimizer steps of ``batches_per_step`` micro-batches; the clock moves at each step."""
    for _ in range(steps):
        for micro in range(batches_per_step):
            if micro == batches_per_step - 1:
                clock.now += seconds_per_step
                trainer.global_step += 1
            callback.on_train_batch_end(trainer, None, None, {"audio_seconds": torch.tensor(audio)}, 0)


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qwen3asr_train.progress"]


def test_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(3 * 3600 + 4 * 60 + 5.2) == "3:04:05"
    assert format_duration(float("inf")) == "?" and format_duration(-1) == "?"


def test_time_based_lines_rate_eta_and_audio_match_a_hand_computation(caplog) -> None:
    caplog.set_level(logging.INFO, logger="qwen3asr_train.progress")
    clock = FakeClock(1000.0)
    trainer = fake_trainer(max_steps=1001)
    callback = ConsoleProgress(every_seconds=30, clock=clock)
    callback.on_train_start(trainer, None)
    # a step every 0.25 s, 2 micro-batches of 3.0 audio seconds each
    drive(callback, trainer, clock, steps=130, seconds_per_step=0.25, batches_per_step=2, audio=3.0)
    got = lines(caplog)
    assert got[0] == "training from step 0 to 1001; a progress line every 30 s"
    # step 1: 0.25 s elapsed -> 4 steps/s, ETA 1000/4 = 250 s, 6 audio-s in 0.25 s = 24 audio-s/s
    assert got[1] == (
        "step 1/1001 (0.1%) | loss 2.5000 | lr 3.00e-03 | 24.0 audio-s/s | 4.00 steps/s | elapsed 0:00:00 | ETA 0:04:10"
    )
    # the next line once 30 s have passed since the last one: step k with 0.25 k - 0.25 >= 30 -> k = 121;
    # 121 steps in 30.25 s = 4 steps/s, ETA (1001 - 121) / 4 = 220 s; 120 steps x 6 audio-s in 30 s = 24/s
    assert got[2] == (
        "step 121/1001 (12.1%) | loss 2.5000 | lr 3.00e-03 | 24.0 audio-s/s | 4.00 steps/s | elapsed 0:00:30 | ETA 0:03:40"
    )
    assert len(got) == 3
    callback.on_train_end(trainer, None)  # step 130 was not reported yet
    assert lines(caplog)[-1].startswith("step 130/1001 (13.0%)")


def test_step_based_lines_and_resumed_run_counts_only_its_own_steps(caplog) -> None:
    caplog.set_level(logging.INFO, logger="qwen3asr_train.progress")
    clock = FakeClock(0.0)
    trainer = fake_trainer(max_steps=600, step=500, world_size=2)  # resumed at step 500, 2 ranks
    callback = ConsoleProgress(every_n_steps=40, every_seconds=0, clock=clock)
    callback.on_train_start(trainer, None)
    drive(callback, trainer, clock, steps=100, seconds_per_step=2.0, batches_per_step=1, audio=5.0)
    got = lines(caplog)[1:]
    assert [line.split(" | ")[0] for line in got] == [
        "step 501/600 (83.5%)",
        "step 541/600 (90.2%)",
        "step 581/600 (96.8%)",
    ]
    # at step 541: 41 steps in 82 s = 0.5 steps/s (not 541/82), ETA 59 / 0.5 = 118 s;
    # audio: 40 steps x 5 s x 2 ranks over the 80 s since the last line = 5 audio-s/s
    assert got[1] == (
        "step 541/600 (90.2%) | loss 2.5000 | lr 3.00e-03 | 5.0 audio-s/s | 0.50 steps/s | elapsed 0:01:22 | ETA 0:01:58"
    )


def test_only_rank_zero_logs_and_bad_cadence_is_refused(caplog) -> None:
    caplog.set_level(logging.INFO, logger="qwen3asr_train.progress")
    trainer = fake_trainer(max_steps=10)
    trainer.is_global_zero = False
    callback = ConsoleProgress(every_n_steps=1, clock=FakeClock(0.0))
    callback.on_train_start(trainer, None)
    drive(callback, trainer, callback.clock, steps=3, seconds_per_step=1.0, batches_per_step=1, audio=1.0)
    assert lines(caplog) == []
    with pytest.raises(ValueError, match="every_n_steps > 0 or every_seconds > 0"):
        ConsoleProgress(every_n_steps=0, every_seconds=0)


def test_interval_means_against_hand_means() -> None:
    means = IntervalMeans()
    assert means.add({"train/loss": 4.0, "train/lr": 1.0}) == {"train/loss": 4.0, "train/lr": 1.0}
    assert means.add({"train/loss": torch.tensor(2.0), "train/lr": 0.5, "train/ctc": 3.0}) == {
        "train/loss": 3.0,
        "train/lr": 0.5,  # latest, not averaged
        "train/ctc": 3.0,  # averaged over the steps that had it
    }
    assert len(means) == 2
    means.reset()
    assert means.means() == {} and len(means) == 0
    with pytest.raises(TypeError, match="train/x"):
        means.add({"train/x": "a"})


# ------------------------------------------------------------------------------- a real Lightning run


class Steps(L.LightningModule):
    """One parameter; logs the step number (1, 2, ...) as ``train/value`` through :class:`IntervalMeans`."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.interval = IntervalMeans()
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        value = float(self.global_step + 1)
        self.logged.append(value)
        self.log_dict(self.interval.add({"train/value": value}), on_step=True, on_epoch=False)
        if logger_writes_after_this_batch(self.trainer):
            self.interval.reset()
        return (self.w - batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([{"x": torch.tensor(1.0), "audio_seconds": 2.0}] * 4, batch_size=None)


def test_metrics_csv_holds_interval_means_and_the_bar_counts_steps(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qwen3asr_train.progress")
    model = Steps()
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=11,
        log_every_n_steps=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[ConsoleProgress(every_n_steps=5, every_seconds=0), bar],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model)
    with open(tmp_path / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/value")]
    # each written row is the mean of the values logged since the previous row, computed here from scratch
    previous, expected = 0, []
    for row in rows:
        step = int(row["step"])
        window = model.logged[previous : step + 1]
        expected.append(sum(window) / len(window))
        previous = step + 1
    assert [int(r["step"]) for r in rows] == [3, 7]  # Lightning writes after batches 4 and 8
    assert [float(r["train/value"]) for r in rows] == pytest.approx(expected) == [2.5, 6.5]
    # the console: first step, every 5 steps after it, and the end
    assert [m.split(" | ")[0] for m in lines(caplog)[1:]] == [
        "step 1/11 (9.1%)",
        "step 6/11 (54.5%)",
        "step 11/11 (100.0%)",
    ]
    # the bar counted the run's steps, not the batches of the last epoch (4 batches per epoch here)
    assert bar.train_progress_bar.total == 11 and bar.train_progress_bar.n == 11


def test_progress_callbacks_add_the_bar_only_when_it_is_on() -> None:
    assert [type(c) for c in progress_callbacks(False)] == [ConsoleProgress]
    on = progress_callbacks(True, every_n_steps=10, every_seconds=15)
    assert [type(c) for c in on] == [ConsoleProgress, StepProgressBar]
    assert on[0].every_n_steps == 10 and on[0].every_seconds == 15
