"""weights.safetensors: program inputs by name, with tied (shared) tensors stored once.

Loading reads the file once, straight into tensors this process owns (never a mapping of the file: editing or
truncating it afterwards changes nothing), parses the safetensors header from those bytes, and hashes the same
bytes on a thread while the caller goes on (see load_weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from safetensors.torch import save_file

from kernl.artifacts.hashing import HashThread, PieceHasher, sha256_stream, stream_checker
from kernl.errors import BundleError

if TYPE_CHECKING:
    from kernl.artifacts.reader import VerifiedBundle

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
}
DTYPES = {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Write tensors; returns aliases (name -> stored name) for tensors that are the same view of one storage."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = _view_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses shared storage; a contiguous clone of any other partial view is its own tensor.
        stored[name] = t.detach().to("cpu").contiguous().clone()
    save_file(stored, str(path))
    return aliases


def load_weights(
    bundle: VerifiedBundle, device: torch.device, *, verify: bool = True, file: str | None = None
) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """The tensors of the bundle's weights file on device, each its own allocation (Triton specialises on
    16-byte pointer alignment), tied names re-tied; and wait(), which raises BundleError unless the bytes the
    tensors came from match the manifest's sha256 (its pieces' digests, when listed).

    The file is read once; its hash runs on threads (hashlib releases the GIL) and may still be running when
    this returns, so the caller can overlap it with other work: call wait() before trusting the tensors, and do
    not write to them before (on CPU the thread hashes the tensors' own memory; on CUDA it hashes host copies,
    freed once hashed). Without verify (or when the bundle was opened without it) wait() checks nothing.
    """
    rel, aliases = _weights_entry(bundle.manifest)
    if file is not None:  # a tensor-parallel rank's file: one of the manifest's weights.ranks
        if file not in (bundle.manifest["weights"].get("ranks") or []):
            raise BundleError(f"manifest.json: {file!r} is not one of the bundle's weights files")
        rel = file
    entry = bundle.entry(rel)
    path = bundle.root / rel
    hasher = stream_checker(entry, "kernl-weights-hash") if verify and bundle.verify else None
    device = torch.device(device)
    with bundle.open(rel) as f:
        try:
            tensors = _read_tensors(f, entry["size"], device, hasher, path)
        except BundleError:
            # A file that does not parse is most likely corrupt: say so when its hash does not match.
            if hasher is not None and _sha256_from_start(f) != entry["sha256"]:
                raise bundle.mismatch(rel) from None
            raise
        except OSError as err:
            raise BundleError(f"{path}: cannot be read ({err.strerror or err})") from None
        finally:
            if hasher is not None:
                hasher.finish()
    for name, target in aliases.items():
        if target not in tensors:
            raise BundleError(f"manifest.json: weight {name!r} is tied to {target!r}, which {rel} does not hold")
        tensors[name] = tensors[target]

    def wait() -> None:
        if hasher is not None and not hasher.matches():
            raise bundle.mismatch(rel)

    return tensors, wait


def _weights_entry(manifest: dict) -> tuple[str, dict[str, str]]:
    spec = manifest.get("weights")
    rel = spec.get("file") if isinstance(spec, dict) else None
    aliases = spec.get("aliases", {}) if isinstance(spec, dict) else None
    if not isinstance(rel, str):
        raise BundleError("manifest.json: 'weights' must name the weights file")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise BundleError("manifest.json: weights 'aliases' must map names to stored names")
    return rel, aliases


def _read_tensors(
    f: BinaryIO, size: int, device: torch.device, hasher: HashThread | PieceHasher | None, path: Path
) -> dict[str, torch.Tensor]:
    """Parse the header, then read each tensor's bytes (in file order) straight into its own host tensor."""
    head = _read_exact(f, 8, path)
    header_size = int.from_bytes(head, "little")
    if header_size > min(MAX_HEADER_BYTES, size - 8):
        raise BundleError(f"{path}: not a safetensors file (header of {header_size} bytes in a {size}-byte file)")
    header = _read_exact(f, header_size, path)
    if hasher is not None:
        hasher.feed(head)
        hasher.feed(header)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, nbytes in _layout(header, size - 8 - header_size, path):
        host = torch.empty(shape, dtype=dtype)
        if nbytes:
            view = memoryview(host.reshape(-1).view(torch.uint8).numpy())
            _readinto_exact(f, view, path)
            if hasher is not None:
                hasher.feed(view)  # keeps host alive until hashed, even once copied to the device
        tensors[name] = host if device.type == "cpu" else host.to(device)
    if f.read(1):
        raise BundleError(f"{path}: changed while it was read (longer than its listed size)")
    return tensors


def _layout(header: bytes, data_size: int, path: Path) -> list[tuple[str, torch.dtype, list[int], int]]:
    """(name, dtype, shape, bytes) of every tensor in file order; the tensors must tile the data exactly."""
    try:
        entries = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(entries, dict):
        raise BundleError(f"{path}: not a safetensors file (its header is not a JSON object)")
    entries.pop("__metadata__", None)
    spans = []
    for name, info in entries.items():
        info = info if isinstance(info, dict) else {}
        dtype = DTYPES.get(info.get("dtype"))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise BundleError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which kernl does not read")
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise BundleError(f"{path}: tensor {name!r} has no valid shape and data_offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise BundleError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
        spans.append((begin, end, name, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1], s[2]))
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            raise BundleError(f"{path}: tensor {name!r} overlaps another or leaves a gap before it")
        position = end
    if position != data_size:
        raise BundleError(f"{path}: the tensors hold {position} bytes, the file {data_size}")
    return [(name, dtype, shape, end - begin) for begin, end, name, dtype, shape in spans]


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise BundleError(f"{path}: changed while it was read (shorter than its listed size)")
    return data


def _readinto_exact(f: BinaryIO, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise BundleError(f"{path}: changed while it was read (shorter than its listed size)")
        done += n


def _sha256_from_start(f: BinaryIO) -> str | None:
    try:
        f.seek(0)
        return sha256_stream(f)
    except OSError:
        return None
