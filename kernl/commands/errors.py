"""Bad input on the command line: one line on stderr and exit status 2, never a usage dump or traceback."""

from __future__ import annotations

import click
from click.exceptions import NoArgsIsHelpError


class CliError(click.ClickException):
    """A user error, shown as `PROG: error: MESSAGE` on one line."""

    def __init__(self, message: str, prog: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message)
        self.prog = prog
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"{self.prog or 'kernl'}: error: {self.format_message()}", file=file, err=True)


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line, for messages that must stay on one line."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def one_line(err: click.ClickException, prog: str | None) -> click.ClickException:
    """click's own errors (bad option values, missing arguments) turned into a CliError."""
    if isinstance(err, NoArgsIsHelpError):  # `kernl` alone prints its help
        return err
    if isinstance(err, CliError):
        err.prog = err.prog or prog
        return err
    message = " ".join(err.format_message().split())
    return CliError(message, prog, exit_code=2 if isinstance(err, click.UsageError) else err.exit_code)


class _OneLineErrors:
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as err:
            prog = " ".join(p for p in (parent.command_path if parent else None, info_name) if p)
            raise one_line(err, prog or None) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as err:
            raise one_line(err, ctx.command_path) from None


class Command(_OneLineErrors, click.Command):
    """A click command whose errors are one line."""


class Group(_OneLineErrors, click.Group):
    """A click group whose errors, and its subcommands', are one line."""
