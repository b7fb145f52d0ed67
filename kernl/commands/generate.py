"""`kernl run BUNDLE --prompt …` for generation bundles: tokenize, generate (streaming one prompt), print text."""

from __future__ import annotations

from typing import Any

import click

from kernl.commands.errors import CliError


def run_generation(loaded: Any, tok: Any, prompts: list[str], options: dict[str, Any]) -> None:
    """Stream the completion of one prompt as it is generated; several prompts are generated as one batch."""
    import kernl

    ids = tok.encode(prompts)
    try:
        if len(prompts) == 1:
            new: list[int] = []
            shown = ""
            click.echo(prompts[0], nl=False)
            for step in loaded.stream(ids, **options):
                new.append(int(step[0]))
                text = tok.decode(new)
                # Print what the decoded text gained: a token may complete a character started by the last.
                if text.startswith(shown):
                    click.echo(text[len(shown) :], nl=False)
                    shown = text
            click.echo()
            return
        out = loaded.generate(ids, **options)
    except kernl.InputError as err:
        raise CliError(str(err)) from None
    width = max(len(row) for row in ids)
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        click.echo(f"{prompt}{tok.decode(row)}")
