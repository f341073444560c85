"""P5: our S3 fetch vs boto3's default `download_file`, on a local S3 (moto server), same run.

    .venv/bin/python -m bench.p5_s3_fetch [--rounds 7] [--mb 100]

Each round runs every variant once, in a rotated order, on the same object; the table shows
medians. Every variant starts from an imported boto3 and builds its own client, as a cold start
does. Ours includes HeadObject, the sha256 verification, the atomic rename and the cache marker;
boto3's default verifies nothing. Extra rows: boto3's default plus a sha256 pass afterwards (what
verification costs when it is not overlapped with the download), boto3 with our part size and
concurrency (what the tuning alone gives), and the CRT client (s3transfer.crt, when awscrt is
installed), to choose between the two transfer clients by numbers.
Results go to bench/out/p5.json and, as a Markdown table, to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from bench.common import OUT, ROOT, fmt, free_port, http_ok, median, poll, spawn
from handler.config import load_settings
from handler.model_source import sha256_file
from handler.model_source.s3_download import fetch_s3_model

BUCKET = "bench-models"
KEY = "p5/model.gguf"
MB = 1_000_000
BASELINE = "boto3 download_file (default, no verification)"
OURS = "coldstart fetch_s3_model (verified)"


def gguf_like(size: int) -> bytes:
    """A GGUF header (our fetch checks it) followed by random bytes."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    return header + os.urandom(size - len(header))


def crt_variant(
    endpoint: str, part_bytes: int, target: Path, want: str
) -> Callable[[], None] | None:
    """The CRT transfer client against `endpoint`, or None when awscrt is not installed."""
    try:
        import botocore.session
        from s3transfer.crt import (
            BotocoreCRTCredentialsWrapper,
            BotocoreCRTRequestSerializer,
            CRTTransferManager,
            create_s3_crt_client,
        )
    except ImportError:
        print("awscrt not installed: no CRT row", file=sys.stderr)
        return None

    def run() -> None:
        session = botocore.session.Session()
        credentials = BotocoreCRTCredentialsWrapper(session.get_credentials())
        client = create_s3_crt_client(
            region="us-east-1",
            crt_credentials_provider=credentials.to_crt_credentials_provider(),
            use_ssl=False,
            part_size=part_bytes,
        )
        # boto3's own CRT path ignores endpoint_url, so build the serializer with ours.
        serializer = BotocoreCRTRequestSerializer(
            session, {"region_name": "us-east-1", "endpoint_url": endpoint}
        )
        with CRTTransferManager(client, serializer) as manager:
            manager.download(BUCKET, KEY, str(target), {}).result()
        assert sha256_file(target) == want

    return run


def measure(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each variant, interleaved and rotated so no variant always goes first."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
        print(f"round {round_no + 1}/{rounds} done", file=sys.stderr)
    return times


def table(times: dict[str, list[float]], mb: int) -> str:
    """The Markdown table for bench/RESULTS.md."""
    base = median(times[BASELINE])
    lines = [
        "| variant | median s | MB/s | throughput vs boto3 default | runs (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, runs in times.items():
        m = median(runs)
        runs_text = " ".join(fmt(t, 2) for t in runs)
        lines.append(f"| {name} | {fmt(m)} | {mb / m:.0f} | {base / m:.2f}x | {runs_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="p5-"))
    moto = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    with spawn(moto):
        try:
            poll(lambda: http_ok(f"{endpoint}/moto-api/"), timeout_s=30, interval_s=0.05)
            data = gguf_like(args.mb * MB)
            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key=KEY, Body=data, ChecksumAlgorithm="SHA256")
            want = hashlib.sha256(data).hexdigest()
            del data
            settings = load_settings(
                {
                    "MODEL_URI": f"s3://{BUCKET}/{KEY}",
                    "S3_ENDPOINT_URL": endpoint,
                    "MODEL_CACHE_DIR": str(work / "cache"),
                }
            )

            def ours() -> None:
                shutil.rmtree(work / "cache", ignore_errors=True)
                assert fetch_s3_model(settings).sha256 == want

            def default() -> None:
                # A fresh session, as ours and every cold start has: the default session would
                # keep its loaded service model between runs and skip ~0.1 s that ours pays.
                client = boto3.session.Session().client("s3", endpoint_url=endpoint)
                client.download_file(BUCKET, KEY, str(work / "default.bin"))

            def default_sha() -> None:
                default()
                assert sha256_file(work / "default.bin") == want

            part_bytes = settings.s3_part_size_mb << 20

            def same_tuning_sha() -> None:
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(
                    multipart_threshold=part_bytes,
                    multipart_chunksize=part_bytes,
                    max_concurrency=settings.s3_concurrency,
                )
                client = boto3.session.Session().client("s3", endpoint_url=endpoint)
                client.download_file(BUCKET, KEY, str(work / "tuned.bin"), Config=config)
                assert sha256_file(work / "tuned.bin") == want

            variants = {
                BASELINE: default,
                OURS: ours,
                "boto3 download_file + sha256 afterwards": default_sha,
                "boto3 download_file, our part size and concurrency, + sha256 afterwards": (
                    same_tuning_sha
                ),
            }
            crt = crt_variant(endpoint, part_bytes, work / "crt.bin", want)
            if crt is not None:
                variants["CRT client (s3transfer.crt, same part size) + sha256 afterwards"] = crt
            times = measure(variants, args.rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    ratio = median(times[BASELINE]) / median(times[OURS])
    setup = (
        f"{args.mb} MB object, moto server on 127.0.0.1, {len(os.sched_getaffinity(0))} CPUs; "
        f"ours: {settings.s3_part_size_mb} MiB parts x {settings.s3_concurrency} concurrent; "
        f"median of {args.rounds} interleaved rounds"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "p5.json").write_text(
        json.dumps({"setup": setup, "runs_s": times, "ratio": ratio}, indent=1)
    )
    print(f"\n{setup}\n\n{table(times, args.mb)}\n")
    print(f"P5 throughput ratio (ours, verified / boto3 default): {ratio:.2f}x")
    print(f"(written to {(OUT / 'p5.json').relative_to(ROOT)})")


if __name__ == "__main__":
    main()
