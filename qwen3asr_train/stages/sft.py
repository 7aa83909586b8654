"""``recipe=sft``: supervised fine-tuning on ``language X<asr_text>text<|im_end|>`` targets.

Loss normalisation (deliberate, differs from upstream): the cross-entropy is summed over the target
tokens of every micro-batch of an optimizer step and divided by the number of target tokens in all of
them (across all ranks). Each micro-batch contributes ``CE_sum × k × world / N_window``; Lightning
divides by ``k`` (accumulation) and DDP averages over ``world``, so the gradient is exactly
``∑ CE / N_window``: the same whether a step is 1 micro-batch of 8 or 4 of 2. The upstream recipe sums
the micro-batch means instead, so its gradient grows with the accumulation count.

Precision: ``bf16-mixed`` keeps fp32 weights and AdamW state and computes in bf16; ``bf16-true`` (pure
bf16 weights) is refused unless ``trainer.allow_low_precision_weights`` (see docs/decisions.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from qwen3asr_train.config.schema import RunConfig, SFTConfig
from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.data.datamodule import (
    ASRDataModule,
    DataPositionTracker,
    distractor_pool,
    drop_long_targets,
    load_train_utterances,
    row_checks,
)
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import SkipReport, Utterance, read_manifests
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.eval.hook import build_asr_hook
from qwen3asr_train.losses import audio_ctc, target_token_ce
from qwen3asr_train.model.builder import AsrModel, build_model
from qwen3asr_train.model.export import save_model_init, save_native
from qwen3asr_train.training import (
    CHECKPOINT_DIR,
    StepNormaliser,
    all_reduce_sums,
    assert_finite_weights,
    build_optimizer,
    build_trainer,
    check_resume_plan,
    data_fingerprint,
    fit,
    prepare_run_dir,
    resolve_resume,
)

log = logging.getLogger(__name__)

MODEL_INIT_DIR = "model_init"
"""Run-directory folder with the starting model's config and processor (export rebuilds from it)."""


class SFTModule(L.LightningModule):
    """Token cross-entropy over target tokens, normalised per optimizer step (module docstring)."""

    def __init__(
        self, model: AsrModel, recipe: SFTConfig, total_steps: int, pad_id: int, asr_text_id: int, im_end_id: int
    ) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.total_steps = total_steps
        self.pad_id = pad_id
        self.asr_text_id = asr_text_id
        self.im_end_id = im_end_id
        self.norm = StepNormaliser()
        self._val: dict[str, float] = {}

    def forward_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        """Summed CE (and CTC) of one micro-batch; shapes in ``data/collate.py``."""
        out = self.model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
            use_cache=False,
        )
        ce_sum, n_tokens = target_token_ce(out.last_hidden_state, batch["labels"], self.model.lm_head)
        sums = {"ce_sum": ce_sum, "n_tokens": n_tokens}
        if self.recipe.ctc_weight > 0:
            audio_lengths = (batch["input_ids"] == self.model.config.audio_token_id).sum(-1)  # (B,)
            sums["ctc_sum"] = audio_ctc(
                out.audio_hidden_states,
                audio_lengths,
                self._ctc_targets(batch["labels"]),
                self.model.lm_head,
                self.pad_id,
            )
        return sums

    def _ctc_targets(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Transcript tokens of each row: the target after ``<asr_text>`` without the final ``<|im_end|>``."""
        targets = []
        for row in labels:
            ids = row[row != -100]
            hits = (ids == self.asr_text_id).nonzero()
            if len(hits):
                ids = ids[int(hits[0]) + 1 :]
            targets.append(ids[ids != self.im_end_id])
        return targets

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scale = self.norm.observe(self, batch)  # k × world / (target tokens of the whole step, all ranks)
        sums = self.forward_sums(batch)
        loss = sums["ce_sum"] * scale
        if "ctc_sum" in sums:
            loss = loss + self.recipe.ctc_weight * sums["ctc_sum"] * scale
        self.norm.add(
            ce=sums["ce_sum"].detach(),
            ctc=sums.get("ctc_sum", torch.zeros(())).detach(),
            tokens=sums["n_tokens"],
            audio=batch["audio_seconds"],
            seq=batch["attention_mask"].numel(),
            real=batch["attention_mask"].sum(),
            skipped=batch["skipped_audio"],
        )
        if self.norm.window_done(batch, self.trainer):
            self._log_window()
        return loss

    def _log_window(self) -> None:
        t, elapsed = self.norm.totals(self)
        metrics = {
            "train/loss": t["ce"] / max(t["tokens"], 1.0),
            "train/target_tokens": t["tokens"],
            "train/tokens_per_s": t["real"] / elapsed,
            "train/audio_s_per_s": t["audio"] / elapsed,
            "train/padding_fraction": 1.0 - t["real"] / max(t["seq"], 1.0),
            "train/skipped_audio": t["skipped"],
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        if self.recipe.ctc_weight > 0:
            metrics["train/ctc_loss"] = t["ctc"] / max(t["tokens"], 1.0)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", metrics["train/loss"], on_step=True, prog_bar=True, logger=False, rank_zero_only=True)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"ce": 0.0, "tokens": 0.0}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        sums = self.forward_sums(batch)
        self._val["ce"] += float(sums["ce_sum"])
        self._val["tokens"] += float(sums["n_tokens"])

    def on_validation_epoch_end(self) -> None:
        t = all_reduce_sums(self, self._val)
        if t["tokens"] > 0:
            self.log("val/loss", t["ce"] / t["tokens"], rank_zero_only=True)

    # ------------------------------------------------------------------ optimizer, state
    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self, self.recipe.optim, self.total_steps)


def total_optimizer_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run (for the schedule): max_steps, or epochs × steps per epoch."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    per_epoch = -(-micro_batches_per_epoch // cfg.trainer.accumulate_grad_batches)
    return max(1, per_epoch * int(cfg.trainer.max_epochs or 1))


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """The resolved config, as YAML (``run.yaml``) and JSON (read by export)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    node = OmegaConf.structured(cfg)
    OmegaConf.save(node, run_dir / "run.yaml", resolve=True)
    (run_dir / "run.json").write_text(json.dumps(OmegaConf.to_container(node, resolve=True), indent=2) + "\n")


__all__ = ["SFTModule", "prepare", "resolve_resume", "run", "run_plan", "save_run_config", "total_optimizer_steps"]

REJECTS_FILE = "rejects.jsonl"
"""Run-directory file listing every manifest row the skip policy dropped (file, line, reason)."""

_MODEL_PLAN_IGNORES = {"dtype", "attn_implementation", "gradient_checkpointing"}


def run_plan(cfg: RunConfig, sources: dict[str, list[Utterance]], **extra: Any) -> dict[str, Any]:
    """What a checkpoint's data position and weights mean: the data (fingerprints), batching, seed, model.

    Stored in every checkpoint and compared on resume (:func:`~qwen3asr_train.training.check_resume_plan`).
    """
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model), resolve=True)
    d = cfg.data
    return {
        "stage": cfg.recipe.name,
        "seed": cfg.seed,
        "model": {k: v for k, v in model.items() if k not in _MODEL_PLAN_IGNORES},
        "data": {
            name: {
                "utterances": len(items),
                "fingerprint": data_fingerprint([u.duration for u in items], [u.id for u in items]),
            }
            for name, items in sources.items()
        },
        "batching": {
            "max_batch_seconds": d.max_batch_seconds,
            "max_batch_size": d.max_batch_size,
            "num_buckets": d.num_buckets,
            "shuffle": d.shuffle,
            "max_text_tokens": d.max_text_tokens,
            "accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        },
        **extra,
    }


def write_rejects(report: SkipReport, run_dir: Path) -> Path:
    """``<run_dir>/rejects.jsonl``: every row dropped at start (rows dropped while decoding are appended)."""
    path = report.write(run_dir / REJECTS_FILE)
    if report.total:
        log.warning("%d manifest rows skipped (%s); every one is listed in %s", report.total, dict(report.counts), path)
    return path


def export_run_config(run_dir: Path, step: int, checkpoint: str | None) -> dict[str, Any]:
    """The run config written into an export, with the step (and checkpoint) its weights come from."""
    config = json.loads((run_dir / "run.json").read_text())
    config["exported_from"] = {"global_step": int(step), "checkpoint": checkpoint}
    return config


def prepare(cfg: RunConfig, extra_callbacks: list[L.Callback] = ()) -> tuple[SFTModule, ASRDataModule, L.Trainer, Any]:
    """Model, data and Trainer for a run (``run`` fits them; tests add callbacks here)."""
    recipe: SFTConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    resume = prepare_run_dir(cfg, recipe.resume_from)
    L.seed_everything(cfg.seed, workers=True)
    save_run_config(cfg, run_dir)

    rejects = SkipReport()
    train, hf = load_train_utterances(cfg.data, rejects)
    valid = read_manifests(cfg.data.valid, row_checks(cfg.data), cfg.data.on_bad_row, rejects) if cfg.data.valid else []
    plan = run_plan(cfg, {"train": train})
    check_resume_plan(resume, plan, cfg.trainer.resume_allow_changes)
    model, processor = build_model(cfg.model, texts=[u.text for u in train], seed=cfg.seed)
    train = drop_long_targets(train, processor, cfg.data, rejects)
    write_rejects(rejects, run_dir)
    init_dir = run_dir / MODEL_INIT_DIR
    save_model_init(model, processor, init_dir, from_scratch=cfg.model.source == "tiny")

    options = SFTOptions(
        forced_language_prob=recipe.forced_language_prob,
        context_prob=recipe.context_prob,
        manifest_context_prob=recipe.manifest_context_prob,
        hotwords_max=recipe.hotwords_max,
        distractors_max=recipe.distractors_max,
        no_speech_prob=recipe.no_speech_prob,
        seed=cfg.seed,
    )
    collator = SFTCollator(processor, options, distractor_pool(train, cfg.seed))
    plain = SFTCollator(processor, SFTOptions(seed=cfg.seed))
    train_set = UtteranceDataset(train, cfg.data.on_bad_row, hf, cfg.data.hf_train.audio_column)
    train_set.rejects_path = run_dir / REJECTS_FILE
    datamodule = ASRDataModule(
        cfg.data,
        train_set,
        collator,
        cfg.trainer.accumulate_grad_batches,
        cfg.seed,
        UtteranceDataset(valid, cfg.data.on_bad_row) if valid else None,
        plain,
    )
    hook = build_asr_hook(cfg.evaluation, cfg.data, processor, run_dir)
    if hook is not None:
        extra_callbacks = [*extra_callbacks, hook]
    trainer = build_trainer(
        cfg,
        model,
        extra_callbacks=[DataPositionTracker(), *extra_callbacks],
        validation=bool(valid),
        resume_from=resume,
        plan=plan,
    )
    per_rank_micro = -(-datamodule.micro_batches_per_epoch() // max(trainer.world_size, 1))
    tok = processor.tokenizer
    module = SFTModule(
        model,
        recipe,
        total_optimizer_steps(cfg, per_rank_micro),
        tok.pad_token_id,
        tok.convert_tokens_to_ids(ASR_TEXT),
        tok.convert_tokens_to_ids(IM_END),
    )
    return module, datamodule, trainer, processor


def run(cfg: RunConfig) -> dict[str, Any]:
    """Build everything from the config, train, and export. Returns paths of what was written."""
    recipe: SFTConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    module, datamodule, trainer, processor = prepare(cfg)
    model = module.model
    fit(trainer, module, datamodule=datamodule)  # Preempted (exit 143) / NonFiniteError propagate: no export

    written: dict[str, Any] = {"run_dir": str(run_dir), "checkpoints": str(run_dir / CHECKPOINT_DIR)}
    sharded = cfg.trainer.strategy not in {"auto", "ddp"}
    if recipe.export_on_end and sharded and trainer.is_global_zero:
        log.info(
            "weights are sharded under %s: export with recipe=export recipe.checkpoint=%s",
            cfg.trainer.strategy,
            run_dir,
        )
    if recipe.export_on_end and not sharded and trainer.is_global_zero:
        written["export"] = str(export_final(model, processor, trainer, run_dir))
    if trainer.is_global_zero:
        log.info("run directory: %s", run_dir)
        for key, value in written.items():
            log.info("  %s: %s", key, value)
    return written


def export_final(model: AsrModel, processor: Any, trainer: L.Trainer, run_dir: Path) -> Path:
    """The native export of the weights training ended with (finite, and labelled with their step)."""
    assert_finite_weights(model.named_parameters(), f"the export in {run_dir / 'export'}")
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    config = export_run_config(run_dir, trainer.global_step, str(last) if last.exists() else None)
    out = save_native(model, processor, run_dir / "export", run_config=config)
    log.info("exported the weights of step %d to %s", trainer.global_step, out)
    return out
