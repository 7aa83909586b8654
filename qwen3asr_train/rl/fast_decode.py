"""One-token decode steps for GSPO sampling: a lean step of our own, and the transformers forward it replaces.

Why this module exists: on a small decoder the sampling loop is dominated by per-call overhead of the
transformers forward, not by arithmetic. Each step builds an attention mask from the 2-D padding mask, wraps
the cache in ``DynamicCache`` objects that concatenate new keys onto the old ones, recomputes the rotary
cos/sin from the position ids and goes through the generic attention dispatch. For the demo export (2 layers,
128 wide) that overhead was ~9 ms per step, while the arithmetic took well under 1 ms (docs/results.md).

:class:`LeanDecoder` does the same arithmetic with that bookkeeping taken out:

* **static key/value tensors**: one ``(U, kv_heads, P + C, head_dim)`` buffer per layer, allocated once for
  the prompt plus the token budget, written in place at each step (no concatenation);
* **a boolean validity row** per row instead of a 4-D mask: left padding off, everything decoded so far on;
* **precomputed rotary cos/sin** for every position up to ``P + C``, taken from the model's own
  ``rotary_emb`` (the same elementwise formula per position, so the same numbers), indexed per row;
* **the decoder layers' own modules**: norms, projections, MLP and final norm are called as modules, so
  weights, hooks and adapters (e.g. LoRA wrappers of a projection) are the model's; only the attention
  kernel is called directly (``scaled_dot_product_attention`` on the key/value heads, the query heads of
  a key/value head stacked as its queries, which is what ``repeat_kv`` computes).

It covers the Qwen3 text decoder (full attention, ``q_norm``/``k_norm``, RoPE of a non-dynamic type) and
raises a clear error for anything else. ``rl/rollout.py::HFStepDecoder`` is the transformers forward with a
``DynamicCache`` (``recipe.fast_decode=false``): the reference the lean step is tested against
(``tests/test_fast_decode.py``: hidden states to float round-off, identical sampled tokens).

Both decoders hold one row per distinct prefix and share an interface: ``select(parent)`` keeps/copies
rows (prefix sharing in :func:`qwen3asr_train.rl.rollout.sample_from_prompts`), ``step(embeds)`` appends
one token per row and returns the final hidden states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from qwen3asr_train.rl.rollout import PromptState


class StepDecoder(Protocol):
    """Incremental decoding over one row per distinct prefix."""

    def select(self, parent: torch.Tensor) -> None:
        """Keep rows ``parent`` (``(U',)`` indices into the current rows; repeats copy a row)."""

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``(U, H)`` input embeddings); return ``(U, H)`` final hidden states."""


def lean_decode_unsupported(language_model: torch.nn.Module) -> str | None:
    """Why :class:`LeanDecoder` cannot run this text decoder (None when it can)."""
    config = language_model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention is implemented)"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if "dynamic" in rope_type:
        return f"rope_type {rope_type!r} (its frequencies depend on the sequence length)"
    rotary = getattr(language_model, "rotary_emb", None)
    layers = getattr(language_model, "layers", None)
    if rotary is None or layers is None or getattr(language_model, "norm", None) is None:
        return f"{type(language_model).__name__} has no rotary_emb/layers/norm (not a Qwen3-style decoder)"
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or any(getattr(attn, name, None) is None for name in needed):
            return f"layer {i} ({type(layer).__name__}) lacks a Qwen3 attention ({', '.join(needed)})"
        if getattr(attn, "sliding_window", None):
            return f"layer {i} uses a sliding window"
        if not all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return f"layer {i} ({type(layer).__name__}) lacks input_layernorm/post_attention_layernorm/mlp"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Decode steps with static key/value buffers and precomputed rotary tables (see the module docstring).

    Args:
        language_model: the text decoder (``model.model.language_model``), in eval mode, under ``no_grad``.
        state: the prefilled prompts (one row each); their keys/values are copied into the buffers.
        max_new_tokens: decode steps the buffers must hold.
    """

    def __init__(self, language_model: torch.nn.Module, state: PromptState, max_new_tokens: int) -> None:
        reason = lean_decode_unsupported(language_model)
        if reason is not None:
            raise ValueError(
                f"recipe.fast_decode=true cannot decode this model: {reason}; set recipe.fast_decode=false"
            )
        if language_model.training or torch.is_grad_enabled():
            raise RuntimeError("LeanDecoder is for sampling: call it in eval mode under torch.no_grad()")
        self.lm = language_model
        rows, prompt = state.mask.shape
        capacity = prompt + max_new_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in zip(state.keys, state.values, strict=True):
            kbuf = k.new_zeros(rows, k.shape[1], capacity, k.shape[3])  # (U, kv_heads, P+C, head_dim)
            vbuf = v.new_zeros(rows, v.shape[1], capacity, v.shape[3])
            kbuf[:, :, :prompt] = k
            vbuf[:, :, :prompt] = v
            self.keys.append(kbuf)
            self.values.append(vbuf)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=state.mask.device)  # (U, P+C)
        self.valid[:, :prompt] = state.mask.bool()
        self.length = prompt
        self.next_pos = state.mask.long().sum(-1)  # (U,): what cumsum(mask) - 1 gives the next token
        dtype = state.last_hidden.dtype
        positions = torch.arange(capacity, device=state.mask.device)[None]  # (1, P+C)
        cos, sin = language_model.rotary_emb(state.last_hidden[:1, None], positions)  # (1, P+C, head_dim)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)  # (P+C, head_dim)

    def select(self, parent: torch.Tensor) -> None:
        self.keys = [k[parent] for k in self.keys]
        self.values = [v[parent] for v in self.values]
        self.valid = self.valid[parent]
        self.next_pos = self.next_pos[parent]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.length >= self.valid.shape[1]:
            raise RuntimeError(f"LeanDecoder: the {self.valid.shape[1]}-position buffers are full")
        rows = embeds.shape[0]
        t = self.length
        self.valid[:, t] = True
        mask = self.valid[:, None, None, : t + 1]  # (U, 1, 1, t+1): shared by every head
        cos = self.cos[self.next_pos][:, None, None]  # (U, 1, 1, head_dim)
        sin = self.sin[self.next_pos][:, None, None]
        x = embeds[:, None]  # (U, 1, H)
        for layer, kbuf, vbuf in zip(self.lm.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            d = attn.head_dim
            kv_heads = kbuf.shape[1]
            h = layer.input_layernorm(x)  # (U, 1, H)
            q = attn.q_norm(attn.q_proj(h).view(rows, -1, d))  # (U, heads, d)
            k = attn.k_norm(attn.k_proj(h).view(rows, kv_heads, d))  # (U, kv_heads, d)
            v = attn.v_proj(h).view(rows, kv_heads, d)  # (U, kv_heads, d)
            # queries of one key/value head side by side: (U, kv_heads, groups, d), as repeat_kv pairs them
            q = q.view(rows, kv_heads, -1, d)
            q = q * cos + _rotate_half(q) * sin
            k = k[:, :, None] * cos + _rotate_half(k[:, :, None]) * sin  # (U, kv_heads, 1, d)
            kbuf[:, :, t] = k[:, :, 0]
            vbuf[:, :, t] = v
            out = F.scaled_dot_product_attention(
                q, kbuf[:, :, : t + 1], vbuf[:, :, : t + 1], attn_mask=mask, scale=attn.scaling
            )  # (U, kv_heads, groups, d)
            x = x + attn.o_proj(out.reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length += 1
        self.next_pos = self.next_pos + 1
        return self.lm.norm(x)[:, 0]


__all__ = ["LeanDecoder", "StepDecoder", "lean_decode_unsupported"]
