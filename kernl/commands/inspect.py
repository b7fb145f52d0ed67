"""`kernl inspect BUNDLE`: the manifest in words, and whether this machine can load the bundle. No transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kernl.commands.bundle_path import bundle_root
from kernl.commands.describe import (
    buckets_text,
    checks_table,
    fields,
    files_table,
    kernel_count,
    model_text,
    rewrites_text,
    stages_table,
    target_text,
)
from kernl.commands.errors import CliError, Command


def _io_text(manifest: dict[str, Any]) -> tuple[str, str]:
    fills = {"required": "required", "ones": "default all ones", "zeros": "default zeros"}
    inputs = ", ".join(f"{s['name']} ({s['dtype']}, {fills.get(s['fill'], s['fill'])})" for s in manifest["inputs"])
    outputs = ", ".join(f"{o['name']} [{', '.join(map(str, o['dims']))}]" for o in manifest["outputs"])
    return inputs, outputs


def loadability(manifest: dict[str, Any], problem: str | None = None) -> tuple[bool, str]:
    """Can kernl.load run this bundle here, as built, and on which device; or why not."""
    import torch

    from kernl.runtime.compat import kernel_mismatches

    if problem:
        return False, problem
    if manifest["target"].get("device") != "cuda":
        return True, "yes, on cpu"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU here for its cuda kernels; kernl.load(BUNDLE, device='cpu') runs it on the CPU"
    mismatches = kernel_mismatches(manifest, torch.device("cuda"))
    if mismatches:
        return False, "; ".join(mismatches) + " (kernl.load(BUNDLE, recompile=True) rebuilds the kernels here)"
    return True, f"yes, on cuda ({torch.cuda.get_device_name()}) with its compiled kernels"


def _read(root: Path) -> tuple[dict[str, Any], str | None]:
    """The manifest, and the integrity problem when the bundle does not verify (then it is described as read)."""
    import json

    from kernl.artifacts.manifest import MANIFEST, validate
    from kernl.artifacts.reader import read_manifest
    from kernl.errors import BundleError

    try:
        return read_manifest(root, verify=True), None
    except BundleError as err:
        problem = str(err)
    try:
        return validate(json.loads((root / MANIFEST).read_text())), problem
    except (BundleError, ValueError, OSError):
        raise CliError(problem) from None


@click.command(name="inspect", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
def inspect_command(bundle: Path) -> None:
    """Describe BUNDLE (directory or .kernl archive) and say whether this machine can load it."""
    root = bundle_root(bundle)
    manifest, problem = _read(root)
    ok, why = loadability(manifest, problem)
    inputs, outputs = _io_text(manifest)
    versions = manifest.get("versions") or {}
    built = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    click.echo(
        fields(
            [
                ("bundle", str(root)),
                ("model", model_text(manifest)),
                ("dtype", manifest["dtype"]),
                ("target", target_text(manifest)),
                ("export mode", manifest.get("export_mode", "?")),
                ("built with", built),
                ("inputs", inputs),
                ("outputs", outputs),
                ("buckets", buckets_text(manifest)),
                ("rewrites", rewrites_text(manifest)),
                ("kernels", f"{kernel_count(manifest)} compiled Triton kernels"),
                ("loads here", why if ok else f"no: {why}"),
            ]
        )
    )
    files = files_table(manifest, (root / "manifest.json").stat().st_size)
    for section in (files, checks_table(manifest), stages_table(manifest)):
        click.echo("\n" + section)
