"""The command line's pieces: one file a command, plus the helpers they share. kernl/cli.py wires them up.

Import cost stays low: torch, transformers and tokenizers are imported inside the commands that need them,
and `kernl inspect` / `kernl run` never import transformers.
"""
