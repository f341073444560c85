"""Bounded caches for repeated work: evaluated prompt prefixes (KV states) and whole answers.

`PrefixStateCache` keeps llama.cpp KV states of recent long prompts, keyed by their exact tokens
(the model is fixed per process, so tokens are a safe key). A new prompt restores the entry with
the longest common prefix and evaluates only the rest, so requests sharing a long system prompt
skip it even when other prompts ran in between. `ResponseCache` keeps complete answers of
deterministic requests (temperature 0), keyed by every input that shapes the answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


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


class ResponseCache:
    """LRU of complete responses for deterministic requests, bounded in entries and bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Off when RESPONSE_CACHE_ENTRIES is 0."""
        return self.max_entries > 0

    @staticmethod
    def key(kind: str, inputs: dict[str, Any]) -> str:
        """A digest of everything that shapes the answer (normalised JSON)."""
        text = json.dumps({"kind": kind, **inputs}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """A cached response, or None (counted as a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, response: dict[str, Any]) -> None:
        """Keep a response, evicting the least recently used beyond either bound."""
        size = len(json.dumps(response))
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            self._entries[key] = (response, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)
