"""``recipe.label_smoothing``: the smoothed token cross-entropy against a float64 construction by hand."""

from __future__ import annotations

import pytest
import torch

from qwen3asr_train import training
from qwen3asr_train.config.schema import SFTConfig
from qwen3asr_train.data.collate import SFTCollator, SFTOptions
from qwen3asr_train.data.prompts import ASR_TEXT, IM_END
from qwen3asr_train.losses import IGNORE_INDEX, target_token_ce
from qwen3asr_train.stages.sft import SFTModule
from tests.test_collate import samples


def _by_hand(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, eps: float) -> float:
    """Σ over labelled targets of (1 − ε)·(−log p_y) + ε·mean_v(−log p_v), one position at a time in float64."""
    w = head.weight.detach().double()
    b = head.bias.detach().double() if head.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    total = 0.0
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[row, t])
            if y == IGNORE_INDEX:
                continue
            z = hidden[row, t - 1].detach().double() @ w.T + b  # predicted from the previous position
            logp = z - torch.logsumexp(z, 0)
            total += float((1 - eps) * -logp[y] + eps * -logp.mean())
    return total


@pytest.mark.parametrize("chunk_tokens", [0, 3])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_ce_matches_hand_construction(chunk_tokens: int, eps: float) -> None:
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 16, generator=gen)
    head = torch.nn.Linear(16, 23)
    labels = torch.randint(0, 23, (2, 9), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    labels[1, 7] = IGNORE_INDEX
    loss, count = target_token_ce(hidden, labels, head, chunk_tokens, eps)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert float(loss.detach()) == pytest.approx(_by_hand(hidden, labels, head, eps), rel=1e-5)


def test_smoothing_gradient_pushes_mass_off_the_target() -> None:
    """With ε > 0 a target already predicted with p ≈ 1 still has a gradient (toward ε/V elsewhere); with ε = 0 it
    has almost none: the over-confidence the option is meant to curb."""
    head = torch.nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[2, 0] = 30.0  # class 2 gets logit 30 from feature 0
    hidden = torch.zeros(1, 2, 4)
    hidden[0, 0, 0] = 1.0
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    grads = []
    for eps in (0.0, 0.1):
        head.zero_grad()
        target_token_ce(hidden, labels, head, 0, eps)[0].backward()
        grads.append(float(head.weight.grad[2, 0]))
    assert abs(grads[0]) < 1e-9
    assert grads[1] == pytest.approx(0.1 * (1 - 1 / 5), rel=1e-4)  # d/dz_y = p_y − q_y = 1 − (0.9 + 0.1/5)


def test_sft_module_smooths_in_training_only(tiny_model_and_processor) -> None:
    model, processor = tiny_model_and_processor
    tok = processor.tokenizer
    ids = (tok.pad_token_id, tok.convert_tokens_to_ids(ASR_TEXT), tok.convert_tokens_to_ids(IM_END))
    plain = SFTModule(model, SFTConfig(), 10, *ids)
    smooth = SFTModule(model, SFTConfig(label_smoothing=0.2), 10, *ids)
    batch = SFTCollator(processor, SFTOptions())(samples())
    labels = batch["labels"]
    try:
        with torch.no_grad():
            plain.train()  # both modules wrap the same (dropout-free) model: same hidden states
            smooth.train()
            hidden = training.backbone_hidden(model, batch).last_hidden_state
            want = _by_hand(hidden, labels, model.lm_head, 0.2)
            assert float(smooth.forward_sums(batch)["ce_sum"]) == pytest.approx(want, rel=1e-4)
            plain_train = float(plain.forward_sums(batch)["ce_sum"])
            assert plain_train == pytest.approx(_by_hand(hidden, labels, model.lm_head, 0.0), rel=1e-4)
            plain.eval()
            smooth.eval()
            assert float(smooth.forward_sums(batch)["ce_sum"]) == pytest.approx(plain_train, rel=1e-5)
    finally:
        model.eval()


def test_label_smoothing_is_validated() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        SFTConfig(label_smoothing=1.0).validate()
