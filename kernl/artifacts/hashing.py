"""File digests recorded in the manifest and checked at load."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 22


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def sha256_stream(f: BinaryIO, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


class HashThread:
    """sha256 of buffers fed in order, computed on a background thread (hashlib releases the GIL on large
    buffers), so that reading overlaps hashing and hashing can go on after the reader returns.

    Each fed buffer is kept alive, and must not be modified, until hexdigest() returns.
    """

    def __init__(self, name: str = "kernl-hash") -> None:
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
