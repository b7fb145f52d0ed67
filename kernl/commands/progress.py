"""kernl.compile's progress callback shown as a tqdm bar (lines of text when stderr is not a terminal)."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm


class StageProgress:
    """Steps: export, rewrite, one warm-up per bucket, save. kernl.compile calls it as each stage starts."""

    def __init__(self, n_buckets: int, prog: str) -> None:
        self.prog = prog
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=3 + n_buckets, unit="step", file=sys.stderr, disable=not self.interactive, leave=False)
        self.running = False

    def __call__(self, name: str) -> None:
        if self.running:
            self.bar.update(1)
        if name == "end":
            self.close()
            return
        # "warm-up" only ends the rewrite; its per-bucket steps ("warm-up 1x128", …) follow.
        self.running = name != "warm-up"
        if self.running:
            self.bar.set_description(name)
            if not self.interactive:
                click.echo(f"{self.prog}: {name} …", err=True)

    def close(self) -> None:
        self.running = False
        self.bar.close()
