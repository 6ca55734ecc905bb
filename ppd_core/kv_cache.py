"""A KV cache that writes new entries into preallocated room instead of concatenating.

transformers' DynamicCache grows every layer with `torch.cat` each step, copying the whole cache; a
tree step then commits its accepted rows by copying once more. Here each layer keeps a buffer with
spare room (doubled when full), `keys`/`values` are views of its filled part, and a step writes only
its new rows. It is a stock `DynamicCache` in every other respect (the model code is unchanged).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 256  # tokens allocated at first use


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buf = self._value_buf = None

    def _room(self, old: torch.Tensor | None, like: torch.Tensor, length: int, need: int) -> torch.Tensor:
        if old is not None and old.shape[-2] >= need:
            return old
        size = max(need, MIN_ROOM, 2 * (old.shape[-2] if old is not None else 0))
        buf = like.new_empty(*like.shape[:-2], size, like.shape[-1])
        if length:
            buf[..., :length, :] = old[..., :length, :]
        return buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()  # keys/values may have been cropped: the buffer past them is free
        need = length + key_states.shape[-2]
        self._key_buf = self._room(self._key_buf, key_states, length, need)
        self._value_buf = self._room(self._value_buf, value_states, length, need)
        self._key_buf[..., length:need, :] = key_states
        self._value_buf[..., length:need, :] = value_states
        self.keys, self.values = self._key_buf[..., :need, :], self._value_buf[..., :need, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


def growing_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose layers grow in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
