"""A bundle's manifest in words and small tables, shared by `kernl-compile`'s summary and `kernl inspect`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fields(rows: Sequence[tuple[str, Any]]) -> str:
    """`key   value` lines with the values aligned."""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


def buckets_text(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{b}x{s}" for b, s in manifest["buckets"])


def rewrites_text(manifest: dict[str, Any]) -> str:
    report = manifest.get("rewrites") or {}
    return ", ".join(f"{name} {count}" for name, count in report.items()) or "none (every op stays as aten)"


def bundle_bytes(manifest: dict[str, Any]) -> int:
    return sum(entry.get("size", 0) for entry in manifest["files"].values())


def kernel_count(manifest: dict[str, Any]) -> int:
    kernels = manifest.get("kernels") or {}
    return int(kernels.get("triton") or 0)


def target_text(manifest: dict[str, Any]) -> str:
    target = manifest["target"]
    if target.get("device") == "cuda":
        return f"cuda, {target.get('gpu')} (compute capability {target.get('capability')})"
    return str(target.get("device"))


def model_text(manifest: dict[str, Any]) -> str:
    parts = [str(manifest.get("model", "?"))]
    if manifest.get("task"):
        parts.append(f"task {manifest['task']}")
    if manifest.get("source"):
        parts.append(f"from {manifest['source']}")
    return ", ".join(parts)


def checks_table(manifest: dict[str, Any]) -> str:
    rows = [
        (
            (f"{c['entry']} " if "entry" in c else "") + f"{c['bucket'][0]}x{c['bucket'][1]}",
            f"{c['cosine']:.6f}",
            f"{c['max_abs_diff']:.3e}",
        )
        for c in manifest.get("checks") or []
    ]
    return table(("bucket", "cosine to the model", "max abs diff"), rows)


def stages_table(manifest: dict[str, Any]) -> str:
    seconds = manifest.get("build_seconds") or {}
    rows = [(stage, f"{value:.2f}") for stage, value in seconds.items()]
    rows.append(("total", f"{sum(seconds.values()):.2f}"))
    return table(("stage", "seconds"), rows)


def files_table(manifest: dict[str, Any], manifest_size: int = 0) -> str:
    sizes = {name: entry.get("size", 0) for name, entry in manifest["files"].items()}
    if manifest_size:
        sizes["manifest.json"] = manifest_size
    rows = [(name, human_size(size)) for name, size in sorted(sizes.items())]
    rows.append(("total", human_size(sum(sizes.values()))))
    return table(("file", "size"), rows)


def signature_text(manifest: dict[str, Any]) -> str:
    """Who signed the bundle, and whether the signature is intact (whether to trust the key is the loader's call:
    kernl.load(..., trusted_keys=[...]))."""
    from kernl.artifacts.signing import check_signature, embedded_public_key
    from kernl.errors import BundleError, KernlError

    try:
        key_id = check_signature(manifest, None)
        if key_id is None:
            return "unsigned"
        check_signature(manifest, [embedded_public_key(manifest)])
    except BundleError as err:
        return f"invalid: {err}"
    except KernlError:  # no cryptography library here: the key is named, the signature not checked
        return f"signed by {key_id} (not checked: pip install 'kernl[sign]')"
    return f"signed by {key_id}"


def generation_text(gen: dict[str, Any]) -> str:
    cache = gen.get("cache") or {}
    return (
        f"decode batches {', '.join(map(str, gen['batch_sizes']))}; max length {gen['max_length']}; "
        f"KV cache {human_size(cache.get('bytes', 0))}"
    )


def seq2seq_text(gen: dict[str, Any]) -> str:
    """An encoder-decoder bundle's generation settings in one line."""
    cache = gen.get("cache") or {}
    if gen.get("kind") == "speech":
        source = f"audio features {gen.get('num_mel_bins')} mel bins x {gen['seq_lens'][-1]} frames"
    else:
        source = f"text of {', '.join(map(str, gen['seq_lens']))} tokens"
    eos = gen.get("eos_token_id")
    return (
        f"{source}; batches {', '.join(map(str, gen['batch_sizes']))}; beams up to {gen.get('num_beams', 1)}; "
        f"max length {gen['max_length']}; decoder prefix {gen.get('decoder_prefix')}; eos {eos}; "
        f"caches {human_size(cache.get('bytes', 0))}"
    )


def generation_fields(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The generation line of a summary: decoder-LM or encoder-decoder settings, or none."""
    if "generation" in manifest:
        return [("generation", generation_text(manifest["generation"]))]
    if "seq2seq" in manifest:
        return [("generation", seq2seq_text(manifest["seq2seq"]))]
    return []


def compile_summary(manifest: dict[str, Any], path: str) -> str:
    """What `kernl-compile` prints at the end."""
    head = fields(
        [
            ("bundle", path),
            ("model", model_text(manifest)),
            ("dtype", manifest["dtype"]),
            ("target", target_text(manifest)),
            ("buckets", buckets_text(manifest)),
            *generation_fields(manifest),
            ("rewrites", rewrites_text(manifest)),
            ("kernels", f"{kernel_count(manifest)} compiled Triton kernels"),
            ("size", f"{human_size(bundle_bytes(manifest))} in {len(manifest['files']) + 1} files"),
            ("signature", signature_text(manifest)),
        ],
    )
    return "\n\n".join((head, stages_table(manifest), checks_table(manifest)))
