"""Model backends: what decoding, scoring and the scheduler ask of a model, in one protocol.

`gpt2.GPT2` (aigc's own forward pass) implements it, with per-row KV slots for continuous
batching; `TransformersBackend` adapts any transformers causal LM (static batches only). A CUDA
backend would be one more implementation. Nothing outside the backends asks which one it has.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from aigc_cli.models.gpt2 import SlotCache, Stepped


class Cache(Protocol):
    """The KV cache of one static batch."""

    def select(self, index: torch.Tensor) -> None:
        """Keep these rows, in this order (finished rows leave, beams are reordered)."""

    def repeat_interleave(self, times: int) -> None:
        """Each row `times` times over (contrastive search's branches)."""


class Backend(Protocol):
    continuous: bool  # has per-row KV slots (`new_slots`, `step`): greedy and sampled rows run on the scheduler

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, batch: int, capacity: int) -> Cache: ...

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Final (normalised) hidden states (B, T, E) for `ids` (B, T); `key_mask` (B, S) marks the
        real tokens among all S positions so far (the cache's and these)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (..., E) -> (..., V)."""

    def kv_bytes_per_position(self) -> int | None:
        """Bytes of keys and values one row holds per position (all layers); None if unknown."""

    def new_slots(self) -> SlotCache:
        """An empty per-row cache for the scheduler (only when `continuous`)."""

    def step(
        self, tokens: torch.Tensor | None, slots: SlotCache, prompts: list[list[int]], states: bool = False, first: int = 0
    ) -> torch.Tensor | Stepped:
        """One continuous-batching step: running rows' next tokens (slots first, first+1, ...) and
        new rows' prompts -> next logits (with `states`, also the last-layer hidden states:
        `gpt2.Stepped`). A step that raises changes no row's length (it can be retried)."""


class _DynamicCache:
    """transformers' DynamicCache behind the Cache protocol."""

    def __init__(self) -> None:
        from transformers import DynamicCache

        self.inner = DynamicCache()

    def select(self, index: torch.Tensor) -> None:
        self.inner.batch_select_indices(index)

    def repeat_interleave(self, times: int) -> None:
        self.inner.batch_repeat_interleave(times)


class TransformersBackend:
    """Any transformers causal LM (`*ForCausalLM`): its base model gives the final hidden states,
    its output embeddings the logits (with Gemma 2's soft-capping or Cohere's scale when the config
    asks for them)."""

    continuous = False

    def __init__(self, model: Any) -> None:
        self.hf = model
        self.config = model.config
        self._body = model.base_model
        self._head = model.get_output_embeddings()
        # transformers 5.x renames past_key_values to cache, model by model
        self._cache_arg = "cache" if "cache" in inspect.signature(self._body.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def new_cache(self, batch: int, capacity: int) -> _DynamicCache:
        return _DynamicCache()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, cache: Any = None) -> torch.Tensor:
        kwargs = {self._cache_arg: cache.inner} if cache is not None else {}
        out = self._body(input_ids=ids, attention_mask=key_mask, position_ids=positions, use_cache=cache is not None, **kwargs)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self._head(hidden)
        scale = getattr(self.config, "logit_scale", None)
        if isinstance(scale, (int, float)) and scale != 1:
            x = x * scale
        cap = getattr(self.config, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)) and cap:
            x = torch.tanh(x / cap) * cap
        return x

    def kv_bytes_per_position(self) -> int | None:
        c = self.config
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
        width = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
        if not (isinstance(layers, int) and isinstance(width, int) and isinstance(heads, int)):
            return None
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or width // heads
        return 2 * layers * kv_heads * head_dim * self.dtype.itemsize

    def new_slots(self) -> SlotCache:
        raise NotImplementedError("transformers models run in static batches (continuous is False)")

    def step(
        self, tokens: torch.Tensor | None, slots: SlotCache, prompts: list[list[int]], states: bool = False, first: int = 0
    ) -> torch.Tensor | Stepped:
        raise NotImplementedError("transformers models run in static batches (continuous is False)")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        """transformers-style call for whole sequences: `.logits` for every position."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return SimpleNamespace(logits=self.logits(self.forward(input_ids, positions, mask)))
