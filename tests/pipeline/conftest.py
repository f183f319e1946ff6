"""Fixtures of the pipeline's service-level tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.crypto.keys import PrivateKey, write_keypair


@pytest.fixture(scope="module")
def edge_public_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An edge public key file to seal to (its private half stays in the directory)."""
    directory = tmp_path_factory.mktemp("edge-key")
    key_id = write_keypair(directory, PrivateKey.generate())
    return directory / f"{key_id}.pub"
