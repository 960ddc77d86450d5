"""
The fast rollout engine: a pool of sequence slots over a static KV cache, decoded by a forward of
its own that runs as captured CUDA graphs on a GPU.

`generate` here keeps `sample.generate`'s contract, and the caller picks one of the two (the loop: the
fast engine on CUDA, --engine); `sample.generate` stays the readable reference, a model this engine
cannot run goes there, and tests/test_engine.py checks that both give the same tokens. What differs:
  1. Slots and continuous batching. The cache holds `max_rows` slots of (longest prompt +
     max_new_tokens) columns, one sequence a slot, its token at position p in column p (no
     padding). When a sequence finishes, its slot takes the next waiting one, so the batch stays
     full until the queue runs dry; then the live rows are packed into the lowest slots.
  2. One prefill a prompt. The HF model prefills a prompt (`sample.forward_last`) when its first
     sample gets a slot; its keys, values and last logits wait in a small store until all n of
     its samples have a slot and a copy. Each sample draws its own first token.
  3. A decode step of fixed shapes. It reads slots [0, b) and cache columns [0, t) for a bucket
     (b, t), and takes everything that changes (token, position, the uniform number of its draw)
     from static buffers, so on CUDA it is captured once a bucket as a CUDA graph and replayed:
     the step's hundreds of small kernels cost one launch. Sampling inside it is
     `sample.sample_next`, the eager path's own function, fed with uniforms drawn outside the graph.
  4. Attention reads each key/value head once: the g query heads that share it are matched as
     g queries of one head, (b, Hkv, g, D) against (b, Hkv, t, D), with no copy of K and V per
     query head (HF's repeat_kv). On the CPU (SDPA) a row sees columns 0..pos of its own slot
     through one additive mask a step; on CUDA in bfloat16 ("varlen", the fastest measured) each
     (row, key/value head) is one sequence of torch's flash attention over packed sequences, which
     reads the row's columns 0..pos and no more. "flex" (FlexAttention, a block mask a step) also
     reads a row's own blocks only.
  5. The host looks at the new tokens every `check_every` steps (one sync), not after each
     token. A row that stopped in between runs on for the rest of the window in its own slot and
     the tokens after its stop are dropped.
The forward is the Llama family's (Llama, SmolLM2, Qwen2, Qwen3: RMSNorm, RoPE, grouped queries,
Qwen3's q/k norms). It calls the HF model's own modules (embeddings, projections, MLPs, lm_head,
and its rotary embedding for the cos/sin table) and writes the loop over layers, attention with the
slot cache, RMSNorm (torch's fused rms_norm on the modules' weights: one kernel on CUDA, eight in
HF's code) and RoPE (queries and keys at once), so it reads the HF weights in place and computes
what HF computes (exactly in float32; tests/test_engine.py checks each piece and the whole step).
Weights run in their own dtype (autocast is off inside): give it the bfloat16 sampling copy. On that copy
the loop calls fuse(), which joins each layer's q / k / v weights into one matrix and gate / up into another,
the modules' weights becoming views into them: a layer's step runs 4 matmuls instead of 7.

    python engine.py --model smollm2     # greedy parity with the eager loop, and both timed
    python engine.py --model random:qwen3-1.7b --device cuda    # the same on a GPU (float32), graphs too
    python engine.py --model random:qwen3-1.7b --device cuda --dtype bfloat16 --attention varlen
                                         # varlen attention: one step's logits against HF's forward
    python engine.py --model random:qwen3-1.7b --device cuda --dtype bfloat16 --attention flex --compile
                                         # FlexAttention, the layers and the sampler compiled
"""

import argparse
import functools
import time
from collections import deque
from itertools import islice

import torch
import torch.nn.functional as F

import sample
from models import head_dim, load_model
from sample import KVCache, check_request, forward_last, left_pad, sample_next

ARCHS = ("llama", "qwen2", "qwen3")  # config.model_type values whose forward is written below
# "sdpa": torch's fused attention (one kernel); "matmul": the same math in plain ops, two batched matmuls
# around a float32 softmax. Both read columns [0, t) of every row. "varlen" (CUDA, bfloat16 / float16): flash
# attention that reads each row's own columns 0..pos only (on a ragged batch the others read the columns of
# the bucket and of free slots too). "flex": FlexAttention (compiled on CUDA), which also reads each row's
# own columns only, with a decoding kernel that packs the g query heads of a key/value head into one tile.
# ATTENTION None: attention_for() picks the fastest measured (docs/MEASURED.md) by device and dtype
ATTENTION = None
ATTENTIONS = ("sdpa", "matmul", "varlen", "flex")
FLEX_BLOCK = 128  # columns a FlexAttention key/value block
LENGTH_BUCKET = 256  # CUDA graphs are captured for cache lengths that are multiples of this
PREFILL_TOKENS = 16384  # padded prompt tokens a prefill forward (bounds its activations)
# torch.compile each layer's step and the sampler (compiled): fewer, fused kernels a decode step, after a compilation
# of tens of seconds at the first step. Off by default: not yet timed on a GPU (docs/MEASURED.md)
COMPILE = False
PREFILL_AHEAD = 8  # prompts prefilled together when one is needed (their caches wait in a store)
# attend() and mlp() run q / k / v as one matmul and the MLP's gate / up as another where fuse() joined their
# weights (3 fewer matmuls a layer, the same bytes read); False runs the modules' own (bench.py --decode-step)
FUSED = True


def supports(model):
    """Whether the fast engine can run this model (the others fall back to the eager loop). Its cos / sin
    table is computed once for every position, so no RoPE that rescales with the sequence's length."""
    config, rotary = model.config, getattr(getattr(model, "model", None), "rotary_emb", None)
    return (config.model_type in ARCHS and not getattr(config, "use_sliding_window", False) and rotary is not None
            and getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope"))


def fuse(model):
    """Join each layer's q / k / v projections into one matrix and its MLP's gate / up into another (as
    nano-vllm and gpt-fast keep them), and make the HF modules' weights views into them: a layer's decode
    step then runs 4 matmuls where it ran 7, over the same bytes, and HF's forward (the prefill) reads the
    same numbers through the views. No extra memory; in-place copies into the modules' weights
    (sync_sampling_copy after each update) land in the joined ones. For weights that are not trained (the
    sampling copy): a trained model's checkpoint would hold the views' shared storage. The joined weights
    are plain attributes, so model.parameters() and the state dict still list each weight once."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = join(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp.gate_up = join(mlp.gate_proj, mlp.up_proj)


def join(*linears):
    """(weight, bias) of the linears' outputs stacked, each linear's own weight (and bias) now a view into them."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = torch.cat([linear.bias.detach() for linear in linears]) if linears[0].bias is not None else None
    row = 0
    for linear in linears:
        rows = slice(row, row + linear.out_features)
        linear.weight.data = weight[rows]
        if bias is not None:
            linear.bias.data = bias[rows]
        row = rows.stop
    return weight, bias


def drop_stale_joins(model):
    """Forget the joined weights whose modules no longer read them: a model moved or recast after fuse() (.to()
    gives each weight a new tensor) runs its modules' own weights."""
    for layer in model.model.layers:
        for owner, name, first in ((layer.self_attn, "qkv", layer.self_attn.q_proj),
                                   (layer.mlp, "gate_up", layer.mlp.gate_proj)):
            if hasattr(owner, name) and first.weight.data_ptr() != getattr(owner, name)[0].data_ptr():
                delattr(owner, name)

# -----------------------------------------------------------------------------
# The forward of one decode step


def norm(module, x):
    """HF's RMSNorm (Llama, Qwen2, Qwen3: x / rms(x) * weight, in float32) as torch's rms_norm: one fused
    kernel on CUDA where HF's code launches eight, four times a layer."""
    return F.rms_norm(x, x.shape[-1:], module.weight, module.variance_epsilon)


def attention_for(x):
    """The attention of a step on tensors like x: ATTENTION when set, else the fastest measured, "varlen"
    on CUDA in bfloat16 / float16 where flash attention runs (compute capability 8.0 and up, Ampere on),
    and "sdpa" elsewhere (the CPU, float32, older GPUs)."""
    if ATTENTION:
        return ATTENTION
    flash = (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
             and torch.cuda.get_device_capability(x.device)[0] >= 8)
    return "varlen" if flash else "sdpa"


def rope(x, cos, sin_signed):
    """Rotary position embedding of x (b, H, D) at each row's position, as HF's x * cos + rotate_half(x)
    * sin with rotate_half(x) = (-x2, x1): here (x2, x1) = x rolled by half times sin_signed = (-sin1,
    sin2), the same products in four kernels instead of five. cos, sin_signed: (b, 1, D)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, used, scale):
    """torch's flash attention over packed sequences (CUDA, bfloat16 / float16): the queries
    q[cu_q[i] : cu_q[i+1]] of sequence i attend to its keys k[cu_k[i] : cu_k[i] + used[i]], the rest of
    its keys unread. q (Tq, H, D), k and v (Tk, H, D); max_q, max_k bound the sequences' lengths.
    torch.nn.attention.varlen.varlen_attn takes `used` (seqused_k) only from torch 2.12: call its op."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"varlen attention runs on CUDA in bfloat16 or float16, not {q.device.type} {q.dtype}: "
                         "use sdpa or matmul attention")
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   scale=scale, seqused_k=used)[0]


def flex_mask(pos, length):
    """FlexAttention's BlockMask for one query a row at position pos (b,) over a cache of `length` columns:
    a row reads the blocks of FLEX_BLOCK columns up to its position's, skips the rest, and inside them
    sees columns 0..pos. Fixed shapes, built on the device (no host sync); for the backward pass a
    BlockMask also lists the queries of each block (compute_q_blocks), which decoding does not need."""
    from torch.nn.attention.flex_attention import BlockMask
    blocks = -(-length // FLEX_BLOCK)
    used = (pos // FLEX_BLOCK + 1).int()[:, None, None]  # (b, 1, 1): the row's blocks, one head for all
    order = torch.arange(blocks, dtype=torch.int32, device=pos.device).repeat(len(pos), 1, 1, 1)  # (b, 1, 1, blocks)
    return BlockMask.from_kv_blocks(used, order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=lambda b, h, q, kv: kv <= pos[b],
                                    seq_lengths=(1, length), compute_q_blocks=False)


def flex(q, k, v, block_mask, scale):
    """FlexAttention with grouped queries, compiled on CUDA (uncompiled it runs a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention
    run = compiled(flex_attention) if q.is_cuda else flex_attention
    return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def attend(attn, h, cos, sin, k_cache, v_cache, rows, pos, seen, attention):
    """One new token a row: its key and value go to column pos of the row's slot, then its query
    attends over the slot's columns 0..pos. k_cache, v_cache: (R, Hkv, L, D). seen, built once a step
    (step_logits) for the step's `attention`: for "sdpa" and "matmul" a bias (b, t), 0 where a row sees a
    column and -inf where not; for "varlen" the packed sequences' offsets and lengths; for "flex" a
    BlockMask (flex_mask)."""
    b, D = h.shape[0], attn.head_dim
    if FUSED and hasattr(attn, "qkv"):  # fuse(): one matmul for the three
        sizes = attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features
        q, k, v = (y.view(b, -1, D) for y in F.linear(h, *attn.qkv).split(sizes, -1))
    else:
        q, k, v = (proj(h).view(b, -1, D) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (b, Hq / Hkv, D)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key before RoPE
        q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
    Hq, Hkv = q.shape[1], k.shape[1]
    q, k = rope(torch.cat((q, k), 1), cos, sin).split((Hq, Hkv), 1)  # one RoPE for queries and keys
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    q = q.reshape(b, Hkv, -1, D)  # (b, Hkv, g, D) query head j * g + i uses key/value head j, as repeat_kv
    if attention == "varlen":  # a sequence a (row, key/value head): its g query heads are g queries of one head
        cu_q, cu_k, used = seen
        out = flash_varlen(q.reshape(-1, 1, D), k_cache[:b].view(-1, 1, D), v_cache[:b].view(-1, 1, D),
                           cu_q, cu_k, q.shape[2], k_cache.shape[2], used, attn.scaling)  # (b * Hkv * g, 1, D)
        return attn.o_proj(out.reshape(b, -1))
    if attention == "flex":  # (b, Hq, 1, D) against the whole slots: the mask skips the blocks past each row's end
        out = flex(q.reshape(b, -1, 1, D), k_cache[:b], v_cache[:b], seen, attn.scaling)
        return attn.o_proj(out.reshape(b, -1))
    t = seen.shape[1]
    K, V = k_cache[:b, :, :t], v_cache[:b, :, :t]  # (b, Hkv, t, D) views: no copy
    if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, K, V, attn_mask=seen[:, None, None, :], scale=attn.scaling)
    else:
        scores = (q @ K.transpose(-1, -2)).float() * attn.scaling + seen[:, None, None, :]  # (b, Hkv, g, t)
        out = scores.softmax(-1).to(V.dtype) @ V  # (b, Hkv, g, D)
    return attn.o_proj(out.reshape(b, -1))


class Slots:
    """The pool's static state, allocated once a generate call: the KV cache (layers, R, Hkv, L, D)
    and, a slot each, the token to feed next, its position (= its cache column) and the uniform
    number of the next draw. A CUDA graph replays on these very tensors."""

    def __init__(self, model, rows, length, check_every, dtype, device):
        config = model.config
        shape = (config.num_hidden_layers, rows, config.num_key_value_heads, length, head_dim(config))
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.u = torch.zeros(rows, dtype=torch.float64, device=device)
        self.new = torch.zeros(rows, check_every, dtype=torch.long, device=device)  # not yet seen by the host
        self.rows = torch.arange(rows, device=device)
        self.seqs = torch.arange(rows * config.num_key_value_heads + 1, dtype=torch.int32, device=device)  # varlen's
        self.cols = torch.arange(length, device=device)
        # cos / sin of every position, computed by the model's own rotary module (any RoPE scaling it has)
        cos, sin = model.model.rotary_emb(self.k[0, 0, 0], self.cols[None])  # (1, L, D) in the cache dtype
        half = head_dim(config) // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)  # sin signed for rope()


def mlp(module, x):
    """HF's MLP, down(act(gate(x)) * up(x)); with fuse()'s joined weight, gate and up in one matmul."""
    if FUSED and hasattr(module, "gate_up"):
        gate, up = F.linear(x, *module.gate_up).chunk(2, -1)
        return module.down_proj(module.act_fn(gate) * up)
    return module(x)


def layer_step(layer, x, cos, sin, k_cache, v_cache, rows, pos, seen, attention):
    """One decoder layer on one new token a row (x: (b, H)): attention over the slots, then the MLP,
    each added to the residual stream, as HF's decoder layer."""
    x = x + attend(layer.self_attn, norm(layer.input_layernorm, x), cos, sin, k_cache, v_cache, rows, pos, seen,
                   attention)
    return x + mlp(layer.mlp, norm(layer.post_attention_layernorm, x))


@functools.cache
def compiled(fn):
    """fn compiled by torch.compile: layer_step and the sampler under COMPILE, where Inductor fuses a
    layer's norms, RoPE, cache writes, residual adds and SiLU into a few kernels between its matmuls and
    its attention, and the sampler's softmax and cumulative sum; and FlexAttention on CUDA, which only
    compiled is a fused kernel. One compilation serves every layer (their modules are its inputs) and
    every row count (dynamic shapes); on CUDA the compiled kernels are captured into the step's graph
    like any others."""
    return torch.compile(fn, dynamic=True)


def step_logits(model, slots, b, t):
    """The next-token logits (b, V) of slots[:b]'s tokens at their positions, reading cache columns
    [0, t); each row's key and value go to its column on the way. Fixed shapes, no host sync."""
    m, pos = model.model, slots.pos[:b]
    x = m.embed_tokens(slots.tok[:b])  # (b, H)
    cos, sin = slots.cos[pos][:, None], slots.sin[pos][:, None]  # (b, 1, D)
    # a row sees its own columns 0..pos, built once a step for every layer: an additive mask over [0, t), or
    # for varlen one sequence a (row, key/value head) pair, g queries each, its keys at L columns apart
    attention = attention_for(x)
    if attention == "varlen":
        _, _, Hkv, L, _ = slots.k.shape
        seqs = slots.seqs[: b * Hkv + 1]
        used = (pos + 1).int()[:, None].expand(b, Hkv).contiguous().view(-1)  # contiguous, as flash needs
        seen = seqs * (m.config.num_attention_heads // Hkv), seqs * L, used
    elif attention == "flex":
        seen = flex_mask(pos, slots.k.shape[3])
    else:
        seen = torch.zeros(b, t, dtype=x.dtype, device=x.device).masked_fill_(slots.cols[:t] > pos[:, None],
                                                                              float("-inf"))
    run = compiled(layer_step) if COMPILE else layer_step
    for i, layer in enumerate(m.layers):
        x = run(layer, x, cos, sin, slots.k[i], slots.v[i], slots.rows[:b], pos, seen, attention)
    return model.lm_head(norm(m.norm, x))


def decode_step(model, slots, b, t, sampling):
    """Feed slots[:b]'s tokens at their positions, reading cache columns [0, t); sample each row's
    next token into slots.tok and advance slots.pos. Fixed shapes, no host sync: graph-capturable."""
    logits = step_logits(model, slots, b, t)
    slots.tok[:b].copy_((compiled(sample_next) if COMPILE else sample_next)(logits, *sampling, u=slots.u[:b]))
    # a row that stopped runs on until the host looks: keep its writes inside its slot
    slots.pos[:b].add_(1).clamp_(max=slots.k.shape[3] - 1)


def capture(step, slots, pool):
    """A CUDA graph of step() over the static slots, after one warm-up run on a side stream (the
    warm-up really runs a step: token and position are put back; the keys and values it wrote are
    the ones the first replay writes again)."""
    saved = slots.tok.clone(), slots.pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    slots.tok.copy_(saved[0])
    slots.pos.copy_(saved[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph

# -----------------------------------------------------------------------------
# The pool: admit waiting sequences into free slots, decode, look, repeat


def prefill(model, prompts, dtype):
    """Keys, values (layers, Hkv, len, D) and last-position logits (V,) of each prompt, computed by
    the HF model in left-padded batches of at most PREFILL_TOKENS tokens."""
    out, i = [], 0
    while i < len(prompts):
        j, Tp = i + 1, len(prompts[i])  # the batch prompts[i:j], Tp its longest
        while j < len(prompts) and (j + 1 - i) * max(Tp, len(prompts[j])) <= PREFILL_TOKENS:
            j, Tp = j + 1, max(Tp, len(prompts[j]))
        batch = prompts[i:j]
        cache = KVCache(model.config, len(batch), Tp, dtype, model.device)
        ids, mask = left_pad(batch, model.device)  # (P, Tp)
        logits = forward_last(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)  # (P, V)
        out += [(cache.k[:, r, :, Tp - len(p) :], cache.v[:, r, :, Tp - len(p) :], logits[r])
                for r, p in enumerate(batch)]
        i = j
    return out


def cache_columns(max_len):
    """The fast engine's cache columns for sequences of up to max_len tokens: a multiple of 16, so that on
    CUDA every bucket's length is one too (SDPA's fused kernels copy a mask of other lengths to pad it)."""
    return -(-max_len // 16) * 16


def buckets(rows):
    """Row counts that get a graph: powers of two below rows, and rows itself."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, n=1, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             generator=None, max_rows=None, check_every=None, cuda_graphs=None, progress=None, stats=None):
    """
    sample.generate's contract (len(prompts) * n token lists, prompt-major, each cut after its first
    stop id or at max_new_tokens) over a pool of at most max_rows slots. check_every: decode steps
    between two looks of the host (default 8 on CUDA, 1 on the CPU); cuda_graphs: capture the decode
    step (default: on CUDA). On the CPU the buckets are exact sizes (no graphs to reuse). progress:
    called with the number of sequences that have just ended. stats: a dict to fill with where the
    time went (bench.py): seconds in prefill and in graph capture (each with its warm-up step), the graphs
    captured, the decode steps run and the rows they computed (bucket_rows, of which live_rows were
    sequences in flight); the device is synchronised around each timed part. A model of another
    architecture (supports) is sampled by the reference loop, sample.generate.
    """
    if not supports(model):
        return sample.generate(model, prompts, max_new_tokens, n=n, temperature=temperature, top_p=top_p,
                               top_k=top_k, stop_ids=stop_ids, generator=generator, max_rows=max_rows,
                               progress=progress)
    check_request(prompts, max_new_tokens, n, temperature, top_k, top_p)
    device, dtype = model.device, next(model.parameters()).dtype
    cuda = device.type == "cuda"
    drop_stale_joins(model)

    def timed(part, fn, *args):  # fn(*args), its seconds added to stats[part] when stats are asked for
        if stats is None:
            return fn(*args)
        torch.cuda.synchronize() if cuda else None
        t0 = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize() if cuda else None
        stats[part] = stats.get(part, 0.0) + time.perf_counter() - t0
        return out

    cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
    check_every = check_every or (8 if cuda else 1)
    N = len(prompts) * n  # sequence i is sample i % n of prompt i // n
    R, L = min(max_rows or N, N), cache_columns(max(map(len, prompts)) + max_new_tokens)
    sampling, stops = (temperature, top_k, top_p), {int(s) for s in stop_ids}  # ints: a tensor's hash is its id
    with torch.autocast(device.type, enabled=False):
        slots = Slots(model, R, L, check_every, dtype, device)
    row_sizes = buckets(R) if cuda_graphs else range(1, R + 1)
    graphs, pool = {}, torch.cuda.graph_pool_handle() if cuda_graphs else None

    out = [[] for _ in range(N)]
    waiting, store = deque(range(N)), {}  # store: prompt -> (k, v, logits) until all its samples have slots
    seq, pos = [-1] * R, [0] * R  # host view of each slot: its sequence (-1: free) and position

    def admit():
        """Fill free slots from the queue (lowest slots first); sequences that end at once free theirs."""
        while waiting and -1 in seq:
            free = [s for s in range(R) if seq[s] < 0][: len(waiting)]
            take = [waiting.popleft() for _ in free]
            need = [p for p in dict.fromkeys(i // n for i in take) if p not in store]
            if need:  # prefill these prompts, and the next ones in the queue while at it
                upcoming = dict.fromkeys(i // n for i in islice(waiting, PREFILL_AHEAD * n))
                need += [p for p in upcoming if p not in store and p not in need][: max(0, PREFILL_AHEAD - len(need))]
                store.update(zip(need, timed("prefill_s", prefill, model, [prompts[p] for p in need], dtype)))
            first = sample_next(torch.stack([store[i // n][2] for i in take]), *sampling, generator=generator)
            for s, i in zip(free, take):
                k, v, _ = store[i // n]
                slots.k[:, s, :, : k.shape[2]] = k
                slots.v[:, s, :, : v.shape[2]] = v
                seq[s], pos[s] = i, k.shape[2]
                if i % n == n - 1:
                    del store[i // n]
            index = torch.tensor(free, device=device)
            slots.tok[index] = first
            slots.pos[index] = torch.tensor([pos[s] for s in free], device=device)
            for s, token in zip(free, first.tolist()):
                out[seq[s]].append(token)
                if token in stops or max_new_tokens == 1:
                    seq[s] = -1
                    if progress:
                        progress(1)

    def pack():
        """Move the live rows into the lowest slots, so the decode step reads no free slot in between."""
        live = [s for s in range(R) if seq[s] >= 0]
        holes = [s for s in range(len(live)) if seq[s] < 0]
        for h, s in zip(holes, [s for s in live if s >= len(live)]):
            cols = pos[s] + 1
            slots.k[:, h, :, :cols] = slots.k[:, s, :, :cols]
            slots.v[:, h, :, :cols] = slots.v[:, s, :, :cols]
            slots.tok[h], slots.pos[h] = slots.tok[s], slots.pos[s]
            seq[h], pos[h], seq[s] = seq[s], pos[s], -1

    with torch.autocast(device.type, enabled=False):
        while True:
            admit()
            if not waiting:
                pack()
            live = [s for s in range(R) if seq[s] >= 0]
            if not live:
                break
            b = next(r for r in row_sizes if r > max(live))
            t = min(L, max(pos[s] for s in live) + check_every)
            if cuda_graphs:  # varlen and flex read each row to its own position, whatever t: one graph a row count
                t = L if attention_for(slots.k) in ("varlen", "flex") else min(L, -(-t // LENGTH_BUCKET) * LENGTH_BUCKET)
            idle = [s for s in range(b) if seq[s] < 0]
            if idle:  # free slots in the bucket run on at position 0, where they read (varlen, flex) one column
                slots.pos[idle] = 0
            step = lambda b=b, t=t: decode_step(model, slots, b, t, sampling)
            if cuda_graphs and (b, t) not in graphs:
                graphs[b, t] = timed("capture_s", capture, step, slots, pool)
            for j in range(check_every):
                if temperature > 0:
                    slots.u[:b].uniform_(generator=generator)
                graphs[b, t].replay() if cuda_graphs else step()
                slots.new[:, j] = slots.tok
            new = slots.new[:b].tolist()  # note: the one CPU-GPU sync of a window
            if stats is not None:  # decode steps, and the rows they computed: the bucket's and the live ones
                for key, k in (("steps", 1), ("bucket_rows", b), ("live_rows", len(live))):
                    stats[key] = stats.get(key, 0) + k * check_every
            for s in live:
                row = out[seq[s]]
                for token in new[s]:
                    row.append(token)
                    if token in stops or len(row) == max_new_tokens:
                        seq[s] = -1
                        if progress:
                            progress(1)
                        break
                pos[s] += check_every
    if stats is not None:
        stats["graphs"] = len(graphs)
    return out


@torch.no_grad()
def step_check(model, prompt):
    """One decode step's logits at the prompt's last token against HF's forward on the whole prompt:
    max |difference|, the logits' standard deviation, whether the argmax agrees. In bfloat16 greedy
    tokens can flip on near-ties; this says whether the step itself is right."""
    dtype = next(model.parameters()).dtype
    slots = Slots(model, 1, len(prompt), 1, dtype, model.device)
    (k, v, _), = prefill(model, [prompt[:-1]], dtype)
    slots.k[:, 0, :, :-1], slots.v[:, 0, :, :-1] = k, v
    slots.tok[0], slots.pos[0] = prompt[-1], len(prompt) - 1
    ours = step_logits(model, slots, 1, len(prompt))[0].float()
    ref = model(torch.tensor([prompt], device=model.device)).logits[0, -1].float()
    return (ours - ref).abs().max().item(), ref.std().item(), bool(ours.argmax() == ref.argmax())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The fast engine against the eager loop: the same greedy tokens, "
                                                 "both timed (bench.py --decode-step: one decode step's time)")
    parser.add_argument("--model", default="smollm2", help="hub id, folder, smollm2, tiny, random:qwen3-1.7b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="float32 (CPU) or bfloat16")
    parser.add_argument("-n", type=int, default=8, help="samples a prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest completion")
    parser.add_argument("--max-rows", type=int, default=None, help="rows in flight (default: all)")
    parser.add_argument("--attention", default=ATTENTION, choices=ATTENTIONS,
                        help="the engine's attention (default: varlen on CUDA in bfloat16, else sdpa)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer's decode step and the sampler (COMPILE)")
    args = parser.parse_args()
    ATTENTION, COMPILE = args.attention, args.compile
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    if supports(model):  # as the loop does to its sampling copy
        fuse(model)
    questions = [f"What is {a} + {b}? Think step by step." for a, b in ((3, 4), (12, 30), (7, 7), (100, 1))]
    chat = lambda q: tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True)
    prompts = [tokenizer.encode(chat(q), add_special_tokens=False) for q in questions]
    stops = sample.stop_ids(model, tokenizer)
    for name, fn in (("eager", sample.generate_eager), ("fast", generate)):
        kw = dict(max_rows=args.max_rows) if name == "fast" else {}
        fn(model, prompts[:1], 2, **kw)  # warm up
        t0 = time.perf_counter()
        greedy = fn(model, prompts, args.max_new_tokens, temperature=0, stop_ids=stops, **kw)
        sampled = fn(model, prompts, args.max_new_tokens, n=args.n, stop_ids=stops,
                     generator=torch.Generator(args.device).manual_seed(0), **kw)
        dt = time.perf_counter() - t0
        print(f"{name:>5}: {sum(map(len, greedy + sampled))} tokens in {dt:.2f} s; greedy 1: "
              f"{tokenizer.decode(greedy[0], skip_special_tokens=True)[:70]!r}")
        if name == "eager":
            reference = greedy
    where = [next((i for i, (a, b) in enumerate(zip(f, e)) if a != b), None) for f, e in zip(greedy, reference)]
    same = greedy == reference
    print(f"greedy tokens equal: {same}" + ("" if same else f" (the first differing token of each row: {where})"))
    print("one decode step's logits against HF's forward: max |difference| {:.2e}, their standard deviation "
          "{:.2f}, same argmax {}".format(*step_check(model, prompts[0])))
    if args.device == "cuda":  # a replayed graph must compute what the same step computes uncaptured
        kw = dict(max_rows=args.max_rows, temperature=0, stop_ids=stops)
        print("graphs equal no graphs:", generate(model, prompts, args.max_new_tokens, cuda_graphs=False, **kw) == greedy)
