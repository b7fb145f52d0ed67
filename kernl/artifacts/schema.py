"""The manifest's one declared schema, and the checks derived from it once, at import.

MANIFEST_SCHEMA is JSON Schema (draft 2020-12), written with a small subset of its keywords. The runtime cannot
depend on the jsonschema package (it needs compiled extensions the GPU machines do not have), so this module
turns the schema into plain Python checks when it is imported; a keyword outside the subset is refused then,
so no part of the schema is silently ignored. The tests check the schema against jsonschema itself where it is
installed: both must accept and refuse the same manifests.

The checks cover types, ranges and shapes: what the runtime reads from a manifest is what this schema allows.
Relations between entries (an input named by the program has a spec, a named file is listed) are checked by
manifest.validate after the schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kernl.errors import BundleError

MAX_FILES = 100_000
MAX_NAMES = 1_000_000  # weights, inputs, outputs: far more than any model has
_INT = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": 2**62}
_NAME = {"type": "string", "minLength": 1, "maxLength": 512}
_IDENTIFIER = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"}
_PATH = {"type": "string", "format": "bundle-path"}
_SHORT = {"type": "string", "maxLength": 4096}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# dtypes a call may carry and a program may take; the model's own (its float dtype) is one of the floats.
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
INPUT_DTYPES = ["int64", "int32", "int16", "int8", "uint8", "bool", *FLOAT_DTYPES]

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kernl bundle manifest, format 2",
    "type": "object",
    "required": ["format_version", "versions", "target", "dtype", "inputs", "outputs", "buckets", "program", "files"],
    "properties": {
        "format_version": {"const": 2},
        "model": _SHORT,
        "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"], "maxLength": 256}},
        "target": {
            "type": "object",
            "required": ["device"],
            "properties": {
                "device": {"enum": ["cpu", "cuda"]},
                "gpu": _SHORT,
                "capability": {"type": "string", "pattern": "^[0-9]{1,3}\\.[0-9]{1,3}$"},
            },
        },
        "dtype": {"enum": FLOAT_DTYPES},
        "export_mode": _SHORT,
        "inputs": {
            "type": "array",
            "maxItems": 1024,  # none in a generation bundle: its entries list their own
            "items": {
                "type": "object",
                "required": ["name", "dtype", "fill", "rank"],
                "properties": {
                    "name": _IDENTIFIER,
                    "dtype": {"enum": INPUT_DTYPES},
                    "fill": {"enum": ["required", "ones", "zeros"]},
                    "rank": {"type": "integer", "minimum": 1, "maximum": 8},
                    # Values of this input index a table of this many rows (token ids: the vocabulary size);
                    # a call holding a value outside [0, limit) is refused before it runs.
                    "limit": _POSITIVE,
                    # A fixed-shape input (log-mel features): ["batch", size, ...]; only the batch follows the call.
                    "dims": {
                        "type": "array",
                        "minItems": 2,
                        "maxItems": 8,
                        "items": {"anyOf": [{"const": "batch"}, {"type": "integer", "minimum": 1, "maximum": 1 << 24}]},
                    },
                },
            },
        },
        "outputs": {
            "type": "array",
            "maxItems": 1024,
            "items": {
                "type": "object",
                "required": ["name", "dims"],
                "properties": {
                    "name": _NAME,
                    # "batch" and "seq" follow the call's shape; an integer is a fixed size.
                    "dims": {
                        "type": "array",
                        "maxItems": 8,
                        "items": {"anyOf": [{"type": "string", "maxLength": 64}, _INT]},
                    },
                },
            },
        },
        "buckets": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4096,
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
            },
        },
        "program": {
            "type": "object",
            "required": ["file", "weights", "inputs"],
            "properties": {
                "file": _PATH,
                "view": _PATH,
                "weights": {"type": "array", "maxItems": MAX_NAMES, "uniqueItems": True, "items": _NAME},
                "inputs": {"type": "array", "maxItems": 1024, "uniqueItems": True, "items": _IDENTIFIER},
                # The shape and dtype the program was compiled for, one per weight in order; kernl.load checks the
                # weights file against them before anything runs.
                "weight_specs": {
                    "type": "array",
                    "maxItems": MAX_NAMES,
                    "items": {
                        "type": "object",
                        "required": ["shape", "dtype"],
                        "properties": {
                            "shape": {"type": "array", "maxItems": 8, "items": _INT},
                            "dtype": {"type": "string", "maxLength": 64},
                        },
                    },
                },
                "state": {
                    "type": "array",
                    "maxItems": 4096,
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "dtype"],
                        "properties": {
                            "name": _NAME,
                            "shape": {"type": "array", "maxItems": 8, "items": _INT},
                            "dtype": {"type": "string", "maxLength": 64},
                        },
                    },
                },
            },
        },
        "weights": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": _PATH,
                "aliases": {"type": "object", "maxProperties": MAX_NAMES, "additionalProperties": _NAME},
                # A tensor-parallel bundle's weights file of each rank, in rank order ("file" is rank 0's).
                "ranks": {"type": "array", "minItems": 2, "maxItems": 1024, "items": _PATH},
            },
        },
        # How a tensor-parallel bundle's weights were split (kernl.compiler.shard.ShardPlan.describe).
        "tensor_parallel": {
            "type": "object",
            "required": ["world_size"],
            "properties": {
                "world_size": {"type": "integer", "minimum": 2, "maximum": 1024},
                "backend": {"enum": ["nccl", "gloo"]},
                "split": {"type": "object", "maxProperties": MAX_NAMES},
                "scaled": {"type": "array", "maxItems": MAX_NAMES, "items": _NAME},
                # Embedding / LM head tables split by vocabulary (kernl.compiler.shard_vocab), the size threshold
                # that decided it, and each rank's first-row weight ("offsets": name -> rows per rank).
                "vocab_parallel": {
                    "type": "object",
                    "properties": {
                        "min_bytes": {"type": "integer", "minimum": 0},
                        "embedding": {"type": "array", "maxItems": MAX_NAMES, "items": _NAME},
                        "lm_head": {"type": "array", "maxItems": MAX_NAMES, "items": _NAME},
                        "offsets": {"type": "object", "maxProperties": MAX_NAMES},
                    },
                },
            },
        },
        "rewrites": {"type": "object"},
        "sentence_transformers": {
            "type": "object",
            "properties": {
                "pooling": {"type": "array", "items": _SHORT},
                "normalize": {"type": "boolean"},
                "max_seq_length": {"anyOf": [_POSITIVE, {"type": "null"}]},
                "skipped": {"type": "array", "items": _SHORT},
            },
        },
        "checks": {"type": ["array", "object", "null"]},
        "kernels": {
            "type": "object",
            "properties": {"triton": _INT, "autotune": {"anyOf": [_PATH, {"type": "null"}]}},
        },
        "build_seconds": {"type": "object", "additionalProperties": {"type": "number"}},
        "files": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_FILES,
            "propertyNames": _PATH,
            "additionalProperties": {
                "type": "object",
                "errorMessage": "needs a size in bytes and a sha256 in hex (and for large files, valid pieces)",
                "required": ["size", "sha256"],
                "properties": {
                    "size": _INT,
                    "sha256": _SHA256,
                    # large files: the sha256 of each piece of `bytes` (the last one shorter), checked in parallel
                    "pieces": {
                        "type": "object",
                        "required": ["bytes", "sha256"],
                        "properties": {
                            "bytes": {"type": "integer", "minimum": 1 << 20, "maximum": 1 << 34},
                            "sha256": {"type": "array", "minItems": 2, "maxItems": 1 << 20, "items": _SHA256},
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "signature": {"type": "object"},
        # Text generation (kernl.runtime.generation reads it): the KV cache's length, the decode and prompt buckets.
        "generation": {
            "type": "object",
            "required": ["max_length", "batch_sizes", "seq_lens", "vocab_size"],
            "properties": {
                "max_length": _POSITIVE,
                "batch_sizes": {"type": "array", "minItems": 1, "maxItems": 4096, "items": _POSITIVE},
                "seq_lens": {"type": "array", "minItems": 1, "maxItems": 4096, "items": _POSITIVE},
                "vocab_size": _POSITIVE,
                "eos_token_id": {"anyOf": [_INT, {"type": "null"}, {"type": "array", "maxItems": 64, "items": _INT}]},
                "pad_token_id": {"anyOf": [_INT, {"type": "null"}]},
                "bos_token_id": {"anyOf": [_INT, {"type": "null"}]},
                "cache": {"type": "object"},
            },
        },
        # Encoder-decoder generation (kernl.runtime.seq2seq reads it): encoder buckets, decode rows, prefix.
        "seq2seq": {
            "type": "object",
            "required": ["kind", "max_length", "batch_sizes", "seq_lens", "num_beams", "vocab_size", "enc_len"]
            + ["decoder_prefix"],
            "properties": {
                "kind": {"enum": ["text", "speech"]},
                "max_length": _POSITIVE,
                "batch_sizes": {"type": "array", "minItems": 1, "maxItems": 4096, "items": _POSITIVE},
                "seq_lens": {"type": "array", "minItems": 1, "maxItems": 4096, "items": _POSITIVE},
                "num_beams": _POSITIVE,
                "vocab_size": _POSITIVE,
                "enc_len": _POSITIVE,
                "decoder_prefix": {"type": "array", "minItems": 1, "maxItems": 64, "items": _INT},
                "eos_token_id": {"anyOf": [_INT, {"type": "null"}, {"type": "array", "maxItems": 64, "items": _INT}]},
                "pad_token_id": {"anyOf": [_INT, {"type": "null"}]},
                "cache": {"type": "object"},
                # Speech: log-mel settings and the mel filter bank [1 + n_fft // 2, mels], sparse (flat index, value).
                "audio": {
                    "type": "object",
                    "required": ["config", "mel_filters"],
                    "properties": {
                        "config": {
                            "type": "object",
                            "required": ["feature_size", "sampling_rate", "n_fft", "hop_length", "n_samples"],
                            "properties": {
                                k: _POSITIVE for k in ("feature_size", "sampling_rate", "n_fft", "hop_length")
                            }
                            | {"n_samples": _POSITIVE, "padding_value": {"type": "number"}},
                        },
                        "mel_filters": {
                            "type": "object",
                            "required": ["shape", "index", "values"],
                            "properties": {
                                "shape": {"type": "array", "minItems": 2, "maxItems": 2, "items": _POSITIVE},
                                "index": {"type": "array", "maxItems": 1 << 20, "items": _INT},
                                "values": {"type": "array", "maxItems": 1 << 20, "items": {"type": "number"}},
                            },
                        },
                    },
                },
            },
        },
        # Entries the compile command adds (kernl.compile(metadata=...)); read by kernl run and kernl bench.
        "task": _SHORT,
        "source": _SHORT,
        "max_positions": {"anyOf": [_POSITIVE, {"type": "null"}]},
        "vocab_size": _POSITIVE,
        "id2label": {"type": "object", "additionalProperties": _SHORT},
    },
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# errorMessage (as in ajv-errors; other validators ignore it): what a failing object is told it needs.
_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "errorMessage"}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int,  # JSON's 1.0 is a float here: kernl writes sizes as integers
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


class Invalid(Exception):
    """A value that does not fit the schema: where (a path like inputs[0].dtype) and why."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where or '(top)'}: {problem}")
        self.where, self.problem = where, problem


def check_path(rel: Any, where: str = "files") -> str:
    """A listed path must name a file inside the bundle: relative, '/'-separated, no '.', '..' or empty parts,
    no backslash (a separator elsewhere) and no control characters; manifest.json itself is never listed."""
    ok = (
        isinstance(rel, str)
        and 0 < len(rel) <= 1024
        and not rel.startswith("/")
        and "\\" not in rel
        and not _CONTROL.search(rel)
        and not _SURROGATE.search(rel)
        and all(part not in ("", ".", "..") for part in rel.split("/"))
        and rel != "manifest.json"
    )
    if not ok:
        raise Invalid(where, f"listed path {rel!r} does not name a file inside the bundle")
    return rel


_FORMATS: dict[str, Callable[[Any, str], Any]] = {"bundle-path": check_path}


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{where}[{key!r}]"
    return f"{where}.{key}" if where else key


def compile_schema(schema: dict[str, Any]) -> Callable[[Any, str], None]:
    """A function check(value, where) raising Invalid when value does not fit schema. Built once per schema."""
    unknown = set(schema) - _ANNOTATIONS - set(_KEYWORDS)
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} are not in kernl's subset")
    checks = [_KEYWORDS[k](schema[k], schema) for k in schema if k in _KEYWORDS]
    checks = [c for c in checks if c is not None]
    message = schema.get("errorMessage")

    def check(value: Any, where: str) -> None:
        try:
            for c in checks:
                c(value, where)
        except Invalid:
            if message is None:
                raise
            raise Invalid(where, message) from None

    return check


def _type(types: str | list[str], schema: dict) -> Callable:
    names = [types] if isinstance(types, str) else list(types)
    tests = [_TYPES[t] for t in names]

    def check(value, where):
        if not any(t(value) for t in tests):
            raise Invalid(where, f"expected {' or '.join(names)}, got {_kind(value)}")

    return check


def _enum(options: list, schema: dict) -> Callable:
    def check(value, where):
        if not any(type(value) is type(o) and value == o for o in options):
            raise Invalid(where, f"expected one of {', '.join(map(repr, options))}, got {_short(value)}")

    return check


def _const(const, schema: dict) -> Callable:
    return _enum([const], schema)


def _pattern(pattern: str, schema: dict) -> Callable:
    regex = re.compile(pattern)

    def check(value, where):
        if isinstance(value, str) and not regex.search(value):
            raise Invalid(where, f"{_short(value)} does not match {pattern}")

    return check


def _bound(kind: str, keyword: str, limit: int | float) -> Callable:
    low = keyword.startswith("min")
    if kind == "num":

        def check_number(value, where):
            if type(value) in (int, float) and (value < limit if low else value > limit):
                raise Invalid(where, f"{_short(value)} is {'below' if low else 'above'} {limit}")

        return check_number
    container = {"str": str, "list": list, "dict": dict}[kind]
    what = {"str": "characters", "list": "items", "dict": "entries"}[kind]

    def check_size(value, where):
        if isinstance(value, container) and (len(value) < limit if low else len(value) > limit):
            raise Invalid(where, f"has {len(value)} {what}, {'at least' if low else 'at most'} {limit} allowed")

    return check_size


def _bounds(kind: str, keyword: str) -> Callable:
    return lambda limit, schema: _bound(kind, keyword, limit)


def _items(items: dict, schema: dict) -> Callable:
    item = compile_schema(items)

    def check(value, where):
        if isinstance(value, list):
            for i, v in enumerate(value):
                item(v, _join(where, i))

    return check


def _unique(flag: bool, schema: dict) -> Callable | None:
    if not flag:
        return None

    def check(value, where):
        if isinstance(value, list):
            seen = set()
            for v in value:
                key = repr(v) if isinstance(v, (list, dict)) else (type(v) is bool, v)
                if key in seen:
                    raise Invalid(where, f"{_short(v)} appears twice")
                seen.add(key)

    return check


def _properties(properties: dict, schema: dict) -> Callable:
    compiled = {k: compile_schema(s) for k, s in properties.items()}

    def check(value, where):
        if isinstance(value, dict):
            for k, c in compiled.items():
                if k in value:
                    c(value[k], _join(where, k))

    return check


def _required(names: list[str], schema: dict) -> Callable:
    def check(value, where):
        if isinstance(value, dict):
            missing = [n for n in names if n not in value]
            if missing:
                raise Invalid(where, f"missing {', '.join(missing)}")

    return check


def _additional(extra: bool | dict, schema: dict) -> Callable | None:
    known = set(schema.get("properties", {}))
    if extra is True:
        return None
    item = compile_schema(extra) if isinstance(extra, dict) else None

    def check(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in known:
                    continue
                if item is None:
                    raise Invalid(where, f"unexpected entry {_short(k)}")
                item(v, _join(where, k))

    return check


def _property_names(names: dict, schema: dict) -> Callable:
    name = compile_schema(names)

    def check(value, where):
        if isinstance(value, dict):
            for k in value:
                name(k, where)

    return check


def _any_of(options: list[dict], schema: dict) -> Callable:
    compiled = [compile_schema(s) for s in options]

    def check(value, where):
        problems = []
        for c in compiled:
            try:
                c(value, where)
                return
            except Invalid as err:
                problems.append(err.problem)
        raise Invalid(where, " or ".join(problems))

    return check


def _format(name: str, schema: dict) -> Callable:
    test = _FORMATS[name]

    def check(value, where):
        if isinstance(value, str):
            test(value, where)

    return check


_KEYWORDS: dict[str, Callable[[Any, dict], Callable | None]] = {
    "type": _type,
    "enum": _enum,
    "const": _const,
    "pattern": _pattern,
    "format": _format,
    "minLength": _bounds("str", "minLength"),
    "maxLength": _bounds("str", "maxLength"),
    "minimum": _bounds("num", "minimum"),
    "maximum": _bounds("num", "maximum"),
    "minItems": _bounds("list", "minItems"),
    "maxItems": _bounds("list", "maxItems"),
    "minProperties": _bounds("dict", "minProperties"),
    "maxProperties": _bounds("dict", "maxProperties"),
    "items": _items,
    "uniqueItems": _unique,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional,
    "propertyNames": _property_names,
    "anyOf": _any_of,
}


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_check_manifest = compile_schema(MANIFEST_SCHEMA)


def check_manifest(manifest: Any) -> None:
    """Raise BundleError ("manifest.json: <where>: <what>") unless manifest fits MANIFEST_SCHEMA."""
    try:
        _check_manifest(manifest, "")
        _check_text(manifest, "")
    except Invalid as err:
        raise BundleError(f"manifest.json: {err}") from None


def _check_text(value: Any, where: str) -> None:
    """JSON's \\u escapes can spell lone surrogates, which no file name or message can encode: refused anywhere."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise Invalid(where, "a string with a lone surrogate (not valid Unicode)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, _join(where, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, _join(where, i))
