"""Writes the load-test events: function URL chat requests of a few prompt sizes, some streamed.

    python -m bench.load_events [--count 6] [--sizes small,medium,long] [--stream-ratio 0.5]

Deterministic: the same arguments write the same files (events/load/NNN-<size>-<mode>.json), and
every run replaces the folder's previous events. The sizes cycle in the order given (repeat a
size to weight it); streamed requests are spread evenly at the given ratio. bench/load.py replays
the folder at a chosen concurrency.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from pathlib import Path
from typing import Any

from bench.common import ROOT

OUT_DIR = ROOT / "events/load"
TEMPLATE = ROOT / "events/function-url-chat.json"
SEED = 20261123

# words of context before the question, and the completion budget
SIZES: dict[str, tuple[int, int]] = {"small": (0, 16), "medium": (120, 32), "long": (450, 48)}

SENTENCES = [
    "The harbour town kept its lighthouse lit through every winter storm.",
    "Fishing boats left before dawn and returned when the tide turned.",
    "A narrow road climbed from the quay to the old stone church.",
    "Merchants sold salt, rope and dried fish in the square on market days.",
    "The ferry to the island ran twice a day in summer and once in winter.",
    "Children learned to swim in the sheltered cove below the cliffs.",
    "The mill by the river ground grain for three neighbouring villages.",
    "Every spring the town painted the railings along the promenade blue.",
    "An old map in the library showed the harbour before the new pier was built.",
    "The baker opened at five and sold out of bread by nine.",
    "Gulls followed the boats in and fought over what the nets let fall.",
    "In autumn the hills behind the town turned red with heather.",
    "The schoolhouse bell could be heard from the end of the breakwater.",
    "A coastguard station stood on the headland with a view of the strait.",
    "Visitors came by train until the line closed in the nineteen sixties.",
    "The tide tables were posted each week outside the harbour office.",
]
QUESTIONS = [
    "What is the town's lighthouse for?",
    "How often does the ferry run in winter?",
    "Who does the mill grind grain for?",
    "When does the baker open?",
    "What colour are the railings on the promenade?",
    "Where is the coastguard station?",
]
SYSTEM = "You are a concise assistant. Answer in one or two sentences."


def context_text(rng: random.Random, words: int) -> str:
    """About `words` words of shuffled sentences."""
    out: list[str] = []
    count = 0
    while count < words:
        sentence = rng.choice(SENTENCES)
        out.append(sentence)
        count += len(sentence.split())
    return " ".join(out)


def request_body(index: int, size: str, stream: bool, rng: random.Random) -> dict[str, Any]:
    """The OpenAI chat request for one event."""
    words, max_tokens = SIZES[size]
    question = QUESTIONS[index % len(QUESTIONS)]
    content = f"{context_text(rng, words)}\n\n{question}" if words else question
    body: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": content},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": index,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def function_url_event(index: int, body: dict[str, Any]) -> dict[str, Any]:
    """`body` as a function URL event, from the sample in events/."""
    event = copy.deepcopy(json.loads(TEMPLATE.read_text()))
    event["requestContext"]["requestId"] = f"load-{index:03d}"
    if body.get("stream"):
        event["headers"]["accept"] = "text/event-stream"
    event["body"] = json.dumps(body)
    return event


def is_streamed(index: int, ratio: float) -> bool:
    """Spread streamed requests evenly: request i streams when the running share steps up."""
    return math.floor((index + 1) * ratio) > math.floor(index * ratio)


def write_events(out_dir: Path, count: int, sizes: list[str], stream_ratio: float) -> list[Path]:
    """Replace the events in `out_dir` with `count` new ones; return their paths."""
    rng = random.Random(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.json"):
        old.unlink()
    paths = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        stream = is_streamed(i, stream_ratio)
        event = function_url_event(i, request_body(i, size, stream, rng))
        path = out_dir / f"{i:03d}-{size}-{'stream' if stream else 'buffered'}.json"
        path.write_text(json.dumps(event, indent=2) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_events", description=__doc__)
    parser.add_argument("--count", type=int, default=6, help="events to write")
    parser.add_argument("--sizes", default="small,medium,long", help="sizes, cycled in order")
    parser.add_argument("--stream-ratio", type=float, default=0.5, help="share streamed, 0-1")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder (its *.json replaced)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        parser.error(f"--sizes: choose from {', '.join(SIZES)} (got {args.sizes!r})")
    if not 0 <= args.stream_ratio <= 1:
        parser.error("--stream-ratio must be between 0 and 1")
    if args.count < 1:
        parser.error("--count must be at least 1")
    for path in write_events(args.out, args.count, sizes, args.stream_ratio):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
