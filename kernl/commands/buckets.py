"""Bucket specs on the command line: `--buckets 1x128,8x128` or `--batch-sizes 1,8 --seq-lens 64,128`."""

from __future__ import annotations

from kernl.commands.errors import CliError


def _positive_ints(spec: str, option: str) -> list[int]:
    values = [part.strip() for part in spec.split(",")]
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise CliError(f"{option} {spec!r}: expected positive integers separated by commas (e.g. 1,8)")
    return [int(v) for v in values]


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """'1x128,8x128' -> [(1, 128), (8, 128)]."""
    buckets = []
    for part in spec.split(","):
        batch, sep, seq = part.strip().lower().partition("x")
        if not sep or not batch.isdigit() or not seq.isdigit() or int(batch) < 1 or int(seq) < 1:
            raise CliError(f"--buckets: {part.strip()!r} is not BATCHxSEQ with positive sizes (e.g. 8x128)")
        buckets.append((int(batch), int(seq)))
    return sorted(set(buckets))


def resolve_buckets(buckets: str | None, batch_sizes: str | None, seq_lens: str | None) -> list[tuple[int, int]]:
    """Exactly one of the two forms; the second gives every (batch, seq) combination."""
    product = batch_sizes is not None or seq_lens is not None
    if buckets is not None and product:
        raise CliError("give either --buckets or --batch-sizes with --seq-lens, not both")
    if buckets is not None:
        return parse_buckets(buckets)
    if batch_sizes is None or seq_lens is None:
        raise CliError("give the shape buckets: --buckets 1x128,8x128, or --batch-sizes 1,8 with --seq-lens 64,128")
    sizes, lens = _positive_ints(batch_sizes, "--batch-sizes"), _positive_ints(seq_lens, "--seq-lens")
    return sorted({(b, s) for b in sizes for s in lens})
