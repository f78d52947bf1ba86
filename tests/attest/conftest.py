"""Fixtures for the attestation tests live in attest_helpers (a unique module name, so test
modules can import its constants without clashing with other folders' conftest.py)."""

from attest_helpers import *  # noqa: F403
