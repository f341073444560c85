"""Read a model file into the page cache at the storage's speed, in the order the first forward
pass needs its tensors, never more than memory allows.

On Lambda the weights come over the network (image blocks, EFS, S3-backed caches) and every
first read of a block is a round trip. An mmap that waits for one page fault at a time is bound
by that latency, not by bandwidth; many readers in flight fill the bandwidth instead. So from the
first instant of init, `Prefetch` runs READERS threads that `pread` the file in chunks: the GGUF
header, then block 0, 1, ... in layer order, then the output head, the token embedding last (the
first pass needs only the prompt's rows of it). The
model load (an mmap) and the first forward pass then find the pages in memory, and a forward pass
that overtakes the readers waits only for what it needs next.

The budget is what memory allows (cgroup limit or MemAvailable, minus a reserve for the KV cache,
buffers and Python): a model larger than that is read only up to it and served by mmap beyond,
so the page cache never thrashes. `resident_bytes` reports how much of the file is in memory.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from handler.environment import DEFAULT_MODEL_PATH, path_of_uri

if TYPE_CHECKING:
    from handler.config import Settings

log = logging.getLogger("coldstart.prefetch")

CHUNK_BYTES = 4 << 20
RESIDENT_ENOUGH = 0.9  # at least this share in the page cache: nothing worth prefetching
DEFAULT_READERS = 16
DEFAULT_RESERVE_BYTES = 512 << 20

# GGUF metadata value types (gguf.md): their sizes, or None for string (8) and array (9).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_BLOCK = re.compile(r"blk\.(\d+)\.")


class GGUFLayoutError(ValueError):
    """The file's GGUF header cannot be parsed."""


@dataclass(frozen=True)
class TensorExtent:
    """Where one tensor's bytes lie in the file."""

    name: str
    offset: int  # absolute, in the file
    size: int


def tensor_extents(path: Path) -> tuple[int, list[TensorExtent]]:
    """(end of the header, the tensors in file order) from the GGUF header alone.

    A tensor's size is the distance to the next tensor's data (the last one runs to the end of
    the file), so no table of quantisation block sizes is needed.
    """
    with path.open("rb") as f:
        reader = _Reader(f)
        if reader.take(4) != b"GGUF":
            raise GGUFLayoutError(f"{path}: not a GGUF file")
        version = reader.u32()
        if version not in (2, 3):
            raise GGUFLayoutError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = reader.u64(), reader.u64()
        alignment = 32
        for _ in range(n_kv):
            key = reader.string()
            value_type = reader.u32()
            if key == "general.alignment" and value_type == 4:
                alignment = reader.u32()
            else:
                reader.skip_value(value_type)
        infos: list[tuple[str, int]] = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.u32()
            reader.take(8 * n_dims + 4)  # dims, type
            infos.append((name, reader.u64()))
        header_end = reader.position
    data_start = -(-header_end // alignment) * alignment
    size = path.stat().st_size
    ordered = sorted(infos, key=lambda info: info[1])
    extents = []
    for i, (name, relative) in enumerate(ordered):
        start = data_start + relative
        end = data_start + ordered[i + 1][1] if i + 1 < len(ordered) else size
        extents.append(TensorExtent(name, start, max(0, end - start)))
    return data_start, extents


def need_order(extents: list[TensorExtent]) -> list[TensorExtent]:
    """Tensors in the order the first forward pass needs them whole: the blocks by layer, then
    the rest (output norm and head), the token embedding last.

    The first pass reads only the embedding rows of the prompt's tokens (a few pages, faulted in
    on demand); the whole table is needed only as the output head of a model that ties the two,
    which is read last anyway. Reading it first cost a tenth of the file's time up front.
    """

    def rank(extent: TensorExtent) -> tuple[int, int, int]:
        block = _BLOCK.match(extent.name)
        if block:
            return (0, int(block.group(1)), extent.offset)
        if extent.name.startswith("token_embd"):
            return (2, 0, extent.offset)
        return (1, 0, extent.offset)

    return sorted(extents, key=rank)


def read_plan(
    path: Path, budget_bytes: int, chunk_bytes: int = CHUNK_BYTES
) -> list[tuple[int, int]]:
    """(offset, length) chunks to read, in order of need, at most `budget_bytes` in all.

    A file whose header cannot be parsed is read front to back (still in parallel).
    """
    size = path.stat().st_size
    try:
        header_end, extents = tensor_extents(path)
        spans = [(0, header_end)] + [(e.offset, e.size) for e in need_order(extents)]
    except (GGUFLayoutError, struct.error, OSError, UnicodeDecodeError):
        spans = [(0, size)]
    plan: list[tuple[int, int]] = []
    left = budget_bytes
    for offset, length in spans:
        for start in range(offset, offset + length, chunk_bytes):
            n = min(chunk_bytes, offset + length - start, left)
            if n <= 0:
                return plan
            plan.append((start, n))
            left -= n
    return plan


def memory_budget(reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """Bytes the page cache may take for the model: free memory minus `reserve_bytes`."""
    free = _cgroup_free_bytes()
    available = _meminfo_available_bytes()
    candidates = [v for v in (free, available) if v is not None]
    if not candidates:
        return 1 << 62
    return max(0, min(candidates) - reserve_bytes)


class Prefetch:
    """Background readers for one file; `bytes_read`, `done` and `wait()` report progress."""

    def __init__(
        self,
        path: Path,
        readers: int = DEFAULT_READERS,
        budget_bytes: int | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.path = path
        self.readers = max(1, readers)
        self.budget_bytes = memory_budget(reserve_bytes) if budget_bytes is None else budget_bytes
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self.planned_bytes = 0
        self.error: str | None = None
        self.started_at = 0.0
        self.elapsed_s: float | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> Prefetch:
        """Begin reading in the background; returns self."""
        self.started_at = time.perf_counter()
        threading.Thread(target=self._run, name="coldstart-prefetch", daemon=True).start()
        return self

    @property
    def done(self) -> bool:
        """Whether every planned chunk was read (or the prefetch gave up)."""
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until done or `timeout_s`; whether it is done."""
        return self._done.wait(timeout_s)

    def stop(self) -> None:
        """Ask the readers to stop after their current chunk."""
        self._stop.set()

    def status(self) -> dict[str, object]:
        """JSON-ready progress."""
        return {
            "bytes_read": self.bytes_read,
            "bytes_planned": self.planned_bytes,
            "done": self.done,
            **({"seconds": round(self.elapsed_s, 3)} if self.elapsed_s is not None else {}),
            **({"error": self.error} if self.error else {}),
        }

    def _run(self) -> None:
        try:
            plan = read_plan(self.path, self.budget_bytes, self.chunk_bytes)
            self.planned_bytes = sum(n for _, n in plan)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                chunks = iter(plan)
                threads = [
                    threading.Thread(target=self._read, args=(fd, chunks), daemon=True)
                    for _ in range(min(self.readers, max(1, len(plan))))
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            log.warning("prefetch stopped: %s", self.error)
        finally:
            self.elapsed_s = time.perf_counter() - self.started_at
            self._done.set()

    def _read(self, fd: int, chunks: Iterator[tuple[int, int]]) -> None:
        buffer = bytearray(self.chunk_bytes)
        view = memoryview(buffer)
        while not self._stop.is_set():
            with self._lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            offset, length = chunk
            got = os.preadv(fd, [view[:length]], offset)  # releases the GIL while it waits
            with self._lock:
                self.bytes_read += got


def start(
    path: Path, readers: int = DEFAULT_READERS, reserve_bytes: int = DEFAULT_RESERVE_BYTES
) -> Prefetch | None:
    """A running prefetch of `path`, or None when the file is missing or mostly in memory
    already (then reading it again would only take CPU from the load)."""
    try:
        resident, size = resident_bytes(path)
    except OSError:
        return None
    if size == 0 or resident >= size * RESIDENT_ENOUGH:
        return None
    return Prefetch(path, readers, memory_budget(reserve_bytes)).start()


def start_for(settings: Settings) -> Prefetch | None:
    """The read-ahead Settings ask for: a local model with PREFETCH=auto (None for `s3://`,
    whose download reads the file anyway, and for a path the model source will reject)."""
    if settings.prefetch != "auto" or settings.model_uri.startswith("s3://"):
        return None
    from handler.model_source.local_file import local_path
    from handler.model_source.resolved import ModelSourceError

    try:
        path = local_path(settings.model_uri)
    except ModelSourceError:
        return None  # the model source reports it, with the path
    return start(path, settings.prefetch_readers, settings.prefetch_reserve_mb << 20)


def start_at_init(settings: Settings) -> Prefetch | None:
    """The read-ahead init starts: `start_for`, except with INFERENCE_ENGINE=llama-server.

    That engine starts its own once llama-server answers HTTP (the model load begins): before,
    the child's executable and CUDA libraries and our own imports come from the same storage,
    and sixteen readers at its full speed made our start to the spawn 1.28 s instead of 0.21 s
    on the H200 machine (bench/p6_gpu_cold.py, page cache dropped).
    """
    if settings.inference_engine == "llama-server":
        return None
    return start_for(settings)


def start_early(environ: Mapping[str, str]) -> Prefetch | None:
    """The prefetch of MODEL_URI, started before Settings exist (at the first instant of init).

    Only local files and only with PREFETCH=auto (the default); anything unusual here (a bad
    number, an s3:// URI) just means no early prefetch: Settings validate the same variables
    right after and report what is wrong. Once per process: the command line starts it, and the
    handler module that awslambdaric imports later gets the same one.
    """
    if _EARLY:
        return _EARLY[0]
    if environ.get("PREFETCH", "auto").strip().lower() == "off":
        return None
    if environ.get("INFERENCE_ENGINE", "").strip() == "llama-server":
        return None  # its engine starts the read-ahead once the child is up (`start_at_init`)
    path = path_of_uri(environ.get("MODEL_URI", "").strip() or DEFAULT_MODEL_PATH)
    if path is None:
        return None  # s3:// and the like: downloaded first
    try:
        readers = int(environ.get("PREFETCH_READERS", DEFAULT_READERS))
        reserve = int(environ.get("PREFETCH_RESERVE_MB", DEFAULT_RESERVE_BYTES >> 20)) << 20
    except ValueError:
        return None
    prefetch = start(path, max(1, readers), max(0, reserve))
    if prefetch is not None:
        _EARLY.append(prefetch)
    return prefetch


_EARLY: list[Prefetch] = []


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the file in the page cache, file size), by mincore(2) over a fresh mapping.

    Mapping a file reads nothing; mincore only looks at the page cache.
    """
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"{path}: mmap failed")
        try:
            pages = -(-size // mmap.PAGESIZE)
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"{path}: mincore failed")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    resident = len(bytes(vector).translate(None, _NOT_RESIDENT))  # pages whose bit 0 is set
    return min(size, resident * mmap.PAGESIZE), size


_NOT_RESIDENT = bytes(range(0, 256, 2))  # mincore flags with bit 0 clear
_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC.append(libc)
    return _LIBC[0]


def _cgroup_free_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - used)


def _meminfo_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Reader:
    """Little-endian reads from the header, counting the position."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.position = 0

    def take(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise GGUFLayoutError("header truncated")
        self.position += n
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8")

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            self.take(self.u64())
        elif value_type == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALAR_SIZES:
                self._skip(_SCALAR_SIZES[item_type] * count)
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[value_type])
        else:
            raise GGUFLayoutError(f"unknown metadata type {value_type}")

    def _skip(self, n: int) -> None:
        self._f.seek(n, os.SEEK_CUR)
        self.position += n
