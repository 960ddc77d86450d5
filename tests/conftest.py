"""Fixtures of the sampler's and the engine's tests: tiny random models of both families, the byte tokenizer."""

import pytest

from sample import byte_tokenizer, tiny_model


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return tiny_model(request.param).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()
