"""The compile side: tracing, rewrite passes, program generation, warm-up. Imports transformers-land code."""

from kernl.compiler.build import compile_model
from kernl.compiler.build_generation import compile_generation
from kernl.compiler.build_seq2seq import compile_seq2seq
from kernl.compiler.lower_generation import GenerationSettings
from kernl.compiler.lower_seq2seq import Seq2SeqSettings

__all__ = ["GenerationSettings", "Seq2SeqSettings", "compile_generation", "compile_model", "compile_seq2seq"]
