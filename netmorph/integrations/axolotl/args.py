"""The plugin's YAML keys for axolotl: netmorph's own `DiffAttnArgs`, merged by axolotl into its config schema.

This module must not import axolotl: axolotl imports it by dotted path while it builds its config class.
"""

from netmorph.options import DiffAttnArgs

__all__ = ["DiffAttnArgs"]
