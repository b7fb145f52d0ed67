"""`kernl keygen PATH`: an Ed25519 key pair for signing bundles (kernl-compile --sign, kernl.load trusted_keys)."""

from __future__ import annotations

from pathlib import Path

import click

from kernl.commands.errors import CliError, Command


@click.command(name="keygen", cls=Command)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="replace existing key files")
def keygen_command(path: Path, force: bool) -> None:
    """Write a new signing key to PATH (private, mode 0600) and its public key to PATH.pub."""
    from kernl.artifacts.signing import generate_key, public_key_id
    from kernl.errors import KernlError

    try:
        private_path, public_path = generate_key(path, overwrite=force)
        fingerprint = public_key_id(public_path)
    except KernlError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"{path}: cannot write the key ({err.strerror or err})") from None
    click.echo(f"private key  {private_path}  (keep it secret: kernl-compile ... --sign {private_path})")
    click.echo(f"public key   {public_path}  (give it to loaders: kernl.load(..., trusted_keys=[...]))")
    click.echo(f"key id       {fingerprint}")
