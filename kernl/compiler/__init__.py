"""The compile side: tracing, rewrite passes, program generation, warm-up. Imports transformers-land code."""

from kernl.compiler.build import compile_model
from kernl.compiler.build_generation import compile_generation
from kernl.compiler.lower_generation import GenerationSettings

__all__ = ["GenerationSettings", "compile_generation", "compile_model"]
