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

import logging
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qwen3asr_train import spine, training
from qwen3asr_train.config.schema import RunConfig, SFTConfig
from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.data.datamodule import (
    ASRDataModule,
    DataPositionTracker,
    distractor_pool,
    load_train_data,
    row_checks,
)
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import SkipReport, read_manifests
from qwen3asr_train.data.packing import maybe_packed, per_clip
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.data.transforms import build_augmenter
from qwen3asr_train.eval.hook import build_asr_hook
from qwen3asr_train.losses import audio_ctc, target_token_ce
from qwen3asr_train.model.builder import AsrModel

log = logging.getLogger(__name__)


class SFTModule(training.SummedValidation, L.LightningModule):
    """Token cross-entropy over target tokens, normalised per optimizer step (module docstring)."""

    def __init__(
        self,
        model: AsrModel,
        recipe: SFTConfig,
        total_steps: int,
        pad_id: int,
        asr_text_id: int,
        im_end_id: int,
        ctc_drop_ids: Iterable[int] = (),
        ctc_fold_tokenizer: Any = None,
    ) -> None:
        """``ctc_drop_ids``: token ids left out of the CTC targets (``recipe.ctc_skip_punctuation``);
        ``ctc_fold_tokenizer``: when given, each clip's CTC target is its transcript decoded, lower-cased,
        space-prefixed and encoded again with it (``recipe.ctc_fold_case``)."""
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.total_steps = total_steps
        self.pad_id = pad_id
        self.asr_text_id = asr_text_id
        self.im_end_id = im_end_id
        self.ctc_drop_ids = torch.tensor(sorted(set(ctc_drop_ids)), dtype=torch.long)  # (D,)
        self.ctc_fold_tokenizer = ctc_fold_tokenizer
        self.norm = training.StepNormaliser()
        self.flops = training.ModelFlops.from_model(model)
        self.peak_tflops = 0.0  # trainer.peak_tflops (set by prepare); 0: from the device name

    def forward_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        """Summed CE (and CTC) of one micro-batch; shapes in ``data/collate.py``."""
        out = training.backbone_hidden(self.model, batch)
        ce_sum, n_tokens = target_token_ce(
            out.last_hidden_state,
            batch["labels"],
            self.model.lm_head,
            self.recipe.ce_chunk_tokens,
            self.recipe.label_smoothing if self.training else 0.0,  # validation reports plain cross-entropy
        )
        sums = {"ce_sum": ce_sum, "n_tokens": n_tokens}
        if self.recipe.ctc_weight > 0:
            # per clip in feature order (a packed row holds several clips; the encoder emits them in this order)
            clip_ids = per_clip(batch, batch["input_ids"])
            audio_lengths = torch.stack([(ids == self.model.config.audio_token_id).sum() for ids in clip_ids])  # (B,)
            sums["ctc_sum"] = audio_ctc(
                out.audio_hidden_states,
                audio_lengths,
                self._ctc_targets(per_clip(batch, batch["labels"])),
                self.model.lm_head,
                self.pad_id,
            )
        return sums

    def _ctc_targets(self, labels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Transcript tokens of each clip (its labels, one tensor per clip): the target after ``<asr_text>``
        without the final ``<|im_end|>`` (and without ``ctc_drop_ids``)."""
        targets = []
        for row in labels:
            ids = row[row != -100]
            hits = (ids == self.asr_text_id).nonzero()
            if len(hits):
                ids = ids[int(hits[0]) + 1 :]
            ids = ids[ids != self.im_end_id]
            if len(self.ctc_drop_ids):
                ids = ids[~torch.isin(ids, self.ctc_drop_ids.to(ids.device))]
            if self.ctc_fold_tokenizer is not None:
                ids = fold_case_ids(self.ctc_fold_tokenizer, ids)
            targets.append(ids)
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
            real=batch["num_real_tokens"],
            skipped=batch["skipped_audio"],
            model_flops=self.flops.of_batch(batch),
        )
        if self.norm.window_done(batch, self.trainer):
            self._log_window()
        return loss

    def _log_window(self) -> None:
        t, elapsed = self.norm.totals(self)
        metrics = {
            "train/loss": t["ce"] / max(t["tokens"], 1.0),
            "train/target_tokens": t["tokens"],
            **training.throughput_metrics(t, elapsed, self.trainer, self.peak_tflops),
        }
        if self.recipe.ctc_weight > 0:
            metrics["train/ctc_loss"] = t["ctc"] / max(t["tokens"], 1.0)
        self.norm.log(self, metrics)

    # ------------------------------------------------------------------ optimizer, state
    def configure_optimizers(self) -> dict[str, Any]:
        return training.build_optimizer(self, self.recipe.optim, self.total_steps)


def prepare(cfg: RunConfig, extra_callbacks: list[L.Callback] = ()) -> tuple[SFTModule, ASRDataModule, L.Trainer, Any]:
    """Model, data and Trainer for a run (``run`` fits them; tests add callbacks here)."""
    recipe: SFTConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    resume = spine.start_run(cfg, recipe.resume_from)

    rejects = SkipReport()
    data = load_train_data(cfg.data, cfg.seed, rejects)  # every row, or (data.lazy) the head of a stream
    valid = read_manifests(cfg.data.valid, row_checks(cfg.data), cfg.data.on_bad_row, rejects) if cfg.data.valid else []
    plan = spine.run_plan(cfg, data.plan_sources(), **data.plan_extra())
    training.check_resume_plan(resume, plan, cfg.trainer.resume_allow_changes)
    model, processor = spine.build_run_model(cfg, [u.text for u in data.utterances])
    data.apply_token_limit(processor, cfg.data, rejects)
    spine.write_rejects(rejects, run_dir)

    augment = build_augmenter(cfg.data.augment, "sft", cfg.seed)
    collator = SFTCollator(
        processor, SFTOptions.from_recipe(recipe, cfg.seed), distractor_pool(data.utterances, cfg.seed), augment=augment
    )
    plain = SFTCollator(processor, SFTOptions(seed=cfg.seed))
    collator, plain = maybe_packed(collator, cfg.data), maybe_packed(plain, cfg.data)
    train_set = data.dataset(cfg.data, run_dir / spine.REJECTS_FILE)
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
    callbacks = [DataPositionTracker(), *extra_callbacks, *([hook] if hook is not None else [])]
    trainer = training.build_trainer(cfg, model, callbacks, validation=bool(valid), resume_from=resume, plan=plan)
    # the schedule needs the epoch's length only without max_steps (the lazy path cannot know it: a clear error)
    per_rank_micro = (
        0 if cfg.trainer.max_steps > 0 else -(-datamodule.micro_batches_per_epoch() // max(trainer.world_size, 1))
    )
    tok = processor.tokenizer
    module = SFTModule(
        model,
        recipe,
        spine.total_optimizer_steps(cfg, per_rank_micro),
        tok.pad_token_id,
        tok.convert_tokens_to_ids(ASR_TEXT),
        tok.convert_tokens_to_ids(IM_END),
        punctuation_token_ids(tok) if recipe.ctc_skip_punctuation and recipe.ctc_weight > 0 else (),
        tok if recipe.ctc_fold_case and recipe.ctc_weight > 0 else None,
    )
    module.peak_tflops = cfg.trainer.peak_tflops
    return module, datamodule, trainer, processor


def punctuation_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens whose text is only punctuation (Unicode category P*, e.g. ``,`` ``?`` ``。``), spaces
    around it allowed; special tokens excluded. What ``recipe.ctc_skip_punctuation`` drops from CTC targets."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i]).strip()
        if text and all(unicodedata.category(c).startswith("P") for c in text):
            ids.append(i)
    log.info("CTC targets leave out %d punctuation tokens", len(ids))
    return ids


def fold_case_ids(tokenizer: Any, ids: torch.Tensor) -> torch.Tensor:
    """The ids of ``" " + text.lower()`` for the text ``ids`` decode to: "Dog door" and " dog door" give one
    target. Re-encoded rather than mapped id by id because the byte-level pieces of a cased word differ from
    the lower-case word's ("Dog" = D|o|g, " dog" = " "|do|g in the tiny tokenizer)."""
    text = tokenizer.decode(ids.tolist())
    folded = tokenizer.encode(" " + text.strip().lower(), add_special_tokens=False) if text.strip() else []
    return torch.tensor(folded, dtype=ids.dtype, device=ids.device)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Build everything from the config, train, and export. Returns paths of what was written."""
    module, datamodule, trainer, processor = prepare(cfg)
    training.fit(trainer, module, datamodule=datamodule)  # Preempted (exit 143) / NonFiniteError propagate: no export
    return spine.finish_run(cfg, trainer, module.model, processor, cfg.recipe.export_on_end)
