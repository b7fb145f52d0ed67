"""The loaded bundle's tokenizer, as the commands use it: kernl.runtime.tokenizer, built from verified bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kernl.commands.errors import CliError
from kernl.runtime.tokenizer import BundleTokenizer


def bundle_tokenizer(loaded: Any, path: Path) -> BundleTokenizer:
    """loaded.tokenizer (a kernl.Bundle's, read on first use), or a CliError: the bundle at path has none, or
    its tokenizer files do not verify."""
    from kernl.errors import KernlError

    try:
        tok = loaded.tokenizer
    except KernlError as err:
        raise CliError(str(err)) from None
    if tok is None:
        raise CliError(f"{path}: the bundle has no tokenizer/tokenizer.json (compile it with a fast tokenizer)")
    return tok


def token_text(tok: BundleTokenizer, token_id: int) -> str:
    """One token as a report shows it: its text, or its vocabulary entry when the text is blank."""
    text = tok.decode([token_id], skip_special_tokens=False).strip()
    return text or tok.id_to_token(token_id) or str(token_id)
