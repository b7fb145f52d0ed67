"""`kernl inspect BUNDLE`: the manifest in words, and whether this machine can load the bundle. No transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kernl.commands.bundle_path import bundle_root, check_bundle_path, trusted_key_option
from kernl.commands.describe import (
    buckets_text,
    checks_table,
    fields,
    files_table,
    generation_fields,
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


def _read(path: Path) -> tuple[dict[str, Any], Path, str | None]:
    """The manifest, the bundle's folder, and the integrity problem when the bundle does not verify (then the
    manifest is described as read, unverified)."""
    import json

    from kernl.artifacts.manifest import MANIFEST, validate
    from kernl.artifacts.reader import open_bundle
    from kernl.errors import BundleError

    try:
        with open_bundle(path, verify=True) as files:
            files.check_all(keep=False)  # every file's sha256, as kernl.load checks those it uses
            return files.manifest, files.root, None
    except BundleError as err:
        problem = str(err)
    root = bundle_root(path)
    try:
        return validate(json.loads((root / MANIFEST).read_text())), root, problem
    except (BundleError, ValueError, OSError):
        raise CliError(problem) from None


def _signature(manifest: dict[str, Any], trusted_keys: tuple[Path, ...]) -> tuple[str, str | None]:
    """Who signed, in words; and why kernl.load would refuse the bundle with these trusted keys, if it would."""
    from kernl.artifacts.signing import check_signature
    from kernl.commands.describe import signature_text
    from kernl.errors import BundleError, KernlError

    text = signature_text(manifest)
    if not trusted_keys and "signature" not in manifest:
        return text, None
    try:
        key_id = check_signature(manifest, list(trusted_keys) or None)
    except BundleError as err:
        return text, str(err)
    except KernlError as err:  # an unreadable key, or no cryptography library
        raise CliError(str(err)) from None
    return (f"signed by {key_id}, a trusted key" if trusted_keys else text), None


def _program_view(path: Path) -> str:
    """The bundle's readable program (program.py), from its verified bytes."""
    from kernl.artifacts.reader import open_bundle
    from kernl.errors import BundleError

    try:
        with open_bundle(path, verify=True) as files:
            view = files.manifest["program"].get("view")
            if not view:
                raise CliError(f"{path}: this bundle carries no readable program")
            return files.read(view).decode("utf-8", errors="replace")
    except BundleError as err:
        raise CliError(str(err)) from None


@click.command(name="inspect", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@trusted_key_option
@click.option("--program", "show_program", is_flag=True, help="print the rewritten program (readable view; never run)")
def inspect_command(bundle: Path, trusted_keys: tuple[Path, ...], show_program: bool) -> None:
    """Describe BUNDLE (directory or .kernl archive), who signed it, and whether this machine can load it."""
    check_bundle_path(bundle)
    if show_program:
        click.echo(_program_view(bundle), nl=False)
        return
    manifest, root, problem = _read(bundle)
    signed, refused = _signature(manifest, trusted_keys)
    ok, why = loadability(manifest, problem or refused)
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
                ("signature", signed),
                *([("inputs", inputs), ("outputs", outputs)] if manifest["inputs"] else []),
                ("buckets", buckets_text(manifest)),
                *generation_fields(manifest),
                ("rewrites", rewrites_text(manifest)),
                ("kernels", f"{kernel_count(manifest)} compiled Triton kernels"),
                ("loads here", why if ok else f"no: {why}"),
            ]
        )
    )
    files = files_table(manifest, (root / "manifest.json").stat().st_size)
    for section in (files, checks_table(manifest), stages_table(manifest)):
        click.echo("\n" + section)
