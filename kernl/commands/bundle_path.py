"""A BUNDLE argument (a bundle directory or its one-file .kernl archive), and the --trusted-key option."""

from __future__ import annotations

from pathlib import Path

import click

from kernl.commands.errors import CliError

trusted_key_option = click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="an Ed25519 public key (PEM, from kernl keygen); repeat for several. Refuses bundles no such key signed",
)


def check_bundle_path(path: Path) -> Path:
    """path, when it can be a bundle (an archive file, or a directory with a manifest); CliError otherwise."""
    if not path.exists():
        raise CliError(f"{path}: no such bundle")
    if path.is_dir() and not (path / "manifest.json").is_file():
        raise CliError(f"{path}: not a kernl bundle (no manifest.json)")
    return path


def bundle_root(path: Path) -> Path:
    """The bundle's directory (an archive is unpacked into kernl's cache), unverified; CliError when there is none."""
    from kernl.artifacts.archive import unpack
    from kernl.errors import BundleError

    check_bundle_path(path)
    if path.is_file():
        try:
            return unpack(path)
        except BundleError as err:
            raise CliError(str(err)) from None
    return path


def load_bundle(path: Path, device: str | None, trusted_keys: tuple[Path, ...] = ()):
    """kernl.load(path, device, trusted_keys) (None when no key is given: unsigned bundles load), errors as CliError."""
    import kernl

    check_bundle_path(path)
    try:
        return kernl.load(path, device=device, trusted_keys=list(trusted_keys) or None)
    except kernl.KernlError as err:
        raise CliError(str(err)) from None
