"""A bounded cache of evaluated prompt prefixes (llama.cpp KV states).

`PrefixStateCache` keeps KV states of recent long prompts, keyed by their exact tokens (the model
is fixed per process, so tokens are a safe key). A new prompt restores the entry with the longest
common prefix and evaluates only the rest, so requests sharing a long system prompt skip it even
when other prompts ran in between.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixStateCache:
    """LRU of (tokens -> KV state bytes), bounded in total bytes."""

    def __init__(self, max_bytes: int, min_tokens: int) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def best(self, tokens: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length."""
        best_key, best_len = None, 0
        for key in self._entries:
            n = common_prefix(key, tokens)
            if n > best_len:
                best_key, best_len = key, n
        return best_key, best_len

    def get(self, key: tuple[int, ...]) -> bytes:
        """The state for `key`, marking it recently used."""
        self._entries.move_to_end(key)
        return self._entries[key]

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether a state for this prompt is worth keeping (long, and not already held)."""
        return len(tokens) >= self.min_tokens and tuple(tokens) not in self._entries

    def put(self, tokens: Sequence[int], state: bytes) -> None:
        """Keep `state`, evicting least recently used entries beyond the byte bound."""
        if len(state) > self.max_bytes:
            return
        key = tuple(tokens)
        self._entries[key] = state
        self.bytes += len(state)
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)
