"""Import budget: what Lambda init imports (`python -X importtime`), biggest first.

Runs `import handler.lambda_function` (Lambda's init, with the real model) in a fresh process
N times and reports the median import time (self times summed) per package, and checks that
nothing heavy the first request does not need (FastAPI, numpy, the high-level llama_cpp package)
is imported at init.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

from bench.common import MODEL, OUT, ROOT, median

NOT_AT_INIT = ("fastapi", "numpy", "llama_cpp.llama", "boto3", "starlette")


def one_run() -> tuple[dict[str, float], set[str]]:
    env = {**os.environ, "MODEL_URI": str(MODEL), "PYTHONPATH": str(ROOT)}
    code = "import handler.lambda_function, sys; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(result.stdout.strip().splitlines()[-1].split())
    top: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line[len("import time:") :].split("|")
        if not own.strip().isdigit():
            continue
        # Self times add up to the total without double counting nested imports.
        top[name.strip().split(".")[0]] += int(own) / 1e6
    return dict(top), modules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.rounds)]
    names = set().union(*(r[0] for r in runs))
    table = {n: median([r[0].get(n, 0.0) for r in runs]) for n in names}
    modules = runs[-1][1]
    leaked = [m for m in NOT_AT_INIT if m in modules]
    summary = {
        "top_level_s": dict(sorted(table.items(), key=lambda kv: -kv[1])[:15]),
        "heavy_not_imported": [m for m in NOT_AT_INIT if m not in modules],
        "heavy_imported": leaked,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "imports.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if leaked:
        raise SystemExit(f"imported at init but not needed by the first request: {leaked}")


if __name__ == "__main__":
    main()
