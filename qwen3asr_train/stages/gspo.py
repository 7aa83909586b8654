"""``recipe=gspo``: Group Sequence Policy Optimization with WER/CER rewards (GSPO, arXiv 2507.18071).

One *rollout batch* (``recipe.rollout_batch_size`` utterances per rank) is sampled G times with the
current policy; the completions are scored by the reward registry (which reuses the evaluation metric
code on raw text); advantages are group-normalised in float64 with exact zeros for zero-variance groups;
the behaviour log-probabilities are computed once, before any update, with dropout off. The batch is then
split into ``steps_per_generation`` minibatches of whole groups, each one optimizer step, repeated
``num_iterations`` times — so with more than one minibatch the later updates are off-policy and the
sequence-level ratio and its clip (3e-4 / 4e-4) matter.

Lightning runs this with manual optimisation, one training step per minibatch: the loader yields one
item per optimizer step and the rollout happens on the first item of each rollout batch. That keeps one
backward per forward (what DDP's gradient reducer expects); each rank rolls out its own utterances.
Checkpoints fall between rollout batches (a config rule), so a resumed run restarts at the next batch.

Deviations from the paper, all config: no KL by default (``kl_beta=0``, the paper omits it); loss
variants ``gspo_token`` and ``grpo`` for ablations; ``advantage_scale`` ``batch``/``none`` options.
"""

from __future__ import annotations

import logging
import random
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate

from qwen3asr_train import spine, training
from qwen3asr_train.config.schema import GSPOConfig, RunConfig
from qwen3asr_train.data.audio import SAMPLE_RATE
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import SkipReport
from qwen3asr_train.data.mix import MixtureRollouts, RolloutLoader, read_mix_sources
from qwen3asr_train.eval.hook import build_asr_hook
from qwen3asr_train.model.builder import AsrModel, build_model
from qwen3asr_train.progress import logger_writes_after_this_batch
from qwen3asr_train.rl import gspo as gspo_math
from qwen3asr_train.rl.rewards import CompositeReward, RewardInput
from qwen3asr_train.rl.rollout import (
    PromptState,
    RolloutEngine,
    Rollouts,
    SamplingOptions,
    build_prompts,
    completion_logprobs,
    sampling_rng,
)
from qwen3asr_train.rl.timing import PhaseTimer
from qwen3asr_train.training import build_optimizer, build_trainer, check_resume_plan, fit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- module
class GSPOModule(L.LightningModule):
    """Manual optimisation: a rollout on the first tick of each batch, one minibatch update per tick."""

    def __init__(
        self,
        model: AsrModel,
        processor: Any,
        recipe: GSPOConfig,
        engine: RolloutEngine,
        rewards: CompositeReward,
        sampling: SamplingOptions,
        total_steps: int,
        ref_model: AsrModel | None = None,
        gradient_clip_val: float = 1.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.processor = processor
        self.recipe = recipe
        self.engine = engine
        self.rewards = rewards
        self.sampling = sampling
        self.total_steps = total_steps
        self.ref_model = ref_model
        self.gradient_clip_val = gradient_clip_val
        self._pending: dict[str, Any] | None = None
        self._ratio_sums: dict[str, torch.Tensor] = {}
        """Ratio statistics summed over the optimizer steps since the last logger write (``_log_update``)."""
        self._ratio_steps = 0
        self.timer = PhaseTimer()
        """Seconds per step phase (generation, rewards, old_logprobs, update_forward, backward_optimizer)."""

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _rollout(self, samples: list[Sample], rollout: int) -> dict[str, Any]:
        r = self.recipe
        was_training = self.model.training
        self.model.eval()  # dropout off: behaviour log-probs and sampling use the deterministic policy
        with self.timer.phase("generation"):
            prompts = build_prompts(self.processor, samples, self.sampling, rollout).to(self.device)
            with sampling_rng(self.sampling.seed, self.global_rank, rollout, self.device):
                rollouts = self.engine.generate(self.model, prompts, self.sampling)
        with self.timer.phase("rewards"):
            inputs = [
                RewardInput(
                    completion=rollouts.texts[b * r.group_size + g],
                    reference=s.utt.text,
                    language=s.utt.language,
                    forced_language=prompts.forced_language[b],
                    hotwords=prompts.hotwords[b],
                    truncated=rollouts.truncated[b * r.group_size + g],
                    audio_seconds=max(len(s.audio) / SAMPLE_RATE, 1e-3),
                )
                for b, s in enumerate(samples)
                for g in range(r.group_size)
            ]
            total, terms = self.rewards(inputs)  # (B*G,) float64
            advantages = gspo_math.compute_advantages(total, r.group_size, r.advantage_scale, r.advantage_eps)
        zero_var = gspo_math.zero_variance_groups(total, r.group_size)  # (B,)
        groups = [b for b in range(len(samples)) if not (r.drop_zero_variance and bool(zero_var[b]))]
        rng = random.Random(zlib.crc32(f"minibatch/{self.sampling.seed}/{rollout}".encode()))
        rng.shuffle(groups)
        n_mb = r.steps_per_generation
        minibatches = [sorted(groups[i::n_mb]) for i in range(n_mb)]
        # behaviour log-probs: same weights as the sampler, so the rollout's prefilled prompts are reused
        state = rollouts.prompt_state if r.reuse_prompt_state else None
        with self.timer.phase("old_logprobs"):
            if r.sampler_logprobs and rollouts.sampled_logprobs is None:
                raise ValueError("recipe.sampler_logprobs=true: the rollout engine reported no sampled log-probs")
            from_sampler = r.sampler_logprobs or (
                r.sampler_logprobs_in_process
                and rollouts.sampled_logprobs is not None
                and rollouts.sampled_logprobs_in_process
            )
            old = {
                i: self._old_logprobs(rollouts, mb, state, from_sampler) if mb else None
                for i, mb in enumerate(minibatches)
            }
            ref = {}
            if self.ref_model is not None:
                ref = {
                    i: completion_logprobs(self.ref_model, rollouts, r.temperature, mb, r.shared_prefix) if mb else None
                    for i, mb in enumerate(minibatches)
                }
        rollouts.prompt_state = None  # valid for these weights only: the first update makes it stale
        self.model.train(was_training)
        self._log_rollout(inputs, rollouts, total, terms, zero_var, advantages)
        return {
            "rollouts": rollouts,
            "advantages": advantages.to(self.device),
            "minibatches": minibatches,
            "old": old,
            "ref": ref,
            "ids": [s.utt.id for s in samples],
        }

    def _old_logprobs(
        self, rollouts: Rollouts, rows: list[int], state: PromptState | None, from_sampler: bool
    ) -> torch.Tensor:
        """Behaviour log-probs of a minibatch's completions: the sampler's own (``from_sampler``: the engine's were
        computed in process by the training model, ``recipe.sampler_logprobs_in_process``, or the user asked for them,
        ``recipe.sampler_logprobs``) or recomputed with the same weights (one prefill per prompt, or none when
        ``state`` is reused)."""
        r = self.recipe
        if from_sampler:
            g = r.group_size
            comp = torch.tensor([b * g + k for b in rows for k in range(g)], device=self.device)
            return rollouts.sampled_logprobs[comp]
        return completion_logprobs(self.model, rollouts, r.temperature, rows, r.shared_prefix, state)

    def at_checkpoint_boundary(self) -> bool:
        """True between rollout batches: the only points a checkpoint resumes exactly (no cached rollout)."""
        return self._pending is None

    def current_utterance_ids(self) -> list[str]:
        """Utterances of the rollout batch being trained on (named when a step is non-finite)."""
        return list(self._pending["ids"]) if self._pending is not None else []

    # ------------------------------------------------------------------ update
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        r = self.recipe
        if batch["samples"] is not None:
            self._pending = self._rollout(batch["samples"], batch["rollout"])
        if self._pending is None:
            raise RuntimeError("a minibatch tick arrived before its rollout (resume point inside a rollout batch?)")
        pending = self._pending
        j = batch["minibatch"] % r.steps_per_generation
        rows = pending["minibatches"][j]
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        if rows:
            rollouts: Rollouts = pending["rollouts"]
            g = r.group_size
            comp = torch.tensor([b * g + k for b in rows for k in range(g)], device=self.device)
            with self.timer.phase("update_forward"):
                logp = completion_logprobs(self.model, rollouts, r.temperature, rows, r.shared_prefix)  # (R, C)
                mask = rollouts.completion_mask[comp]  # (R, C)
                adv = pending["advantages"][comp].to(logp.dtype)  # (R,)
                loss, stats = self._loss(logp, pending["old"][j], mask, adv)
                if self.ref_model is not None and r.kl_beta > 0:
                    kl = gspo_math.kl_k3(logp, pending["ref"][j], mask)
                    loss = loss + r.kl_beta * kl
                    stats["kl"] = kl.detach()
            with self.timer.phase("backward_optimizer"):
                self.manual_backward(loss)
                if self.gradient_clip_val > 0:
                    self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            self._log_update(loss, stats)
        else:  # every group of this minibatch was dropped (zero variance): keep the step count aligned
            self.manual_backward(sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad))
        with self.timer.phase("backward_optimizer"):
            opt.step()
        sched.step()
        if batch["minibatch"] == r.steps_per_rollout() - 1:
            self._pending = None
        loader = self.trainer.train_dataloader
        if isinstance(loader, RolloutLoader):
            loader.sampler.consumed = batch["tick"] + 1

    def _loss(
        self, logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = self.recipe
        if r.loss == "gspo":
            return gspo_math.gspo_loss(logp, old, mask, adv, r.eps_low, r.eps_high)
        if r.loss == "gspo_token":
            token_adv = adv.unsqueeze(-1).expand_as(logp)  # (R, C)
            return gspo_math.gspo_token_loss(logp, old, mask, token_adv, r.eps_low, r.eps_high, return_stats=True)
        return gspo_math.grpo_token_loss(logp, old, mask, adv, r.eps_low, r.eps_high)

    # ------------------------------------------------------------------ logging
    def _log_update(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Log the step's loss, and the ratio statistics averaged over the steps since the last write, only on the
        steps Lightning writes to the loggers.

        Why only then: Lightning writes the last value logged before a write step, so what reaches the loggers is
        unchanged, and ``log_dict`` (result collection, device moves, ``sync_dist`` reduction) cost ~5 ms per
        optimizer step on CPU, a cost of its own in every GSPO step (docs/gspo.md). Every rank takes the same
        branch (the condition depends on the step count only), so the ``sync_dist`` reduction stays matched.

        Why averaged: the clip fraction depends on the minibatch's position in its rollout batch (0 on the first,
        on-policy one; highest on the last). With ``log_every_n_steps`` a multiple of ``steps_per_generation``
        every write fell on the same position, so the logged ``gspo/clip_frac`` was the last minibatch's, not the
        run's (the pilot's 0.43 at lr 1e-4; docs/results.md). The sums are detached tensors: no device sync.
        """
        step_stats = {f"gspo/{k}": stats[k] for k in ("clip_frac", "clip_frac_low", "clip_frac_high") if k in stats}
        if "seq_ratio" in stats:
            step_stats["gspo/seq_ratio_mean"] = stats["seq_ratio"].mean()
        for key, value in step_stats.items():
            value = value.detach().float()
            self._ratio_sums[key] = self._ratio_sums[key] + value if key in self._ratio_sums else value
        self._ratio_steps += 1
        if not logger_writes_after_this_batch(self.trainer):
            return
        metrics = {"train/loss": loss.detach().float()}
        metrics.update({key: total / self._ratio_steps for key, total in self._ratio_sums.items()})
        self._ratio_sums, self._ratio_steps = {}, 0
        if "kl" in stats:
            metrics["gspo/kl"] = stats["kl"].float()
        metrics["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(metrics, on_step=True, sync_dist=True)

    def _log_rollout(
        self,
        inputs: list[RewardInput],
        rollouts: Rollouts,
        total: torch.Tensor,
        terms: dict[str, torch.Tensor],
        zero_var: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        """Rollout statistics summed over ranks, then logged once (ranks may differ in which are defined)."""
        speech = [x for x in inputs if x.language is not None]
        unforced = [x for x in speech if x.forced_language is None]
        sums = {
            "n": float(len(inputs)),
            "reward": float(total.sum()),
            "reward_sq": float((total**2).sum()),
            "groups": float(zero_var.numel()),
            "zero_var": float(zero_var.sum()),
            "adv_abs": float(advantages.abs().sum()),
            "length": float(rollouts.completion_mask.sum()),
            "truncated": float(sum(rollouts.truncated)),
            "speech": float(len(speech)),
            "empty": float(sum(not x.parsed.text.strip() for x in speech)),
            "sub": float(sum(x.score.counts.substitutions for x in speech)),
            "del": float(sum(x.score.counts.deletions for x in speech)),
            "ins": float(sum(x.score.counts.insertions for x in speech)),
            "ref_units": float(sum(x.score.counts.ref_units for x in speech)),
            "lid_total": float(len(unforced)),
            "lid_hits": float(sum(x.parsed.language == x.language for x in unforced)),
            **{f"term/{name}": float(values.sum()) for name, values in terms.items()},
        }
        vec = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            dist.all_reduce(vec)
        t = dict(zip(sums, vec.tolist(), strict=True))
        n = max(t["n"], 1.0)
        mean = t["reward"] / n
        metrics = {
            "rollout/reward_mean": mean,
            "rollout/reward_std": max(t["reward_sq"] / n - mean**2, 0.0) ** 0.5,
            "rollout/frac_zero_variance_groups": t["zero_var"] / max(t["groups"], 1.0),
            "rollout/advantage_abs_mean": t["adv_abs"] / n,
            "rollout/completion_length": t["length"] / n,
            "rollout/truncation_rate": t["truncated"] / n,
            "rollout/empty_rate_speech": t["empty"] / max(t["speech"], 1.0),
            **{f"reward/{k[5:]}": v / n for k, v in t.items() if k.startswith("term/")},
        }
        if t["ref_units"] > 0:
            for key in ("sub", "del", "ins"):
                metrics[f"rollout/{key}_rate"] = t[key] / t["ref_units"]
        if t["lid_total"] > 0:
            metrics["rollout/lid_acc"] = t["lid_hits"] / t["lid_total"]
        # straight to the logger: Lightning would repeat step-logged values on the following minibatch steps
        if self.trainer.is_global_zero and self.logger is not None:
            self.logger.log_metrics(metrics, step=self.global_step)

    # ------------------------------------------------------------------ optimizer, state
    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self, self.recipe.optim, self.total_steps)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the policy is checkpointed (the frozen reference model is rebuilt from its path)."""
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("ref_model.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return super().load_state_dict(state_dict, strict=strict and self.ref_model is None, assign=assign)


# ---------------------------------------------------------------------------------------------- build
def prepare(cfg: RunConfig, extra_callbacks: list[L.Callback] = ()) -> tuple[GSPOModule, RolloutLoader, L.Trainer, Any]:
    """Model, rollout data and Trainer for a GSPO run."""
    recipe: GSPOConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    resume = spine.start_run(cfg, recipe.resume_from)
    rejects = SkipReport()
    sources = read_mix_sources(cfg, rejects)
    spine.write_rejects(rejects, run_dir)
    plan = spine.run_plan(
        cfg,
        {name: utts for utts, _, name in sources},
        rollouts={
            "weights": {name: weight for _, weight, name in sources},
            "rollout_batch_size": recipe.rollout_batch_size,
            "group_size": recipe.group_size,
            "steps_per_generation": recipe.steps_per_generation,
            "num_iterations": recipe.num_iterations,
        },
    )
    check_resume_plan(resume, plan, cfg.trainer.resume_allow_changes)
    texts = [u.text for utts, _, _ in sources for u in utts]
    model, processor = spine.build_run_model(cfg, texts)
    ref_model = None
    if recipe.kl_beta > 0:
        ref_model, _ = build_model(cfg.model, texts=texts, seed=cfg.seed)
        ref_model.load_state_dict(model.state_dict())
        ref_model.requires_grad_(False).eval()

    callbacks = list(extra_callbacks)
    hook = build_asr_hook(cfg.evaluation, cfg.data, processor, run_dir)
    if hook is not None:
        callbacks.append(hook)
    trainer = build_trainer(
        cfg,
        model,
        callbacks,
        automatic_optimization=False,
        validation=False,
        resume_from=resume,
        plan=plan,
    )
    datasets = []
    for utts, weight, _ in sources:
        dataset = UtteranceDataset(utts, cfg.data.on_bad_row)
        dataset.rejects_path = run_dir / spine.REJECTS_FILE
        datasets.append((dataset, weight))
    for utts, weight, name in sources:
        log.info("GSPO source %s: %d utterances, weight %.3g", name, len(utts), weight)
    dataset = MixtureRollouts(
        datasets, recipe.rollout_batch_size, recipe.steps_per_rollout(), cfg.seed, trainer.global_rank
    )
    loader = RolloutLoader(dataset, training.resolve_num_workers(cfg.data.num_workers, trainer.num_devices))
    sampling = SamplingOptions.from_recipe(recipe, cfg.seed)
    module = GSPOModule(
        model,
        processor,
        recipe,
        instantiate(dict(recipe.rollout_engine), processor=processor),
        CompositeReward(recipe.rewards),
        sampling,
        max(cfg.trainer.max_steps, 1),
        ref_model,
        cfg.trainer.gradient_clip_val,
    )
    return module, loader, trainer, processor


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train with GSPO and export (see the module docstring)."""
    if cfg.trainer.max_steps <= 0:
        raise ValueError("trainer.max_steps: GSPO runs are sized in optimizer steps; set trainer.max_steps > 0")
    module, loader, trainer, processor = prepare(cfg)
    fit(trainer, module, train_dataloaders=loader)  # Preempted (exit 143) / NonFiniteError propagate: no export
    return spine.finish_run(cfg, trainer, module.model, processor, cfg.recipe.export_on_end)
