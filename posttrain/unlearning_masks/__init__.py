"""Masks that choose which weights an unlearning run may change (docs/methods/wagle.md)."""
