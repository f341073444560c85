"""A thin, typed layer over llama.cpp's C API (the ctypes bindings of llama-cpp-python).

Only the bindings module `llama_cpp.llama_cpp` is imported, never the `llama_cpp` package itself:
the package's `__init__` also imports numpy, jinja2 and the high-level `Llama` class, 160 ms of
init on this machine kind against 20 ms for the bindings. Every cold start pays that difference.
This is the only module that touches llama.cpp; all calls come from the engine thread.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handler.engine.prefix_cache import PrefixStateCache, common_prefix

# Restoring a saved state costs a copy of it; below this many extra tokens, evaluating is cheaper.
PREFIX_RESTORE_MIN_GAIN = 32

_state: dict[str, Any] = {}  # "lib": the bindings module, "log": the live ctypes log callback


class BackendError(RuntimeError):
    """llama.cpp refused something (load, context, decode)."""


def bindings() -> Any:
    """The `llama_cpp.llama_cpp` ctypes module, imported without the package's heavy __init__."""
    if "lib" in _state:
        return _state["lib"]
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.submodule_search_locations is None:
            raise BackendError("llama-cpp-python is not installed")
        # A bare package object: submodules import normally, __init__ never runs.
        package = types.ModuleType("llama_cpp")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as lib

    _state["lib"] = lib
    return lib


def init_backend(verbose: bool) -> None:
    """Initialise llama.cpp once; silence its logging unless `verbose`."""
    lib = bindings()
    if "log" not in _state:

        def _log(level: int, text: bytes, user_data: Any) -> None:
            if verbose:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _state["log"] = lib.llama_log_callback(_log)
        lib.llama_log_set(_state["log"], ctypes.c_void_p(0))
        lib.llama_backend_init()


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling parameters in llama.cpp's terms."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    seed: int
    grammar: str | None = None


class GrammarError(BackendError):
    """llama.cpp could not parse a grammar, or it allows no token at some point."""


# Parsed grammars by text: parsing a JSON-schema grammar costs milliseconds, a clone microseconds.
GRAMMAR_CACHE_ENTRIES = 64


class Model:
    """A loaded (mmap'd) model: vocabulary, metadata and contexts built on it."""

    def __init__(self, path: str, n_gpu_layers: int) -> None:
        lib = bindings()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 2**31 - 1
        params.use_mmap = True
        self._lib = lib
        self.ptr = lib.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise BackendError(f"model {path}: llama.cpp could not load it (corrupt or truncated?)")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_embd = int(lib.llama_model_n_embd(self.ptr))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self._piece_buf = ctypes.create_string_buffer(256)

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None."""
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text`."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (ctypes.c_int32 * capacity)()
            n = self._lib.llama_tokenize(
                self.vocab, data, len(data), out, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token."""
        n = self._lib.llama_token_to_piece(
            self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special
        )
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(
                self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special
            )
        return self._piece_buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        """EOS, EOT and the like."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def special_text(self, which: str) -> str:
        """The text of the BOS or EOS token (for chat templates)."""
        token = (self._lib.llama_vocab_bos if which == "bos" else self._lib.llama_vocab_eos)(
            self.vocab
        )
        return "" if token < 0 else self.piece(token, special=True).decode("utf-8", "replace")


class Context:
    """One llama.cpp context (KV cache + compute buffers) with prefix reuse across calls."""

    def __init__(
        self, model: Model, n_ctx: int, n_batch: int, n_threads: int, embeddings: bool = False
    ) -> None:
        lib = bindings()
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        if embeddings:
            params.embeddings = True
            params.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        self._lib = lib
        self.model = model
        self.n_batch = n_batch
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise BackendError("llama.cpp could not create a context (out of memory?)")
        self.n_ctx = int(lib.llama_n_ctx(self.ptr))
        self._memory = lib.llama_get_memory(self.ptr)
        self._cached: list[int] = []  # tokens whose KV entries are in the cache
        self.prefix_cache: PrefixStateCache | None = None
        self._one = (ctypes.c_int32 * 1)()

    def evaluate_prompt(self, tokens: Sequence[int]) -> int:
        """Decode `tokens`, reusing the longest evaluated prefix (live, or from the prefix
        state cache); returns the reused length."""
        reuse = common_prefix(self._cached, tokens)
        cache = self.prefix_cache
        if cache is not None:
            key, shared = cache.best(tokens)
            if key is not None and shared > reuse + PREFIX_RESTORE_MIN_GAIN:
                self._restore(key, cache.get(key))
                reuse = shared
                cache.hits += 1
            elif len(tokens) >= cache.min_tokens:
                cache.misses += 1
        reuse = min(reuse, len(tokens) - 1)  # always decode at least one token for fresh logits
        self._lib.llama_memory_seq_rm(self._memory, -1, reuse, -1)
        self._cached = list(tokens[:reuse])
        for start in range(reuse, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            array = (ctypes.c_int32 * len(chunk))(*chunk)
            self._decode(self._lib.llama_batch_get_one(array, len(chunk)))
            self._cached.extend(chunk)
        if cache is not None and cache.wants(tokens):
            cache.put(tokens, self._save())
        return reuse

    def _save(self) -> bytes:
        size = self._lib.llama_state_seq_get_size(self.ptr, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ptr, buffer, size, 0)
        return bytes(buffer[:written])

    def _restore(self, tokens: tuple[int, ...], state: bytes) -> None:
        self._lib.llama_memory_seq_rm(self._memory, -1, 0, -1)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._lib.llama_state_seq_set_data(self.ptr, buffer, len(state), 0) == 0:
            self._cached = []
            raise BackendError("could not restore a cached prompt state")
        self._cached = list(tokens)

    def append(self, token: int) -> None:
        """Decode one sampled token."""
        self._one[0] = token
        self._decode(self._lib.llama_batch_get_one(self._one, 1))
        self._cached.append(token)

    def set_threads(self, n_threads: int) -> None:
        """Threads for generation and batch evaluation from now on."""
        self._lib.llama_set_n_threads(self.ptr, n_threads, n_threads)

    def reset(self) -> None:
        """Forget the KV cache."""
        self._lib.llama_memory_clear(self._memory, True)
        self._cached = []

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """Mean-pooled, L2-normalised embedding of `tokens` (embedding contexts only)."""
        self.reset()
        lib = self._lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            self._decode(batch)
        finally:
            lib.llama_batch_free(batch)
        pointer = lib.llama_get_embeddings_seq(self.ptr, 0)
        vector = [float(pointer[i]) for i in range(self.model.n_embd)]
        self.reset()
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def _decode(self, batch: Any) -> None:
        status = self._lib.llama_decode(self.ptr, batch)
        if status != 0:
            self._cached = []
            raise BackendError(f"llama_decode failed with status {status}")


class Sampler:
    """A native llama.cpp sampler chain (sampling in C, not Python), optionally constrained by a
    grammar.

    With a grammar, a token is drawn from the unconstrained chain first and kept if the grammar
    accepts it; only when it does not is the grammar applied to the whole vocabulary and the
    token drawn again (what llama.cpp's own common sampler does). Checking one candidate costs
    microseconds, masking 49,152 of them milliseconds, and the model's first choice is usually
    allowed.
    """

    def __init__(self, config: SamplerConfig, model: Model) -> None:
        lib = bindings()
        self._lib = lib
        self._n_vocab = model.n_vocab
        self.ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.grammar = _grammar(model, config.grammar) if config.grammar else None
        self._candidates: Any = None  # numpy view of a llama_token_data[n_vocab], on first use
        # Without penalties the chain keeps no history, so its first, unconstrained draw can be
        # llama.cpp's own sample-and-accept (all in C); a rejected token then costs it nothing.
        self._stateless = not (
            config.presence_penalty or config.frequency_penalty or config.repeat_penalty != 1.0
        )
        self._build_chain(config, model.n_vocab)

    def _build_chain(self, config: SamplerConfig, n_vocab: int) -> None:
        lib = self._lib

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(self.ptr, sampler)

        if config.presence_penalty or config.frequency_penalty or config.repeat_penalty != 1.0:
            add(
                # llama.h of llama-cpp-python 0.3.36 takes the vocabulary size first
                lib.llama_sampler_init_penalties(
                    n_vocab,
                    64,
                    config.repeat_penalty,
                    config.frequency_penalty,
                    config.presence_penalty,
                )
            )
        if config.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return
        if config.top_k > 0:
            add(lib.llama_sampler_init_top_k(config.top_k))
        if config.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(config.top_p, 1))
        if config.min_p > 0:
            add(lib.llama_sampler_init_min_p(config.min_p, 1))
        add(lib.llama_sampler_init_temp(config.temperature))
        add(lib.llama_sampler_init_dist(config.seed & 0xFFFFFFFF))

    def sample(self, context: Context) -> int:
        """Sample (and accept) the next token from the context's last logits."""
        if self.grammar is None:
            return int(self._lib.llama_sampler_sample(self.ptr, context.ptr, -1))
        lib = self._lib
        if self._stateless:
            token = int(lib.llama_sampler_sample(self.ptr, context.ptr, -1))
            if not self._allowed(token):
                token = self._draw(self._logits(context), constrained=True)
            lib.llama_sampler_accept(self.grammar, token)
            return token
        logits = self._logits(context)
        token = self._draw(logits, constrained=False)
        if not self._allowed(token):
            token = self._draw(logits, constrained=True)
        lib.llama_sampler_accept(self.grammar, token)
        lib.llama_sampler_accept(self.ptr, token)
        return token

    def _logits(self, context: Context) -> Any:
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(context.ptr, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _draw(self, logits: Any, constrained: bool) -> int:
        """Apply the chain (after the grammar, when `constrained`) to all candidates."""
        lib = self._lib
        candidates, array = self._candidate_array()
        candidates["logit"] = logits
        if constrained:
            lib.llama_sampler_apply(self.grammar, ctypes.byref(array))
            if not (candidates["logit"] > float("-inf")).any():
                raise GrammarError("the grammar allows no next token")
        lib.llama_sampler_apply(self.ptr, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def _candidate_array(self) -> tuple[Any, Any]:
        import numpy as np

        lib = self._lib
        if self._candidates is None:
            dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._candidates = np.zeros(self._n_vocab, dtype=dtype)
            self._candidates["id"] = np.arange(self._n_vocab, dtype=np.int32)
        candidates = self._candidates
        data = candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        # The samplers may reorder, shrink and even re-point the array: a fresh header each time.
        return candidates, lib.llama_token_data_array(data, self._n_vocab, -1, False)

    def _allowed(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (checked on one candidate)."""
        lib = self._lib
        one = lib.llama_token_data(token, 0.0, 0.0)
        array = lib.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lib.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(one.logit != float("-inf"))

    def close(self) -> None:
        """Free the chain and the grammar."""
        if self.ptr:
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


def token_logprobs(context: Context, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the context's last logits (the model's own
    distribution) and the `top` most likely tokens with theirs, best first."""
    import numpy as np

    model = context.model
    pointer = context._lib.llama_get_logits_ith(context.ptr, -1)
    logits = np.ctypeslib.as_array(pointer, shape=(model.n_vocab,)).astype(np.float64)
    peak = logits.max()
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(i), float(logits[i] - log_total)) for i in ids]
    return float(logits[token] - log_total), best


# (vocabulary, grammar text) -> a parsed grammar sampler that never samples, only is cloned
_grammars: dict[tuple[int, str], Any] = {}


def _grammar(model: Model, text: str) -> Any:
    """A fresh grammar sampler for `text`: a clone of the cached parse."""
    lib = bindings()
    key = (ctypes.cast(model.vocab, ctypes.c_void_p).value or 0, text)
    parsed = _grammars.pop(key, None)
    if parsed is None:
        parsed = lib.llama_sampler_init_grammar(model.vocab, text.encode("utf-8"), b"root")
        if not parsed:
            raise GrammarError("llama.cpp could not parse the grammar")
        while len(_grammars) >= GRAMMAR_CACHE_ENTRIES:
            lib.llama_sampler_free(_grammars.pop(next(iter(_grammars))))
    _grammars[key] = parsed  # most recently used last
    return lib.llama_sampler_clone(parsed)
