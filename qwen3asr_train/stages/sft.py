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
from qwen3asr_train.data.manifest import read_manifests
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.eval.hook import build_asr_hook
from qwen3asr_train.losses import audio_ctc, target_token_ce
from qwen3asr_train.model.builder import AsrModel, build_model
from qwen3asr_train.model.export import save_model_init, save_native
from qwen3asr_train.training import StepNormaliser, all_reduce_sums, build_optimizer, build_trainer

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


def resolve_resume(recipe_resume: str | None, run_dir: Path) -> str | None:
    """``last`` -> this run's ``checkpoints/last.ckpt`` (which must exist); a path as is."""
    if recipe_resume is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if recipe_resume == "last" else Path(recipe_resume)
    if not path.is_file():
        raise FileNotFoundError(f"recipe.resume_from={recipe_resume!r}: no checkpoint at {path}")
    return str(path)


def prepare(cfg: RunConfig, extra_callbacks: list[L.Callback] = ()) -> tuple[SFTModule, ASRDataModule, L.Trainer, Any]:
    """Model, data and Trainer for a run (``run`` fits them; tests add callbacks here)."""
    recipe: SFTConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    save_run_config(cfg, run_dir)

    train, hf = load_train_utterances(cfg.data)
    valid = read_manifests(cfg.data.valid, row_checks(cfg.data), cfg.data.on_bad_row) if cfg.data.valid else []
    model, processor = build_model(cfg.model, texts=[u.text for u in train], seed=cfg.seed)
    train = drop_long_targets(train, processor, cfg.data)
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
    datamodule = ASRDataModule(
        cfg.data,
        UtteranceDataset(train, cfg.data.on_bad_row, hf, cfg.data.hf_train.audio_column),
        collator,
        cfg.trainer.accumulate_grad_batches,
        cfg.seed,
        UtteranceDataset(valid, cfg.data.on_bad_row) if valid else None,
        plain,
    )
    resume = resolve_resume(recipe.resume_from, run_dir)
    hook = build_asr_hook(cfg.evaluation, cfg.data, processor, run_dir)
    if hook is not None:
        extra_callbacks = [*extra_callbacks, hook]
    trainer = build_trainer(
        cfg,
        model,
        extra_callbacks=[DataPositionTracker(), *extra_callbacks],
        validation=bool(valid),
        resume_from=resume,
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(recipe.resume_from, run_dir))

    written: dict[str, Any] = {"run_dir": str(run_dir), "checkpoints": str(run_dir / "checkpoints")}
    sharded = cfg.trainer.strategy not in {"auto", "ddp"}
    if recipe.export_on_end and sharded and trainer.is_global_zero:
        log.info(
            "weights are sharded under %s: export with recipe=export recipe.checkpoint=%s",
            cfg.trainer.strategy,
            run_dir,
        )
    if recipe.export_on_end and not sharded and trainer.is_global_zero:
        written["export"] = str(
            save_native(model, processor, run_dir / "export", run_config=json.loads((run_dir / "run.json").read_text()))
        )
    if trainer.is_global_zero:
        log.info("run directory: %s", run_dir)
        for key, value in written.items():
            log.info("  %s: %s", key, value)
    return written
