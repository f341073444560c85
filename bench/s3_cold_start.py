"""Issue 17: the S3 model source on the cold-storage profiles: spawn -> first token with the model
downloaded from a local S3 (moto server) over a shaped link, against the same model read from the
simulated block device of bench/cold_storage.py, in the same run.

The link: a shaping TCP proxy in front of the moto server (this VM's kernel has no netem or prio
qdisc for `tc`): every request waits the profile's latency before it is forwarded and all answers
share one token bucket at its bandwidth, so each ranged GET pays a round trip and the download its
rate. On 2 vCPUs the proxy itself tops out below the latency profile's 1 GB/s. moto keeps objects
in memory and is meant for small ones, so this runs the default 98 MB model, not the synthetic
GB-sized ones: a figure about the S3 path (HEAD, concurrent ranged GETs, hash, rename, then a
local load) on a slow link, not about size.

usage: python -m bench.s3_cold_start [--rounds 3] [--profiles latency,mixed,bandwidth]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.cold_start_storage import run_ours
from bench.cold_storage import PROFILES, Profile, mounted
from bench.common import MODEL, OUT, free_port, http_ok, median, poll, spawn

BUCKET = "models"
KEY = "model.gguf"


class ShapedProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream_port`: every request chunk waits the
    profile's latency before it is forwarded, and the answers of all connections share one token
    bucket at the profile's bandwidth. (User space: this VM's kernel has no netem qdisc.)"""

    def __init__(self, upstream_port: int, profile: Profile) -> None:
        self.upstream_port = upstream_port
        self.delay_s = profile.read_delay_ms / 1000
        self.bytes_per_s = profile.mb_per_s * 1e6
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._next_free = 0.0  # when the shared link can send the next byte (loop time)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ShapedProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, self._delayed), self._pipe(up_reader, writer, self._paced)
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, shape: Any) -> None:
        try:
            while data := await src.read(1 << 16):
                await shape(len(data))
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def _delayed(self, _: int) -> None:
        await asyncio.sleep(self.delay_s)

    async def _paced(self, nbytes: int) -> None:
        now = self._loop.time()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.bytes_per_s
        if self._next_free > now:
            await asyncio.sleep(self._next_free - now)


def run_s3(endpoint: str, cache_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Ours with MODEL_URI=s3://..., its cache directory empty."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    env = {
        "S3_ENDPOINT_URL": endpoint,
        "MODEL_CACHE_DIR": str(cache_dir),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MODEL_URI": f"s3://{BUCKET}/{KEY}",  # over the bench's own MODEL_URI (a path)
    }
    return run_ours(MODEL, timeout_s, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    args = parser.parse_args()
    import boto3

    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    runs: list[dict[str, Any]] = []
    with spawn(moto), tempfile.TemporaryDirectory() as work:
        poll(lambda: http_ok(f"{endpoint}/moto-api/"), timeout_s=30, interval_s=0.05)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.upload_file(str(MODEL), BUCKET, KEY)
        for round_no in range(args.rounds):
            for name in args.profiles.split(","):
                profile = PROFILES[name]
                timeout_s = 120 + 10 * profile.transfer_seconds(MODEL.stat().st_size)
                with ShapedProxy(port, profile) as proxy:
                    shaped = f"http://127.0.0.1:{proxy.port}"
                    s3_run = run_s3(shaped, Path(work) / "cache", timeout_s)
                with mounted(MODEL, profile) as path:
                    local_run = run_ours(path, timeout_s)
                for source, result in (("s3", s3_run), ("block device", local_run)):
                    runs.append({"profile": name, "source": source, "round": round_no, **result})
                    print(
                        f"round {round_no} {name:9s} {source:12s} {result['total_s']:.3f}s",
                        file=sys.stderr,
                    )
    summary = {
        f"{name}/{source}": median(
            [r["total_s"] for r in runs if r["profile"] == name and r["source"] == source]
        )
        for name in args.profiles.split(",")
        for source in ("s3", "block device")
    }
    report = {"command": sys.argv, "model_bytes": MODEL.stat().st_size, "runs": runs}
    (OUT / "s3-cold-start.json").write_text(json.dumps({**report, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
