"""Command line: `kernl-compile MODEL -o BUNDLE …` and `kernl {compile,inspect,run,bench,keygen}`.

Thin: parse, call the library, print. Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import click

from kernl.commands.bench import bench_command
from kernl.commands.compile import compile_command
from kernl.commands.errors import Group
from kernl.commands.inspect import inspect_command
from kernl.commands.keygen import keygen_command
from kernl.commands.run import run_command
from kernl.commands.serve import serve_command

__all__ = ["compile_command", "main"]


@click.group(name="kernl", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kernl: compile Hugging Face transformers into bundles, and inspect, run, benchmark and sign them."""


main.add_command(compile_command, name="compile")
main.add_command(inspect_command)
main.add_command(run_command)
main.add_command(bench_command)
main.add_command(keygen_command)
main.add_command(serve_command)

if __name__ == "__main__":
    main(prog_name="kernl")
