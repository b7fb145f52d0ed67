"""File digests recorded in the manifest and checked at load.

Every file has one sha256. A large file also has the sha256 of each of its pieces (PIECE bytes, the last one
shorter): one sha256 is sequential (about 1.5 GB/s), while pieces are hashed on several threads as the file is
read, so checking a multi-GB weights file costs about the read. The manifest (signed when signing is used)
pins both; the loader checks the pieces when they are listed and the whole-file digest otherwise.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 22
PIECE = 1 << 26  # 64 MiB: a few dozen pieces for a multi-GB file, each worth a thread's start
HASH_THREADS = max(1, min(8, (os.cpu_count() or 1) - 1))


def sha256_stream(f: BinaryIO, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, piece: int | None = None) -> dict[str, Any]:
    """A file's manifest entry: size, sha256, and, over one piece, the sha256 of every piece (one read)."""
    piece = piece or PIECE
    whole, pieces, current, filled = hashlib.sha256(), [], hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(min(CHUNK, piece - filled)):
            whole.update(block)
            current.update(block)
            filled += len(block)
            if filled == piece:
                pieces.append(current.hexdigest())
                current, filled = hashlib.sha256(), 0
        size = f.tell()
    entry: dict[str, Any] = {"size": size, "sha256": whole.hexdigest()}
    if size > piece:
        if filled:
            pieces.append(current.hexdigest())
        entry["pieces"] = {"bytes": piece, "sha256": pieces}
    return entry


def stream_checker(entry: dict[str, Any], name: str) -> HashThread | PieceHasher:
    """What checks a file read in order against its manifest entry: its pieces in parallel when listed."""
    pieces = entry.get("pieces")
    if pieces is not None:
        return PieceHasher(pieces["bytes"], pieces["sha256"], name)
    return HashThread(name, expected=entry["sha256"])


class HashThread:
    """sha256 of buffers fed in order, computed on a background thread (hashlib releases the GIL on large
    buffers), so that reading overlaps hashing and hashing can go on after the reader returns.

    Each fed buffer is kept alive, and must not be modified, until hexdigest() returns.
    """

    def __init__(self, name: str = "kernl-hash", expected: str | None = None) -> None:
        self.expected = expected
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._digest.update(data)

    def feed(self, data) -> None:
        """Queue a bytes-like object (bytes, bytearray, a C-contiguous memoryview) for hashing."""
        self._queue.put(data)

    def finish(self) -> None:
        """No more data; idempotent, and safe to call from an error path to let the thread end."""
        self._queue.put(None)

    def hexdigest(self) -> str:
        """Waits for every fed buffer to be hashed (call finish() first)."""
        self._thread.join()
        return self._digest.hexdigest()

    def matches(self) -> bool:
        """Waits for the hash; whether it is the expected one."""
        return self.hexdigest() == self.expected


class PieceHasher:
    """Buffers fed in file order, cut into pieces of piece_bytes, each piece hashed on a pool thread as soon as
    it is complete; matches() says whether every piece's sha256 is the listed one (and the length agrees).

    Each fed buffer is kept alive, and must not be modified, until matches() returns.
    """

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, piece_bytes: int, expected: list[str], name: str = "kernl-hash") -> None:
        self.piece_bytes, self.expected = piece_bytes, list(expected)
        self._parts: list[memoryview] = []
        self._filled = 0
        self._futures: list[Future] = []
        self._finished = False
        with PieceHasher._pool_lock:
            if PieceHasher._pool is None:
                PieceHasher._pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix=name)

    def feed(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.piece_bytes - self._filled)
            self._parts.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_bytes:
                self._submit()

    def _submit(self) -> None:
        parts, self._parts, self._filled = self._parts, [], 0
        self._futures.append(PieceHasher._pool.submit(_sha256_parts, parts))

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._parts:
                self._submit()

    def matches(self) -> bool:
        self.finish()
        digests = [f.result() for f in self._futures]
        return digests == self.expected


def _sha256_parts(parts: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()
