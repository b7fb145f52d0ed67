"""A BUNDLE argument: a bundle directory or its one-file .kernl archive, as a readable directory."""

from __future__ import annotations

from pathlib import Path

from kernl.commands.errors import CliError


def bundle_root(path: Path) -> Path:
    """The bundle's directory (an archive is unpacked once into kernl's cache); CliError when there is none."""
    from kernl.artifacts.archive import unpack
    from kernl.errors import BundleError

    if not path.exists():
        raise CliError(f"{path}: no such bundle")
    if path.is_file():
        try:
            return unpack(path)
        except BundleError as err:
            raise CliError(str(err)) from None
    if not (path / "manifest.json").is_file():
        raise CliError(f"{path}: not a kernl bundle (no manifest.json)")
    return path


def load_bundle(root: Path, device: str | None):
    """kernl.load(root, device), its errors as CliError."""
    import kernl

    try:
        return kernl.load(root, device=device)
    except kernl.KernlError as err:
        raise CliError(str(err)) from None
