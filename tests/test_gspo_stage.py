"""GSPO stage: encoder once per utterance, log-prob consistency, parameters move, metrics logged, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3asr_train.data.dataset import Sample
from qwen3asr_train.data.manifest import Utterance
from qwen3asr_train.rl.rollout import HFGenerateEngine, Rollouts, SamplingOptions, build_prompts, completion_logprobs
from qwen3asr_train.stages import gspo
from tests.conftest import make_config

REPO = Path(__file__).resolve().parents[1]


def _samples(n=3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sec = 0.8 + 0.5 * i
        utt = Utterance(id=f"u{i}", audio="x.wav", duration=sec, text="alpha bravo", language="English")
        out.append(Sample(utt, (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), i))
    return out


def test_encoder_runs_once_per_utterance_per_rollout(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    seen: list[int] = []
    handle = model.model.audio_tower.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["input_features"].shape[0]), with_kwargs=True
    )
    try:
        opts = SamplingOptions(group_size=5)
        prompts = build_prompts(processor, _samples(3), opts, step=0)
        torch.manual_seed(0)
        rollouts = HFGenerateEngine(processor).generate(model, prompts, opts)
    finally:
        handle.remove()
    assert rollouts.completion_ids.shape[0] == 15
    # each of the 3 utterances encoded once (grouped by chunk count, rl/rollout.py::audio_embeddings), not 15 times
    assert sum(seen) == 3, f"encoder calls (utterances per call): {seen}"


def test_logprobs_match_generation_scores(tiny_model_and_processor):
    """The teacher-forced log-probs of sampled tokens equal the distribution generation sampled from."""
    model, processor = tiny_model_and_processor
    opts = SamplingOptions(group_size=2, temperature=0.7)
    prompts = build_prompts(processor, _samples(2), opts, step=0)
    engine = HFGenerateEngine(processor)
    from qwen3asr_train.rl.rollout import prompt_embeddings

    embeds = prompt_embeddings(model, prompts).repeat_interleave(2, 0)
    mask = prompts.attention_mask.repeat_interleave(2, 0)
    torch.manual_seed(3)
    out = model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        eos_token_id=engine.end_ids,
        pad_token_id=engine.pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    ids = out.sequences
    comp_mask = torch.ones_like(ids)
    rollouts = Rollouts(prompts, 2, ids, comp_mask, [""] * 4, [True] * 4)
    with torch.no_grad():
        ours = completion_logprobs(model, rollouts, temperature=0.7)
    # scores are the temperature-processed logits at each step
    ref = torch.stack(
        [torch.log_softmax(s.float(), -1).gather(-1, ids[:, t : t + 1]).squeeze(-1) for t, s in enumerate(out.scores)],
        dim=1,
    )
    ended = torch.isin(ids, torch.tensor(engine.end_ids)).long().cumsum(-1)
    live = (ended == 0) | ((ended == 1) & torch.isin(ids, torch.tensor(engine.end_ids)))
    assert torch.allclose(ours[live], ref[live], atol=1e-5)


def _run(tmp_path: Path, manifest: Path, *extra: str):
    overrides = [
        "recipe=gspo",
        "model=tiny",
        f"data.train={manifest}",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "recipe.group_size=3",
        "recipe.rollout_batch_size=2",
        "recipe.steps_per_generation=2",
        "recipe.optim.lr=1e-2",
        "recipe.optim.warmup_ratio=0",
        f"run_dir={tmp_path}",
        *extra,
    ]
    cfg = make_config(overrides)
    module, loader, trainer, _ = gspo.prepare(cfg)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, train_dataloaders=loader)
    return module, before, tmp_path


def test_tiny_gspo_run_moves_trainable_weights_only_and_logs_metrics(manifest_dir, tmp_path):
    module, before, run_dir = _run(tmp_path, manifest_dir / "train.jsonl", "model.freeze_audio_encoder=true")
    for name, param in module.model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        if name.startswith("model.audio_tower."):
            assert not moved, f"frozen {name} changed"
        else:
            assert moved, f"trainable {name} did not change"
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    for key in (
        "rollout/reward_mean",
        "rollout/reward_std",
        "rollout/frac_zero_variance_groups",
        "gspo/clip_frac",
        "gspo/clip_frac_low",
        "gspo/clip_frac_high",
        "gspo/seq_ratio_mean",
        "rollout/completion_length",
        "rollout/truncation_rate",
        "rollout/empty_rate_speech",
        "rollout/sub_rate",
        "rollout/del_rate",
        "rollout/ins_rate",
        "rollout/lid_acc",
        "reward/accuracy",
        "reward/format",
        "train/loss",
        "train/lr",
    ):
        assert key in keys, key
    ratios = {int(r["step"]): float(r["gspo/seq_ratio_mean"]) for r in rows if r.get("gspo/seq_ratio_mean")}
    assert ratios[0] == pytest.approx(1.0, abs=1e-6)  # first minibatch of a rollout is on-policy
    assert ratios[1] != pytest.approx(1.0, abs=1e-9)  # the second one is off-policy


@pytest.mark.slow
def test_gspo_ddp_two_cpu_processes(manifest_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "qwen3asr_train",
        "recipe=gspo",
        "model=tiny",
        f"data.train={manifest_dir / 'train.jsonl'}",
        "trainer=ddp",
        "model.freeze_audio_encoder=true",
        "recipe.optim.lr=1e-2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "recipe.group_size=2",
        "recipe.rollout_batch_size=2",
        "recipe.steps_per_generation=2",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    assert any(r.get("rollout/reward_mean") for r in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    from safetensors.torch import load_file

    before = load_file(str(run_dir / "model_init" / "model.safetensors"))
    after = load_file(str(run_dir / "export" / "model.safetensors"))
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        assert moved != name.startswith("model.audio_tower."), f"{name}: moved={moved}"


def test_config_rules(tmp_path):
    from qwen3asr_train.config.schema import ConfigError

    with pytest.raises(ConfigError, match="recipe.steps_per_generation"):
        make_config(
            [
                "recipe=gspo",
                "model=tiny",
                "data.train=x",
                "trainer.max_steps=4",
                "recipe.rollout_batch_size=6",
                "recipe.steps_per_generation=4",
                f"run_dir={tmp_path}",
            ]
        )
    with pytest.raises(ConfigError, match="trainer.checkpoint_every_n_steps"):
        make_config(
            [
                "recipe=gspo",
                "model=tiny",
                "data.train=x",
                "trainer.max_steps=4",
                "trainer.checkpoint_every_n_steps=3",
                f"run_dir={tmp_path}",
            ]
        )


def test_gspo_batches_with_word_times(tmp_path):
    """Rollout batches carry utterances; word times in them must survive Lightning's batch transfer."""
    from qwen3asr_train.tools.synthetic import write_tone_corpus

    manifest = write_tone_corpus(tmp_path / "tones", 4, seed=0)
    module, before, _ = _run(tmp_path / "run", manifest, "trainer.max_steps=2")
    assert any(not torch.equal(p.detach(), before[n]) for n, p in module.model.named_parameters())


def test_ratio_statistics_are_averaged_over_the_steps_between_writes(manifest_dir, tmp_path):
    """With log_every_n_steps = steps_per_generation, each write used to show one minibatch position only (always
    the last, most off-policy one, whose clip fraction is the highest); now it shows the mean of the steps since the
    previous write. Checked against a run that writes every step (same seed, so the same steps)."""
    _, _, every = _run(tmp_path / "every", manifest_dir / "train.jsonl")
    _, _, pairs = _run(tmp_path / "pairs", manifest_dir / "train.jsonl", "trainer.log_every_n_steps=2")

    def read(run_dir: Path, key: str) -> dict[int, float]:
        rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
        return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}

    for key in ("gspo/clip_frac", "gspo/clip_frac_low", "gspo/clip_frac_high", "gspo/seq_ratio_mean"):
        per_step, window = read(every, key), read(pairs, key)
        assert sorted(per_step) == [0, 1, 2, 3] and sorted(window) == [1, 3], (key, per_step, window)
        for step in (1, 3):
            assert window[step] == pytest.approx((per_step[step - 1] + per_step[step]) / 2, abs=1e-6), key
    assert read(every, "gspo/seq_ratio_mean")[1] != pytest.approx(1.0, abs=1e-9)  # the window holds an off-policy step
