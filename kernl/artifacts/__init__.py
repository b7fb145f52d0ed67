"""The bundle format: manifest schema, weights, atomic writer, verifying reader, compatibility checks."""

from kernl.artifacts.manifest import FORMAT_VERSION
from kernl.artifacts.reader import read_manifest
from kernl.artifacts.writer import BundleWriter

__all__ = ["FORMAT_VERSION", "BundleWriter", "read_manifest"]
