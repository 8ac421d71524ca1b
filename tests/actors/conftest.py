"""Fixtures shared by the actor tests: one tiny model and one encoded corpus per module."""

import pytest

from tests.actors.helpers import corpus, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def docs(model):
    return corpus(model)
