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
    """`keys` / `values` are views of the filled part of buffers with room to spare. `keep(n)` shortens both
    without a tensor op (a PPD step keeps its accepted rows in every layer: slicing 30 x 2 views cost ~0.15 ms a
    step here); the views are cut when next read, or replaced by the next `update`."""

    _kept: int | None = None  # a pending cut of both views

    def _cut(self) -> None:
        if self._kept is not None:
            n, self._kept = self._kept, None
            self._keys, self._values = self._keys[..., :n, :], self._values[..., :n, :]

    @property
    def keys(self) -> torch.Tensor | None:
        self._cut()
        return self._keys

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._cut()
        self._keys = t

    @property
    def values(self) -> torch.Tensor | None:
        self._cut()
        return self._values

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._cut()
        self._values = t

    def keep(self, n: int) -> None:
        """Keep the first n entries; the rest become free room."""
        if not 0 <= n <= self.get_seq_length():
            raise ValueError(f"cannot keep {n} of {self.get_seq_length()} entries")
        self._kept = n

    def get_seq_length(self) -> int:
        return self._kept if self._kept is not None else super().get_seq_length()

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
        length = self.get_seq_length()  # keys/values may have been cropped or kept: the buffer past them is free
        self._kept = None  # both views are replaced below
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
