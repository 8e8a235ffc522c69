"""Test utilities shipped with vtprune: :mod:`vtprune.testing.syncs` counts host-device synchronisations."""
