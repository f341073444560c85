"""P2: init duration vs model size, through the real Lambda emulator, page cache evicted.

Synthetic llama GGUFs of about 0.1, 1, 4 and 8 GB (bench/synth_model.py) are loaded through the
same init path as production; the function reports InitDuration and LoadDuration in its EMF line.
Each size runs with the lazy_mmap shim (the default in `make emulate` and the image) and without it
(llama.cpp's MAP_POPULATE), interleaved, median of N rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CACHE,
    LAZY_MMAP,
    OUT,
    ROOT,
    THREADS,
    emf_records,
    emulated_function,
    evict_from_page_cache,
    median,
    poll,
    post_json,
)
from bench.synth_model import SHAPES, write_model


def init_once(model: Path, lazy: bool) -> dict[str, Any]:
    """Spawn the function, send the models event (no generation), read its EMF line."""
    evict_from_page_cache(model)
    env = {"MODEL_URI": str(model), "N_CTX": "2048", "N_THREADS": str(THREADS)}
    if lazy:
        env["LD_PRELOAD"] = str(LAZY_MMAP)
    event = json.loads((ROOT / "events/function-url-models.json").read_text())
    log_path = OUT / "p2-stdout.log"
    started = time.perf_counter()
    with log_path.open("wb") as log, emulated_function(env, log) as (url, _):
        poll(lambda: post_json(url, event, timeout=60), 60)
        elapsed = time.perf_counter() - started
    emf = emf_records(log_path)[0]
    return {
        "init_s": emf["InitDuration"],
        "load_s": emf.get("LoadDuration"),
        "first_response_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(str(s) for s in SHAPES))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    synth_dir = CACHE / "synth"
    synth_dir.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) if "." in s else int(s) for s in args.sizes.split(",")]
    models = {s: write_model(synth_dir / f"llama-{s}gb.gguf", s) for s in sizes}
    runs: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for size in sizes:
            for lazy in (True, False):
                result = init_once(models[size], lazy)
                runs.append(
                    {
                        "size_gb": size,
                        "bytes": models[size].stat().st_size,
                        "lazy_mmap": lazy,
                        "round": round_no,
                        **result,
                    }
                )
                print(f"round {round_no} {size:>4} GB lazy={lazy!s:5} {result}", file=sys.stderr)
    summary = {}
    for size in sizes:
        for lazy in (True, False):
            sel = [r for r in runs if r["size_gb"] == size and r["lazy_mmap"] is lazy]
            summary[f"{size}GB/{'lazy' if lazy else 'populate'}"] = {
                "bytes": sel[0]["bytes"],
                "init_s": median([r["init_s"] for r in sel]),
                "load_s": median(
                    [r["load_s"] if r["load_s"] is not None else float("inf") for r in sel]
                ),
                "max_init_s": max(r["init_s"] for r in sel),
            }
    (OUT / "p2.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
