"""Kept for kernel glue that imports ``vtprune.ops._library``: the registry lives in :mod:`vtprune._library`."""

from vtprune._library import OPS, call

__all__ = ["OPS", "call"]
