"""Shared fixtures. Real-model fixtures locate the PyPI-shipped GGUF files.

In CI (CI=true) a missing real model is an error, never a silent skip: those tests are the
ones that show the project works on real models.
"""

from __future__ import annotations

import os

import pytest


def _real_model(name: str):
    from ivl_local.errors import ModelNotFoundError
    from ivl_local.models import install_command, resolve_model

    try:
        return resolve_model(name)
    except ModelNotFoundError:
        message = f"real model {name} not installed ({install_command(name)})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_path():
    return _real_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    return _real_model("gemma3-270m")
