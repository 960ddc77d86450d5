"""Fixtures shared by the tests: tiny random models of both families and the byte tokenizer (the sampler's
and the engine's tests), and whole runs of the loop made once per pytest run and read by several tests."""

import pytest

from models import byte_tokenizer, tiny_model


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return tiny_model(request.param).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """finished_run(argv): the folder of a run of the loop with these flags (all but --out-dir), made the first
    time a test asks for it and shared by every test that asks again. Read it, or copy it; never write to it."""
    import selfharmony
    runs = {}

    def get(argv):
        if tuple(argv) not in runs:
            out = tmp_path_factory.mktemp("run")
            selfharmony.main(list(argv) + ["--out-dir", str(out)])
            runs[tuple(argv)] = out
        return runs[tuple(argv)]
    return get
