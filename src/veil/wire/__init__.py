"""Formats every side shares (model cards, ...): a leaf that depends only on `veil.crypto`."""
