"""Kept for callers of ``vtprune.ops._staging.to_device_i64``; the helper lives in :mod:`vtprune._host`."""

from vtprune._host import to_device_i64

__all__ = ["to_device_i64"]
