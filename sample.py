"""
Batched sampling with a KV cache the sampler owns: the reference loop.

Test-time RL spends most of its time here: every step draws G = 16 solver completions and
G = 16 reframe-and-solve completions per question. `generate` runs a plain decode loop over a
key/value cache that is allocated once per call as (layers, rows, heads, time, head_dim) and
written in place; the Hugging Face model only supplies the forward pass. Four things make it
faster than `model.generate` for this workload, and each is visible below:
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
`engine.generate` serves the same contract fast on a GPU (slots, its own forward, CUDA graphs);
the caller picks one (`engine.generate if fast else sample.generate`), and tests/test_engine.py
checks that both give the same tokens.

Run it:
    python sample.py --model smollm2 --prompt "What is 7 + 5?" -n 4
    python bench.py                 # this sampler vs HF generate, SmolLM2 on the CPU
"""

import argparse
import functools
import inspect
import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from models import head_dim, load_model

def generate(model, prompts, max_new_tokens, *, n=1, temperature=1.0, top_p=1.0, top_k=0,
             stop_ids=(), generator=None, max_rows=None, progress=None):
    """
    Sample n completions for each prompt (lists of token ids of any lengths). Returns
    len(prompts) * n lists of new token ids, prompt-major; each ends at its first stop token
    (included) or holds exactly max_new_tokens tokens. temperature 0 is greedy; top_k 0 and
    top_p 1.0 mean no truncation. `generator` must live on the model's device.
    max_rows: at most this many sequences in flight (None: all of them), met by sampling whole
    prompts in chunks (at least one prompt, n rows, a chunk).
    progress: called with the number of completions that have just ended (a progress bar's update).
    A seeded generator reproduces a call with the same arguments.
    """
    check_request(prompts, max_new_tokens, n, temperature, top_k, top_p)
    chunk = max(1, (max_rows or len(prompts) * n) // n)  # prompts a call
    return [c for i in range(0, len(prompts), chunk)
            for c in generate_eager(model, prompts[i : i + chunk], max_new_tokens, n=n, temperature=temperature,
                                    top_p=top_p, top_k=top_k, stop_ids=stop_ids, generator=generator,
                                    progress=progress)]


def check_request(prompts, max_new_tokens, n, temperature, top_k, top_p):
    """A ValueError for a request no sampler can serve (engine.generate checks the same)."""
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


# -----------------------------------------------------------------------------
# The token draw

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
    vocabulary, which a GPU profile of the decode step found costly, and cheaper still than
    torch.multinomial, which draws an exponential for every vocabulary entry (docs/MEASURED.md)."""
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
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, head_dim(config))
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
