"""One-token decode steps for GSPO sampling: a lean step of our own, and the transformers forward it replaces.

Why this module exists: on a small decoder the sampling loop is dominated by per-call overhead of the
transformers forward, not by arithmetic. Each step builds an attention mask from the 2-D padding mask, wraps
the cache in ``DynamicCache`` objects that concatenate new keys onto the old ones, recomputes the rotary
cos/sin from the position ids and goes through the generic attention dispatch. For the demo export (2 layers,
128 wide, one CPU thread) a transformers step cost ~9 ms; the lean step costs ~2 ms on 8 rows and ~5 ms on 64
rows, where the matmuls themselves take ~3.5 ms (docs/results.md).

:class:`LeanDecoder` does the same arithmetic with that bookkeeping taken out:

* **static key/value tensors**: one ``(U, kv_heads, P + C, head_dim)`` buffer per layer, allocated once for
  the prompt plus the token budget, written in place at each step (no concatenation);
* **a boolean validity row** per row instead of a 4-D mask: left padding off, everything decoded so far on;
* **precomputed rotary cos/sin** for every position up to ``P + C``, taken from the model's own
  ``rotary_emb`` (the same elementwise formula per position, so the same numbers), indexed per row;
* **the layers' own weights in fewer operations**: when a layer's projections and norms are the plain
  transformers modules, its step runs on their weights with the q/k/v and gate/up projections concatenated
  (one matmul each), ``rms_norm`` as one operation, both head norms at once, and the rotary rotation as a
  ``roll`` (~20 operations a layer instead of ~50; the same arithmetic). A layer with an adapter (e.g. a LoRA
  wrapper of a projection) or a hook calls its modules instead, so the adapter takes part;
* **attention on the key/value heads**: ``scaled_dot_product_attention`` with the query heads of a key/value
  head stacked as its queries, which is what ``repeat_kv`` computes, without the copies.

It covers the Qwen3 text decoder (full attention, ``q_norm``/``k_norm``, RoPE of a non-dynamic type) and
raises a clear error for anything else. ``rl/rollout.py::HFStepDecoder`` is the transformers forward with a
``DynamicCache`` (``recipe.fast_decode=false``): the reference the lean step is tested against
(``tests/test_fast_decode.py``: hidden states to float round-off, identical sampled tokens).

Both decoders hold one row per distinct prefix and share an interface: ``select(parent)`` keeps/copies
rows (prefix sharing in :func:`qwen3asr_train.rl.rollout.sample_from_prompts`), ``step(embeds)`` appends
one token per row and returns the final hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

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


@dataclass
class _FusedLayer:
    """One decoder layer's weights arranged for a step with few operations (built from plain modules only).

    ``qkv``/``gate_up`` are the row-concatenated projection weights (one matmul instead of three/two);
    ``qk_norm`` stacks the ``q_norm`` weight once per query head and the ``k_norm`` weight once per key/value
    head, so both head norms are one ``rms_norm`` and one product.
    """

    ln1: torch.Tensor
    ln1_eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: torch.Tensor  # (heads + kv_heads, head_dim)
    qk_eps: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    ln2_eps: float
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    intermediate: int
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _plain_linear(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _plain_norm(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, Qwen3RMSNorm)
        and type(module).forward is Qwen3RMSNorm.forward
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _cat_bias(modules: list[torch.nn.Linear]) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])


def _fused_layer(layer: torch.nn.Module) -> _FusedLayer | None:
    """The layer's weights for the fused step, or None when a module is not the plain transformers one (an adapter
    such as a LoRA wrapper, a hook): then the step calls the modules themselves."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
    if not all(m is not None and _plain_linear(m) for m in linears) or not all(_plain_norm(m) for m in norms):
        return None
    if attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
        return None
    d = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    return _FusedLayer(
        ln1=layer.input_layernorm.weight,
        ln1_eps=layer.input_layernorm.variance_epsilon,
        qkv=torch.cat([m.weight for m in qkv]),
        qkv_bias=_cat_bias(qkv),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        qk_norm=torch.cat([attn.q_norm.weight.expand(heads, d), attn.k_norm.weight.expand(kv_heads, d)]),
        qk_eps=attn.q_norm.variance_epsilon,
        o=attn.o_proj.weight,
        o_bias=attn.o_proj.bias,
        ln2=layer.post_attention_layernorm.weight,
        ln2_eps=layer.post_attention_layernorm.variance_epsilon,
        gate_up=torch.cat([m.weight for m in gate_up]),
        gate_up_bias=_cat_bias(gate_up),
        intermediate=mlp.gate_proj.out_features,
        down=mlp.down_proj.weight,
        down_bias=mlp.down_proj.bias,
        act=mlp.act_fn,
        scaling=attn.scaling,
    )


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
        if torch.is_grad_enabled():
            raise RuntimeError("LeanDecoder is for sampling: call it under torch.no_grad()")
        if language_model.training and any(layer.self_attn.attention_dropout > 0 for layer in language_model.layers):
            raise RuntimeError("LeanDecoder applies no attention dropout: sample in eval mode (model.eval())")
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
        half = self.sin.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2] (a sign moved, the same products)
        self.signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)  # (P+C, head_dim)
        self.fused = [_fused_layer(layer) for layer in language_model.layers]
        """Per layer: its weights for the fused step, or None (the layer's own modules are called)."""

    def select(self, parent: torch.Tensor) -> None:
        self.keys = [k[parent] for k in self.keys]
        self.values = [v[parent] for v in self.values]
        self.valid = self.valid[parent]
        self.next_pos = self.next_pos[parent]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.length >= self.valid.shape[1]:
            raise RuntimeError(f"LeanDecoder: the {self.valid.shape[1]}-position buffers are full")
        t = self.length
        self.valid[:, t] = True
        mask = self.valid[:, None, None, : t + 1]  # (U, 1, 1, t+1): shared by every head
        x = embeds  # (U, H)
        for layer, fused, kbuf, vbuf in zip(self.lm.layers, self.fused, self.keys, self.values, strict=True):
            if fused is not None:
                x = self._fused_layer_step(fused, x, kbuf, vbuf, mask, t)
            else:
                x = self._module_layer_step(layer, x, kbuf, vbuf, mask, t)
        self.length += 1
        self.next_pos = self.next_pos + 1
        return self.lm.norm(x)

    def _fused_layer_step(
        self, w: _FusedLayer, x: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, mask: torch.Tensor, t: int
    ) -> torch.Tensor:
        """One layer from its fused weights: ~20 operations instead of ~50 (the same arithmetic)."""
        rows, d = x.shape[0], w.head_dim
        cos = self.cos[self.next_pos][:, None]  # (U, 1, d)
        sin = self.signed_sin[self.next_pos][:, None]
        h = F.rms_norm(x, (x.shape[-1],), w.ln1, w.ln1_eps)  # (U, H)
        qkv = F.linear(h, w.qkv, w.qkv_bias).view(rows, w.heads + 2 * w.kv_heads, d)
        qk = F.rms_norm(qkv[:, : w.heads + w.kv_heads], (d,), None, w.qk_eps) * w.qk_norm  # (U, heads+kv, d)
        qk = qk * cos + qk.roll(d // 2, -1) * sin  # rotary
        q = qk[:, : w.heads].view(rows, w.kv_heads, -1, d)  # (U, kv_heads, groups, d): as repeat_kv pairs them
        kbuf[:, :, t] = qk[:, w.heads :]
        vbuf[:, :, t] = qkv[:, w.heads + w.kv_heads :]
        out = F.scaled_dot_product_attention(
            q, kbuf[:, :, : t + 1], vbuf[:, :, : t + 1], attn_mask=mask, scale=w.scaling
        )  # (U, kv_heads, groups, d)
        x = x + F.linear(out.reshape(rows, -1), w.o, w.o_bias)
        h = F.rms_norm(x, (x.shape[-1],), w.ln2, w.ln2_eps)
        gate, up = F.linear(h, w.gate_up, w.gate_up_bias).split(w.intermediate, dim=-1)
        return x + F.linear(w.act(gate) * up, w.down, w.down_bias)

    def _module_layer_step(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        kbuf: torch.Tensor,
        vbuf: torch.Tensor,
        mask: torch.Tensor,
        t: int,
    ) -> torch.Tensor:
        """One layer through its own modules (adapters and hooks included)."""
        attn = layer.self_attn
        rows, d, kv_heads = x.shape[0], attn.head_dim, kbuf.shape[1]
        cos = self.cos[self.next_pos][:, None, None]  # (U, 1, 1, d)
        sin = self.sin[self.next_pos][:, None, None]
        h = layer.input_layernorm(x)  # (U, H)
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
        x = x + attn.o_proj(out.reshape(rows, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))


__all__ = ["LeanDecoder", "StepDecoder", "lean_decode_unsupported"]
