"""Architecture adapters as data: one small spec per model family (netmorph/arch/families.py), looked up by the
source's `model_type`, used by every command."""

from netmorph.arch.families import COMMANDS, FAMILIES, ArchSpec, Refusal, spec_for
from netmorph.ops.roles import ROLE_SPACES

__all__ = ["COMMANDS", "FAMILIES", "ROLE_SPACES", "ArchSpec", "Refusal", "spec_for"]
