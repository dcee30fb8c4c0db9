"""Integrations with other training tools (axolotl). Each sub-package imports its tool only when it is used."""
