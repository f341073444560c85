"""P6 sampling: what sampling one token costs llama-server per slot, for the /completion body we
sent before issue 15, for the one we send now, and for llama-server's own defaults.

After every decode step llama-server samples each busy slot's token, one slot after the other on
its one thread: it fills a candidate array of the whole vocabulary from the logits, then applies
the sampler chain the request asked for. This times the chains with llama.cpp's own samplers (the
build our wheel carries, the same vendored source as llama-server) over random, peaked logits of
the default model's vocabulary (49,152 tokens), and the copy of the candidate array as a stand-in
for the fill every chain pays. At 64 slots a decode step pays 64 times each figure.

    .venv/bin/python -m bench.p6_sampling
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from handler.engine.in_process.bindings import bindings

N_VOCAB = 49_152
SEED = 1234
PEAKED = 20  # tokens far above the rest


def chains(lib: Any) -> dict[str, Callable[[], list[Any]]]:
    """Each chain as llama-server's common_sampler builds it for that body (an empty sampler,
    which llama.cpp returns for a neutral setting, costs nothing and is left out)."""
    return {
        # top_k 0 and every sampler listed; at temperature 0 only temp and dist do work.
        "old body, temperature 0": lambda: [
            lib.llama_sampler_init_temp_ext(0.0, 0.0, 1.0),
            lib.llama_sampler_init_dist(SEED),
        ],
        "new body, temperature 0 (top_k 1)": lambda: [
            lib.llama_sampler_init_top_k(1),
            lib.llama_sampler_init_dist(SEED),
        ],
        # What llama-server alone ran for conc.py's temperature-0 requests.
        "llama-server defaults, temperature 0": lambda: [
            lib.llama_sampler_init_top_k(40),
            lib.llama_sampler_init_top_p(0.95, 0),
            lib.llama_sampler_init_min_p(0.05, 0),
            lib.llama_sampler_init_temp_ext(0.0, 0.0, 1.0),
            lib.llama_sampler_init_dist(SEED),
        ],
        # Sampled requests ask for the whole distribution, in both bodies and in-process alike.
        "old and new body, temperature 1 (the OpenAI default)": lambda: [
            lib.llama_sampler_init_dist(SEED),
        ],
        "old and new body, temperature 0.8 top_p 0.9": lambda: [
            lib.llama_sampler_init_top_p(0.9, 1),
            lib.llama_sampler_init_temp_ext(0.8, 0.0, 1.0),
            lib.llama_sampler_init_dist(SEED),
        ],
    }


def candidates(lib: Any, rng: random.Random) -> Any:
    """A candidate array of the whole vocabulary with random logits, peaked as a language
    model's are (a few likely tokens hold most of the probability; top-p's cost depends on it)."""
    data = (lib.llama_token_data * N_VOCAB)()
    for i in range(N_VOCAB):
        data[i].id, data[i].logit, data[i].p = i, rng.gauss(0.0, 2.0), 0.0
    for i in rng.sample(range(N_VOCAB), PEAKED):
        data[i].logit += rng.uniform(12.0, 16.0)
    return data


def time_chain(lib: Any, build: Callable[[], list[Any]], template: Any, rounds: int) -> float:
    """Median microseconds of one chain application on a fresh copy of `template`."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    for sampler in build():
        lib.llama_sampler_chain_add(chain, sampler)
    work = (lib.llama_token_data * N_VOCAB)()
    array = lib.llama_token_data_array(work, N_VOCAB, -1, False)
    times = []
    try:
        for _ in range(rounds):
            ctypes.memmove(work, template, ctypes.sizeof(template))
            array.size, array.selected, array.sorted = N_VOCAB, -1, False
            started = time.perf_counter_ns()
            lib.llama_sampler_apply(chain, ctypes.byref(array))
            times.append(time.perf_counter_ns() - started)
    finally:
        lib.llama_sampler_free(chain)
    return statistics.median(times) / 1000


def time_fill(template: Any, rounds: int) -> float:
    """Median microseconds of copying the candidate array (what every chain pays first)."""
    work = (type(template))()
    times = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        ctypes.memmove(work, template, ctypes.sizeof(template))
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=64, help="for the per-step figure")
    args = parser.parse_args()
    lib = bindings()
    template = candidates(lib, random.Random(SEED))
    rows: dict[str, Any] = {"fill (copy of the candidates)": time_fill(template, args.rounds)}
    for name, build in chains(lib).items():
        rows[name] = time_chain(lib, build, template, args.rounds)
    print(json.dumps({"n_vocab": N_VOCAB, "rounds": args.rounds, "us_per_token": rows}))
    print(f"| per slot and token (n_vocab {N_VOCAB}) | us | x{args.slots} slots, ms per step |")
    print("|---|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} | {us * args.slots / 1000:.2f} |")


if __name__ == "__main__":
    main()
