"""Cold storage for benchmarks: a file behind a throttled network block device.

nbdkit's `file` plugin serves the model read-only on a Unix socket, through its `rate` filter
(bandwidth for the whole server) and `delay` filter (latency added to every read request);
`nbdfuse -r -o kernel_cache` exposes the export as `<mountdir>/nbd`. Every first read of a page
then costs a request over the device, as container-image blocks, EFS and S3 reads do on Lambda.

Profiles give bandwidth in MB/s (10^6 bytes) and latency per read request. The rate filter's
token bucket starts full and holds `burst_s` seconds of traffic; nbdkit's default (2 s) would let
most of a small model through unthrottled, so profiles keep it at 0.05 s.

A cold round needs the simulated file's pages out of the page cache (`kernel_cache` keeps them
across opens). `mounted()` gives a fresh mount, whose page cache and token bucket are new;
`drop_page_cache()` drops the pages of a mounted file in place (posix_fadvise DONTNEED, which FUSE
files honour); `resident_bytes()` says what is cached (util-linux `fincore`).

usage: python -m bench.cold_storage --profile latency --model X.gguf --floor
       python -m bench.cold_storage --profile bandwidth --model X.gguf --shell
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench.common import poll

TOOLS = ("nbdkit", "nbdfuse", "fusermount3")
BURST_S = 0.05
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class Profile:
    """A simulated storage link: bandwidth, latency per read request, token-bucket burst."""

    name: str
    mb_per_s: float
    read_delay_ms: float
    burst_s: float = BURST_S

    @property
    def rate_bits_per_s(self) -> int:
        """The rate filter's `rate=` (bits per second)."""
        return int(self.mb_per_s * 8e6)

    def filter_args(self) -> list[str]:
        """The rate and delay filters' parameters on nbdkit's command line."""
        return [
            f"rate={self.rate_bits_per_s}",
            f"burstiness={self.burst_s}",
            f"rdelay={self.read_delay_ms:g}ms",
        ]

    def transfer_seconds(self, nbytes: int) -> float:
        """`nbytes` at the profile's bandwidth."""
        return nbytes / (self.mb_per_s * 1e6)

    def min_seconds(self, nbytes: int) -> float:
        """Least time `nbytes` can take through the link (the bucket's burst is free)."""
        return max(0.0, self.transfer_seconds(nbytes) - self.burst_s)


PROFILES = {
    p.name: p
    for p in (
        Profile("latency", mb_per_s=1000, read_delay_ms=1),
        Profile("mixed", mb_per_s=200, read_delay_ms=2),
        Profile("bandwidth", mb_per_s=75, read_delay_ms=5),
    )
}


class Floor(NamedTuple):
    """A parallel read of a whole file: wall time and throughput."""

    seconds: float
    mb_per_s: float


def missing_tools() -> list[str]:
    """The command-line tools this module needs that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def as_profile(profile: Profile | str) -> Profile:
    """A Profile, from itself or its name."""
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    return PROFILES[profile]


def nbdkit_command(model: Path, sock: Path, pidfile: Path, profile: Profile) -> list[str]:
    """nbdkit serving `model` read-only on a Unix socket, throttled by `profile`."""
    return [
        "nbdkit",
        "--foreground",
        "--readonly",
        "--exit-with-parent",
        f"--unix={sock}",
        f"--pidfile={pidfile}",
        "--filter=rate",
        "--filter=delay",
        "file",
        f"file={model}",
        *profile.filter_args(),
    ]


def nbdfuse_command(mountdir: Path, sock: Path, pidfile: Path) -> list[str]:
    """nbdfuse exposing the export read-only as `<mountdir>/nbd`, page cache kept across opens."""
    return [
        "nbdfuse",
        "--readonly",
        "-o",
        "kernel_cache",
        f"--pidfile={pidfile}",
        str(mountdir),
        "--unix",
        str(sock),
    ]


def is_mounted(path: Path) -> bool:
    """True when `path` is a mount point in this mount namespace."""
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def log_tail(log: Path, chars: int = 2000) -> str:
    """The end of a process log, for an error message."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a helper in its own session, output to `log`, nothing on stdin."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> None:
    """Poll until `ready` exists and is non-empty; fail at once if the process exits."""

    def check() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited {proc.returncode}: {log_tail(log)}")
        return ready.is_file() and ready.stat().st_size > 0

    poll(check, READY_TIMEOUT_S, interval_s=0.005)


def wait_readable(proc: subprocess.Popen[bytes], path: Path, size: int, log: Path) -> None:
    """Poll until the simulated file has the model's size and opens for reading."""

    def check() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"nbdfuse exited {proc.returncode}: {log_tail(log)}")
        if path.stat().st_size != size:
            return False
        os.close(os.open(path, os.O_RDONLY))
        return True

    poll(check, READY_TIMEOUT_S, interval_s=0.005)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


def fusermount(mountdir: Path, *flags: str) -> bool:
    """fusermount3 -u [flags] `mountdir`; True when it unmounted."""
    cmd = ["fusermount3", "-u", *flags, str(mountdir)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def unmount(mountdir: Path, fuse: subprocess.Popen[bytes]) -> None:
    """fusermount3 -u, after which nbdfuse exits by itself. If the mount is busy (a reader still
    holds the file), detach it lazily and stop nbdfuse: its readers then get errors."""
    if is_mounted(mountdir) and not fusermount(mountdir):
        fusermount(mountdir, "-z")
        stop(fuse)
    try:
        fuse.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(fuse)
    if is_mounted(mountdir):  # nbdfuse died without unmounting
        fusermount(mountdir, "-z")


@contextmanager
def serving(model: Path, profile: Profile, workdir: Path) -> Iterator[Path]:
    """nbdkit serving `model` on `<workdir>/nbdkit.sock` until the block exits."""
    sock, log = workdir / "nbdkit.sock", workdir / "nbdkit.log"
    proc = start(nbdkit_command(model, sock, workdir / "nbdkit.pid", profile), log)
    try:
        wait_ready(proc, workdir / "nbdkit.pid", log)
        yield sock
    finally:
        stop(proc)


@contextmanager
def fuse_mount(sock: Path, size: int, workdir: Path) -> Iterator[Path]:
    """nbdfuse mounted on `<workdir>/mnt` until the block exits; yields the simulated file."""
    mountdir, log = workdir / "mnt", workdir / "nbdfuse.log"
    mountdir.mkdir()
    proc = start(nbdfuse_command(mountdir, sock, workdir / "nbdfuse.pid"), log)
    try:
        wait_ready(proc, workdir / "nbdfuse.pid", log)
        wait_readable(proc, mountdir / "nbd", size, log)
        yield mountdir / "nbd"
    finally:
        unmount(mountdir, proc)


@contextmanager
def mounted(model: Path, profile: Profile | str = "latency") -> Iterator[Path]:
    """`model` behind a throttled block device, as a read-only file with a cold page cache.

    Starts nbdkit and nbdfuse, waits until the file is readable, and always unmounts and stops
    both on exit (errors included). The mount point and its socket live in a fresh temporary
    directory that is removed afterwards.
    """
    model = Path(model).resolve()
    if not model.is_file():
        raise FileNotFoundError(f"no model file at {model}")
    chosen = as_profile(profile)
    if missing := missing_tools():
        raise RuntimeError(f"missing {', '.join(missing)}: run `make cold-storage-deps`")
    workdir = Path(tempfile.mkdtemp(prefix="coldstart-nbd-"))
    try:
        with (
            serving(model, chosen, workdir) as sock,
            fuse_mount(sock, model.stat().st_size, workdir) as path,
        ):
            drop_page_cache(path)
            yield path
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def drop_page_cache(path: Path) -> None:
    """Drop a file's cached pages (pages still mapped by a live process stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """How much of the file is in the page cache (util-linux fincore)."""
    cmd = ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[0])


def read_range(fd: int, start_at: int, end: int, block: int) -> int:
    """pread [start_at, end) in `block`-sized pieces into one buffer; bytes read."""
    buf = bytearray(block)
    view = memoryview(buf)
    offset = start_at
    while offset < end:
        n = os.preadv(fd, [view[: min(block, end - offset)]], offset)
        if n == 0:
            raise OSError(f"short read at {offset}")
        offset += n
    return offset - start_at


def parallel_read(path: Path, readers: int = 16, block: int = READ_BLOCK) -> Floor:
    """Read the whole file with `readers` threads over disjoint ranges: the storage floor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        bounds = [size * i // readers for i in range(readers + 1)]
        started = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            pieces = pool.map(
                read_range, [fd] * readers, bounds[:-1], bounds[1:], [block] * readers
            )
            total = sum(pieces)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return Floor(seconds, total / seconds / 1e6)


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The named profile, with any bandwidth or latency override."""
    base = PROFILES[args.profile]
    return Profile(
        base.name,
        mb_per_s=args.mb_per_s or base.mb_per_s,
        read_delay_ms=base.read_delay_ms if args.delay_ms is None else args.delay_ms,
    )


def print_floor(path: Path, profile: Profile, readers: int, rounds: int) -> None:
    """Measure and print the parallel-read floor, the page cache dropped before each round."""
    size = path.stat().st_size
    print(f"profile {profile.name}: {profile.mb_per_s:g} MB/s, {profile.read_delay_ms:g} ms/read")
    print(f"size / bandwidth: {profile.transfer_seconds(size):.3f}s ({size / 1e6:.0f} MB)")
    for _ in range(rounds):
        drop_page_cache(path)
        floor = parallel_read(path, readers)
        print(f"parallel read, {readers} readers: {floor.seconds:.3f}s {floor.mb_per_s:.0f} MB/s")


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--profile", choices=PROFILES, default="latency")
    parser.add_argument("--mb-per-s", type=float, help="override the profile's bandwidth")
    parser.add_argument("--delay-ms", type=float, help="override the profile's latency per read")
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--floor", action="store_true", help="print the parallel-read floor")
    mode.add_argument("--shell", action="store_true", help="mount and wait for Ctrl-C")
    args = parser.parse_args(argv)
    profile = profile_from_args(args)
    with mounted(args.model, profile) as path:
        if args.floor:
            print_floor(path, profile, args.readers, args.rounds)
            return
        link = f"{profile.mb_per_s:g} MB/s, {profile.read_delay_ms:g} ms/read"
        print(f"{path}  ({profile.name}: {link})")
        print("Ctrl-C unmounts and stops nbdkit and nbdfuse", file=sys.stderr)
        wait_for_signal()


if __name__ == "__main__":
    main()
