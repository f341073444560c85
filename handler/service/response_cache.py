"""A bounded cache of whole answers to deterministic requests (temperature 0).

Keyed by a digest of every input that shapes the answer; off unless RESPONSE_CACHE_ENTRIES > 0.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any


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
