"""P6, one stream: llama.cpp's decode loop in-process, without a server, against llama-bench tg128.

bench.p6_one_stream found llama-server alone at 0.78-0.82x of llama-bench's tg128 on one stream
whatever one setting changed; ours relays llama-server, so it cannot do better. This asks what
the decode loop itself reaches in our process, through the llama-cpp-python bindings (C calls
only: llama_decode, then the greedy sampler of llama.cpp), with the context shaped three ways:
as llama-bench makes it (128 cells, one sequence), one slot of ours (1,024 cells), and our slot
engine's whole cache (PARALLEL_SLOTS sequences of N_CTX cells each, not unified). Each shape runs
the loop with sampling (what a server must do) and without (llama-bench's loop: decode, wait).

    python -m bench.p6_decode_loop --model M.gguf --bin BUILD/bin [--ngl 0 --slots 4]

Needs llama_cpp importable with LLAMA_CPP_LIB_PATH pointing at the build's libllama.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.p6_gpu import llama_bench
from handler.config import available_cpus


def decode_rates(
    llama: Any, model: Any, n_ctx: int, n_seq: int, *, tokens: int, rounds: int, threads: int
) -> dict[str, Any]:
    """Tokens/s of `tokens` single-token decodes after an 8-token prompt, median of `rounds`,
    with llama.cpp's greedy sampler after each decode and without (decode and synchronize)."""
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = n_ctx, 512, n_seq
    params.kv_unified = n_seq == 1
    params.n_threads = params.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, params)
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    one = (llama.llama_token * 1)()
    prompt = (llama.llama_token * 8)(*range(100, 108))

    def loop(sample: bool) -> float:
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        llama.llama_decode(ctx, llama.llama_batch_get_one(prompt, 8))
        token = llama.llama_sampler_sample(chain, ctx, -1)
        started = time.perf_counter()
        for _ in range(tokens):
            one[0] = token
            llama.llama_decode(ctx, llama.llama_batch_get_one(one, 1))
            if sample:
                token = llama.llama_sampler_sample(chain, ctx, -1)
            else:
                llama.llama_synchronize(ctx)
        return tokens / (time.perf_counter() - started)

    try:
        loop(True)  # warm: kernels, CUDA graphs
        sampled = [loop(True) for _ in range(rounds)]
        bare = [loop(False) for _ in range(rounds)]
    finally:
        llama.llama_sampler_free(chain)
        llama.llama_free(ctx)
    return {
        "n_ctx": n_ctx,
        "n_seq": n_seq,
        "sampled_tps": statistics.median(sampled),
        "bare_tps": statistics.median(bare),
        "sampled_all": sampled,
        "bare_all": bare,
    }


def bindings() -> Any:
    """llama_cpp's ctypes bindings alone: the package's __init__ imports the high-level Llama
    class and its dependencies (diskcache, jinja2), which a GPU machine's kit may lack."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("llama_cpp is not importable")
    package = types.ModuleType("llama_cpp")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("llama_cpp", package)
    return importlib.import_module("llama_cpp.llama_cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--bin", type=Path, required=True, help="llama-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/p6-decode-loop")
    parser.add_argument("--ngl", type=int, default=-1)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=1024, help="per slot")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=available_cpus())
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"llama_bench": llama_bench(args.bin, args.model, args.ngl)}
    llama = bindings()

    llama.llama_backend_init()
    model_params = llama.llama_model_default_params()
    model_params.n_gpu_layers = 999 if args.ngl < 0 else args.ngl
    model = llama.llama_model_load_from_file(str(args.model).encode(), model_params)
    if not model:
        raise SystemExit(f"could not load {args.model}")
    shapes = [(args.tokens, 1), (args.n_ctx, 1), (args.n_ctx * args.slots, args.slots)]
    results["shapes"] = []
    for n_ctx, n_seq in shapes:
        row = decode_rates(
            llama, model, n_ctx, n_seq, tokens=args.tokens, rounds=args.rounds, threads=args.threads
        )
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
    llama.llama_model_free(model)
    (args.out / "decode-loop.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    (args.out / "decode-loop.md").write_text(report(results))


def report(results: dict[str, Any]) -> str:
    tg = results["llama_bench"].get("tg128", {}).get("avg_ts")
    lines = [
        f"llama-bench tg128: {tg:,.1f} tok/s" if tg else "llama-bench tg128: -",
        "",
        "| context cells | sequences | decode + greedy sample tok/s | x tg128 | decode only tok/s "
        "| x tg128 |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["shapes"]:
        sampled, bare = row["sampled_tps"], row["bare_tps"]
        lines.append(
            f"| {row['n_ctx']:,} | {row['n_seq']} | {sampled:,.1f} | "
            f"{(sampled / tg if tg else 0):.2f}x | {bare:,.1f} | {(bare / tg if tg else 0):.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
