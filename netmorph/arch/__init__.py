"""Architecture adapters as data: one small spec per model family, looked up by the source's `model_type`."""

from netmorph.arch.llama import FAMILIES, ArchSpec, spec_for

__all__ = ["FAMILIES", "ArchSpec", "spec_for"]
