"""
Benchmark: our sampler (sample.generate, eager and fast engines) against Hugging Face
model.generate, on the same prompts, in one run. Every column samples at temperature 1.0 with no
top-k / top-p truncation. The columns:
  HF dynamic          model.generate with its default (dynamic) cache;
  HF static+compile   model.generate with a static cache, with which generate torch.compiles its
                      decode forward (CUDA only); compile time is printed on a line of its own;
  ours eager          sample.generate, the plain reference loop;
  ours fast           engine.generate, engine.py's slot pool and CUDA graphs.
The figures of each column:
  new/row  mean new tokens a row, up to and including its stop token;
  tok/s    new tokens / wall time (prefill included);
  ms/step  wall time / decode steps, where decode steps = ceil(new tokens / R) with R the rows in
           flight (all rows, or the max_rows cap): the steps an ideal schedule needs. For rows of
           equal length it is the new-token count; on ragged rows a loop that keeps finished rows
           in its batch (HF) runs more steps than that, and shows it as a higher ms/step;
  floor    floor time / wall time, the share of the memory floor. The floor time reads each byte a
           decode step must read once, at the copy bandwidth measured at the start:
               (W * steps + kv * sum over rows of sum_{j<k} (L + j)) / bandwidth
           with W the bytes of the weights, kv the K+V bytes of one token over all layers, L a row's
           prompt length and k its new tokens. 1.0 is a perfectly memory-bound decoder.
ours fast also prints, on a line of its own, where its wall time went (engine.generate's stats):
prefill, graph capture, and the decode steps' own ms a step with the host's work between them,
the figure to set beside --decode-step's isolated step; and the floor over the decode time
alone (the floor column counts prefill and capture in the wall time).

Cases on a random-weight model (the default on CUDA: Qwen3-1.7B's shapes in bf16), random prompts:
  equal-B       B rows, each its own 250-token prompt, 256 new tokens forced (no stop ids);
  ragged 32x16  32 prompts of 250 tokens x 16 samples, up to 1024 new tokens, at most 256 rows in
                flight (HF: two calls of 16 prompts). Random weights give near-uniform logits and
                never pick EOS, so a random set of round(p V) ids stops rows instead, with p solving
                (1 - (1-p)^1024) / p = 500: ~500 new tokens a row on average, the paper's shape.
Cases on a text model (the default on the CPU: SmolLM2-135M-Instruct, float32):
  equal-B       B rows, one short question each, 64 new tokens forced;
  prefix 4x16   4 prompts of ~400 tokens, 16 samples each, 64 new tokens forced;
  ragged 8x16   8 arithmetic questions, 16 samples each, real stop ids, up to 256 new tokens.

    python bench.py                                  # CPU, SmolLM2; no static+compile column
    python bench.py --device cuda --json bench.json  # all four columns on every case
    python bench.py --device cuda --quick            # under 4 GPU minutes: ours fast on every case, the
                                                     # slow columns on one case each (columns_to_run)
    python bench.py --device cuda --cases ragged --columns "ours fast" --attention varlen
                                                     # the fast engine with flash attention over each row's own columns
    python bench.py --update [--device cuda]         # the update instead: grpo.step on paper-shaped rows,
                                                     # tokens/s, model FLOPs utilisation, peak memory
    python bench.py --update --device cuda --profile # and where the time goes: kernels, the GPU's busy share
    python bench.py --device cuda --compile [--update]  # with the decoder layers compiled (torch.compile)
    python bench.py --device cuda --decode-step 256,512  # one decode step of 256 rows reading 512 columns, as
                                                     # the engine runs it and with one part changed; its kernels
"""

import argparse
import dataclasses
import json
import math
import platform
import time

import torch
import transformers
from transformers import CompileConfig

import engine
import grpo
import sample
import scale
from models import head_dim, load_model
from run import number, numbers
from sample import left_pad, stop_ids
from scale import kv_bytes_per_token

COLUMNS = ("ours fast", "ours eager", "HF dynamic", "HF static+compile")  # run in this order: slowest last
SHAPED = ("HF static+compile", "ours fast")  # compiled or graph-captured: they specialise on shapes
STORY = ("The lighthouse keeper counted the ships that passed each night and wrote their names in a "
         "ledger that his grandmother had started. ")


@dataclasses.dataclass
class Case:
    """n samples of each prompt, up to max_new new tokens, at most max_rows rows in flight."""
    name: str
    prompts: list
    n: int
    max_new: int
    stops: tuple = ()  # none: every row is forced to max_new tokens
    max_rows: int | None = None

    @property
    def rows_in_flight(self):
        return min(self.max_rows or math.inf, len(self.prompts) * self.n)


def stop_fraction(mean, max_new):
    """p such that a row stopped with chance p each step, cut at max_new, has `mean` new tokens:
    E[min(G, max_new)] = (1 - (1-p)^max_new) / p = mean, G ~ Geometric(p) on 1, 2, ..."""
    lo, hi = 1e-9, 1.0  # the mean falls as p grows: bisect
    for _ in range(100):
        p = (lo + hi) / 2
        lo, hi = (p, hi) if (1 - (1 - p) ** max_new) / p > mean else (lo, p)
    return p


def random_cases(vocab, batches, which, max_new, seed):
    """The paper-shaped cases on random token prompts (see the top); max_new, if set, replaces 256 / 1024."""
    g = torch.Generator().manual_seed(seed)
    prompt = lambda: torch.randint(0, vocab, (250,), generator=g).tolist()
    equal = [Case(f"equal-{b}", [prompt() for _ in range(b)], 1, max_new or 256) for b in batches]
    cases = equal if "equal" in which else []
    if "ragged" in which:  # last: generate keeps its static cache at the longest length it has seen
        M = max_new or 1024
        p = stop_fraction(min(500, M / 2), M)
        stops = torch.randperm(vocab, generator=g)[: max(1, round(p * vocab))].tolist()
        prompts = [prompt() for _ in range(32)]
        cases.append(Case("ragged 32x16", prompts, 16, M, tuple(stops), max_rows=256))
    return cases


def text_cases(tok, stops, batches, which, max_new):
    """The CPU cases on chat prompts (see the top); max_new, if set, replaces 64 / 256."""
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
    encode = lambda text: tok.encode(chat(text), add_special_tokens=False)
    question = lambda i: encode(f"What is {i % 9 + 1} + {(3 * i) % 9 + 1}? "
                                "Think step by step, then give the number.")
    equal = [Case(f"equal-{b}", [question(i) for i in range(b)], 1, max_new or 64) for b in batches]
    cases = equal if "equal" in which else []
    if "prefix" in which:
        long = [encode(f"Story {i}: " + STORY * 14 + " What did he count?") for i in range(4)]
        cases.append(Case("prefix 4x16", long, 16, max_new or 64))
    if "ragged" in which:
        cases.append(Case("ragged 8x16", [question(i) for i in range(8)], 16, max_new or 256, tuple(stops)))
    return cases


def timed(fn, device):
    """(seconds, fn()), waiting for the device before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def copy_bandwidth(device, reps=10):
    """Bytes a second the device moves copying one large tensor, the read and the write both counted:
    the best of 3 rounds of `reps` copies (the first round also touches the fresh memory)."""
    src = torch.ones(2**30 if device == "cuda" else 2**28, dtype=torch.uint8, device=device)  # 1 GiB; 256 MiB
    dst = torch.empty_like(src)
    seconds = min(timed(lambda: [dst.copy_(src) for _ in range(reps)], device)[0] for _ in range(3))
    return 2 * src.numel() * reps / seconds


def weight_bytes(model):
    """Bytes of weights a decode step reads: all, less an untied input embedding (it reads B rows of that)."""
    emb = model.get_input_embeddings().weight
    untied = model.get_output_embeddings().weight is not emb
    return sum(p.nbytes for p in model.parameters()) - (emb.nbytes if untied else 0)


def decode_steps(lengths, rows_in_flight):
    """Steps an ideal schedule with rows_in_flight rows needs to draw rows of these new-token counts."""
    return math.ceil(sum(lengths) / rows_in_flight)


def floor_seconds(lengths, prompt_lengths, w_bytes, kv_bytes, rows_in_flight, bandwidth):
    """The memory floor: the weights read once a decode step, and for the j-th new token (j = 1..k) of
    a row with an L-token prompt, the K+V of the L + j - 1 tokens before it, all at `bandwidth`."""
    kv_tokens = sum(k * L + k * (k - 1) // 2 for k, L in zip(lengths, prompt_lengths))
    return (w_bytes * decode_steps(lengths, rows_in_flight) + kv_bytes * kv_tokens) / bandwidth


def hf_generate(model, prompts, max_new, n, stops, pad_id, seed, static=False):
    """model.generate on a left-padded batch; the new tokens of each row, cut after its stop.
    static: a static cache, with which generate compiles its decode forward on CUDA by itself
    (GenerationMixin._valid_auto_compile_criteria); the compile_config only makes that explicit."""
    ids, mask = left_pad(prompts, model.device, pad_id)
    T = ids.shape[1]
    torch.manual_seed(seed)
    extra = {} if stops else {"min_new_tokens": max_new}
    if static:
        extra |= {"cache_implementation": "static", "compile_config": CompileConfig()}
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=max_new, num_return_sequences=n,
                         eos_token_id=list(stops) or None, pad_token_id=pad_id, **extra)
    stops = set(stops)
    rows = out[:, T:].tolist()
    return [r[: next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


def run_column(column, model, case, pad_id, seed, stats=None):
    """The new tokens of every row of `case` (prompt-major), drawn the way `column` draws them; ours fast
    fills `stats` with where its time went (engine.generate)."""
    if column.startswith("HF"):  # HF keeps a row in flight to the end: max_rows means calls of fewer prompts
        chunk, static = max(1, case.rows_in_flight // case.n), column == "HF static+compile"
        return [r for i in range(0, len(case.prompts), chunk)
                for r in hf_generate(model, case.prompts[i : i + chunk], case.max_new, case.n, case.stops,
                                     pad_id, seed + i, static)]
    kw = dict(n=case.n, stop_ids=case.stops, generator=torch.Generator(model.device).manual_seed(seed),
              max_rows=case.max_rows)
    if column == "ours fast":
        return engine.generate(model, case.prompts, case.max_new, stats=stats, **kw)
    return sample.generate(model, case.prompts, case.max_new, **kw)


def warm_up_on_shapes(column, model, case, pad_id, device):
    """Seconds of one call on the case's shapes (one in-flight batch, the same prompt and cache lengths)
    that stops after a dozen steps, every even id being a stop."""
    if column == "HF static+compile":
        torch.compiler.reset()  # a fresh compile for this case's batch and cache shapes, timed below
    chunk, evens = max(1, case.rows_in_flight // case.n), tuple(range(0, model.config.vocab_size, 2))
    short = dataclasses.replace(case, prompts=case.prompts[:chunk], stops=evens)
    return timed(lambda: run_column(column, model, short, pad_id, seed=0), device)[0]


def columns_to_run(case, gpu, quick):
    """No static+compile off CUDA. --quick (4 GPU minutes) times ours fast on every case, the two
    host-bound columns (HF dynamic, ours eager: tens of ms a step on the host alone) on equal-256 only,
    and HF static+compile on the ragged case only (its compile alone takes most of a minute; both
    figures in docs/MEASURED.md)."""
    columns = set(COLUMNS) if gpu else set(COLUMNS) - {"HF static+compile"}
    if quick:
        ragged = case.name.startswith("ragged")
        columns &= set(SHAPED) if ragged else {"ours fast"} | ({"HF dynamic", "ours eager"}
                                                               if case.name == "equal-256" else set())
    return columns


def quick_share(case, column, quick):
    """The case a column times: under --quick, HF on the ragged case times one of its two equal calls
    (the rate of the other is the same) and the engines time all of it."""
    if quick and column.startswith("HF") and case.max_rows:
        return dataclasses.replace(case, prompts=case.prompts[: case.max_rows // case.n])
    return case


def print_row(case, column, r=None):
    """One line of the table, as soon as it is measured; '-' for a column the case skips."""
    figures = (f"{r['mean_new']:>8.1f}{r['tok_s']:>10.1f}{r['ms_step']:>9.2f}{r['floor_share']:>7.2f}" if r
               else f"{'-':>8}{'-':>10}{'-':>9}{'-':>7}")
    rows, prompt = len(case.prompts) * case.n, max(map(len, case.prompts))
    print(f"{case.name:<14}{rows:>6}{prompt:>8}  {column:<19}{figures}", flush=True)


def measure(column, model, case, pad_id, seed, w_bytes, kv_bytes, bandwidth, device):
    """Time one column on one case (after a warm-up on its shapes, for the shape-specialised columns):
    a dict of the figures the top describes."""
    warm = warm_up_on_shapes(column, model, case, pad_id, device) if column in SHAPED else None
    if column == "HF static+compile":
        print(f"  ({column}: compile and warm-up on {case.name}'s shapes took {warm:.1f} s)", flush=True)
    stats = {}
    seconds, rows = timed(lambda: run_column(column, model, case, pad_id, seed, stats), device)
    lengths = [len(r) for r in rows]
    prompt_lengths = [len(p) for p in case.prompts for _ in range(case.n)]  # prompt-major, as the rows
    steps = decode_steps(lengths, case.rows_in_flight)
    floor = floor_seconds(lengths, prompt_lengths, w_bytes, kv_bytes, case.rows_in_flight, bandwidth)
    if stats:  # ours fast: the decode steps' own time, without prefill and graph capture
        decode = seconds - stats.get("prefill_s", 0) - stats.get("capture_s", 0)
        stats["decode_ms_step"] = 1000 * decode / stats["steps"]
        stats["decode_floor_share"] = floor / decode
        print(f"  (ours fast: prefill {stats.get('prefill_s', 0):.2f} s, {stats['graphs']} graphs captured in "
              f"{stats.get('capture_s', 0):.2f} s, {stats['steps']} decode steps at {stats['decode_ms_step']:.2f} ms "
              f"with the host's work, {stats['live_rows'] / stats['steps']:.0f} live rows of "
              f"{stats['bucket_rows'] / stats['steps']:.0f} computed a step; the floor is "
              f"{stats['decode_floor_share']:.2f} of the decode time alone)", flush=True)
    return dict(case=case.name, column=column, rows=len(rows), prompt_len=max(prompt_lengths),
                mean_new=sum(lengths) / len(rows), seconds=seconds, decode_steps=steps,
                tok_s=sum(lengths) / seconds, ms_step=1000 * seconds / steps, floor_share=floor / seconds,
                warm_up_s=warm, engine=stats or None)


# -----------------------------------------------------------------------------
# --decode-step: where one decode step's time goes


def decode_step_variants(model, rows, length):
    """Milliseconds of one decode step over `rows` slots reading `length` cache columns, as the engine
    runs it and with one thing changed (another attention, argmax instead of sampling, HF's own RMSNorm
    modules, a fused model's projections unfused, COMPILE switched); rows all at position length - 9,
    then (each attention) spread evenly over positions up to there, as on ragged rows. Each with its
    logits' largest difference from the first of its positions; on CUDA each a captured graph, then the
    step's kernels. Each variant sets engine's switches (ATTENTION, FUSED, COMPILE) or swaps its norm for
    the step, and puts them back; a variant that fails is one line, and the others run. Returns a dict a
    variant that ran."""
    device, dtype = model.device, next(model.parameters()).dtype
    engine.drop_stale_joins(model)
    fused = hasattr(model.model.layers[0].self_attn, "qkv")
    slots = engine.Slots(model, rows, 2 * length, 1, dtype, device)
    slots.tok.random_(model.config.vocab_size)
    tokens, cuda = slots.tok.clone(), device.type == "cuda"
    last = length - 1 - 8
    positions = {"equal": torch.full((rows,), last, device=device),
                 "spread": torch.arange(1, rows + 1, device=device) * last // rows}
    sampled = (1.0, 0, 1.0)
    default = engine.attention_for(slots.k)
    attentions = [default] + [a for a in engine.ATTENTIONS if a != default
                              and (a != "varlen" or cuda and dtype != torch.float32)]
    variants = (*((f"{a} attention", {"ATTENTION": a}, sampled, "equal") for a in attentions),
                ("argmax, no sampling", {}, (0, 0, 1.0), "equal"),
                ("HF's RMSNorm modules", {"norm": lambda module, x: module(x)}, sampled, "equal"),
                *([("unfused projections", {"FUSED": False}, sampled, "equal")] if fused else []),
                ("torch.compile" if not engine.COMPILE else "not compiled", {"COMPILE": not engine.COMPILE}, sampled,
                 "equal"),
                *((f"{a} attention", {"ATTENTION": a}, sampled, "spread") for a in attentions))
    first, results = {}, []  # first: positions -> the logits of the first variant run at them (the engine as it runs)
    for name, changes, sampling, at in variants:
        saved = {key: getattr(engine, key) for key in changes}
        for key, value in changes.items():
            setattr(engine, key, value)
        try:
            slots.tok.copy_(tokens)
            slots.pos.copy_(positions[at])  # the same columns every time
            logits = engine.step_logits(model, slots, rows, length).float()
            first.setdefault(at, logits)
            step = lambda: engine.decode_step(model, slots, rows, length, sampling)
            run = engine.capture(step, slots, torch.cuda.graph_pool_handle()).replay if cuda else step
            for k in range(23):  # 3 to warm up, 20 timed
                if k == 3:
                    torch.cuda.synchronize() if cuda else None
                    t0 = time.perf_counter()
                slots.pos.copy_(positions[at])
                run()
            torch.cuda.synchronize() if cuda else None
        except Exception as e:  # one variant failing (a compile error: flex under Inductor's CPU code) keeps the others
            print(f"{rows} rows x {length} columns, rows {at:>6}, {name:>20}: failed ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:200]})", flush=True)
            continue
        finally:
            for key, value in saved.items():
                setattr(engine, key, value)
        results.append(dict(name=name, rows=at, ms=(time.perf_counter() - t0) / 20 * 1e3,
                            diff=(logits - first[at]).abs().max().item()))
        print("{} rows x {} columns, rows {rows:>6}, {name:>20}: {ms:6.2f} ms a step, logits within {diff:.1e} of the "
              "first's".format(rows, length, **results[-1]), flush=True)
    if cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.decode_step(model, slots, rows, length, sampled)
            torch.cuda.synchronize()
        kernels = prof.key_averages()
        print(f"{sum(e.count for e in kernels)} kernels a step")
        print(kernels.table(sort_by="self_cuda_time_total", row_limit=20))
    return results


# -----------------------------------------------------------------------------
# --update: grpo.step on paper-shaped rows


def matmul_rate(device, dtype):
    """FLOP/s of the device's square matmuls in `dtype`, measured: the best of 3 rounds (8192^3 on
    CUDA, 1024^3 on the CPU). The denominator of the model FLOPs utilisation."""
    n, reps = (8192, 10) if device == "cuda" else (1024, 3)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = min(timed(lambda: [a @ b for _ in range(reps)], device)[0] for _ in range(3))
    return 2 * n**3 * reps / seconds


def update_flops(config, prompt_lengths, completion_lengths, kl=True):
    """Model FLOPs of one grpo.step: the policy's forward and backward (3 forwards' worth) and the
    reference's forward (1 more when kl), recomputation not counted. A forward costs, a token,
    2 x the decoder's matmul weights, 4 x heads x head_dim x its context for attention (scores
    and the weighted sum; causal: the keys at its position and before, t + 1 at position t), and
    2 x hidden x vocabulary for the logits of a completion token (only those are scored)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    weights = layers * (h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size)  # q k v o, gate up down
    forward = 0
    for P, C in zip(prompt_lengths, completion_lengths):
        T = P + C
        forward += 2 * weights * T + layers * 4 * q * (T * (T + 1) // 2) + 2 * h * config.vocab_size * C
    return (3 + kl) * forward


def paper_rows(rows, prompt_len, mean_completion, max_completion, vocab, seed):
    """The loop's batch (grpo.pad_rollouts) of `rows` random rows: prompts of prompt_len +- 40%,
    completions drawn uniformly around mean_completion and cut at max_completion, half of them
    view 1; with the prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(int(0.6 * prompt_len), int(1.4 * prompt_len) + 1, (rows,), generator=g).tolist()
    C = torch.randint(mean_completion // 4, 2 * mean_completion - mean_completion // 4, (rows,), generator=g)
    C = C.clamp(1, max_completion).tolist()
    tokens = lambda k: torch.randint(0, vocab, (k,), generator=g).tolist()
    pairs = [(tokens(p), tokens(c)) for p, c in zip(P, C)]
    views = torch.tensor([int(i >= rows // 2) for i in range(rows)])
    batch = grpo.Rollouts(*grpo.pad_rollouts(pairs, pad_id=0), torch.randn(rows, generator=g), views=views)
    return batch, P, C


def head(batch, rows):
    """The first `rows` rows of a Rollouts."""
    return grpo.Rollouts(**{k: None if v is None else v[:rows] for k, v in vars(batch).items()})


def profile_update(run, batch, device):
    """run(batch) once under torch's profiler: on CUDA its kernels by time and the share of its wall
    time the GPU was busy (the rest is the host, or a sync), returned; on the CPU its ops by time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        seconds, _ = timed(lambda: run(batch), device)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6 / seconds if cuda else None
    print(f"  profiled on {len(batch.advantages)} rows: {seconds:.2f} s" +
          (f", the GPU busy {busy:.0%} of it, {sum(e.count for e in events)} kernels" if cuda else ""), flush=True)
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15), flush=True)
    return busy


def bench_update(args):
    """Time grpo.step on paper-shaped rows with each checkpointing setting (--checkpointing); print and return
    tokens/s, model FLOPs utilisation and peak memory of each."""
    import resource

    gpu = args.device == "cuda"
    name = args.model or ("random:qwen3-1.7b" if gpu else "smollm2")
    compute = torch.bfloat16 if gpu else torch.float32
    device_name = torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    model, _ = load_model(name, args.device, torch.float32)  # float32 master weights, as the loop keeps them
    ref = grpo.make_reference(model, 0.005)
    if args.compile:
        scale.compile_layers(model), scale.compile_layers(ref)
    # the paper's shape on a GPU (128 rows, 250-token prompts, ~700-token completions up to 1024);
    # a small one on the CPU, so that the whole benchmark takes under a minute
    rows, prompt_len, mean_c, max_c = (args.rows or 128, 250, 700, 1024) if gpu else (args.rows or 4, 40, 80, 128)
    batch, P, C = paper_rows(rows, prompt_len, mean_c, max_c, model.config.vocab_size, args.seed)
    batch = batch.to(args.device)
    tokens = int(batch.attention_mask.sum())
    flops = update_flops(model.config, P, C)
    rate = matmul_rate(args.device, compute)
    budget = args.micro_batch_tokens or (16384 if gpu else 512)
    print(f"model {name}, {rows} rows, {tokens} tokens ({sum(C)} completion), {flops / tokens / 1e9:.1f} GFLOP a "
          f"token; {compute} matmuls: {rate / 1e12:.3g} TFLOP/s; micro-batches of {budget} tokens", flush=True)
    autocast = torch.autocast(args.device, dtype=compute, enabled=compute != torch.float32)
    results, meta = [], dict(device=args.device, device_name=device_name, torch=torch.__version__,
                             transformers=transformers.__version__, model=name, matmul_flops=rate,
                             update_flops=flops, micro_batch_tokens=budget, compile=args.compile)
    for checkpointing in args.checkpointing:
        scale.set_checkpointing(model, checkpointing)
        setting = {0: "off", 1: "on"}.get(checkpointing, f"every {checkpointing}")
        optimizer = grpo.make_optimizer(model, lr=1e-7)
        run = lambda b: grpo.step(model.train(), optimizer, b, None, ref, micro_batch_tokens=budget)
        try:
            with autocast:
                estimate = scale.activation_estimate(model)(budget)
                if gpu or args.compile:  # kernels, the allocator's pool and the compilation, on one row, then two:
                    run(head(batch, 1))  # torch.compile specialises a size of 1, and the timed step's last
                    run(head(batch, 2))  # micro-batch may hold one row (it did: a recompilation inside the timing)
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.reset_accumulated_memory_stats()  # the retries counted below: the timed step's
                seconds, stats = timed(lambda: run(batch), args.device)
        except torch.OutOfMemoryError:  # without checkpointing a big budget may not fit: keep the other figures
            print(f"checkpointing {setting}: out of memory at {budget} tokens a "
                  "micro-batch", flush=True)
            optimizer.state.clear()  # free what the failed step allocated before the next one
            model.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.empty_cache()
            continue
        # the CPU has no allocator statistics: the process's peak resident memory (KiB on Linux)
        peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # the allocator's retries: a cudaMalloc that failed, so the cache was freed (a device sync) and tried again
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if gpu else None
        r = dict(checkpointing=checkpointing, rows=rows, tokens=tokens, seconds=seconds, tok_s=tokens / seconds,
                 tflops=flops / seconds / 1e12, mfu=flops / seconds / rate, pad_share=stats["pad_share"],
                 peak_gib=peak / 2**30, activations_estimate_gib=estimate / 2**30, alloc_retries=retries)
        results.append(r)
        print(f"checkpointing {setting:<7}: {seconds:6.2f} s  {r['tok_s']:9.0f} tok/s  "
              f"{r['tflops']:7.3g} TFLOP/s = {r['mfu']:.0%} of the matmul rate  padding {r['pad_share']:.1%}  "
              f"peak {'' if gpu else 'RSS '}{r['peak_gib']:.1f} GiB (activations estimated {estimate / 2**30:.1f})"
              + (f"  allocator retries {retries}" if gpu else ""), flush=True)
        if args.profile:
            with autocast:
                r["profiled_busy_share"] = profile_update(run, head(batch, 16 if gpu else 2), args.device)
        if args.json:  # after each, so a killed run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(meta, results=results), f, indent=1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None,
                        help="model to load (default: smollm2 on cpu, random:qwen3-1.7b on cuda)")
    parser.add_argument("--cases", default="equal,prefix,ragged", help="cases to run (prefix: text models)")
    parser.add_argument("--batches", type=numbers(int, 1), default=None,
                        help="comma-separated rows of the equal cases (default 1,8,32; 64,256,512 on cuda)")
    parser.add_argument("--max-new", type=number(int, 1), default=None,
                        help="new tokens of every case instead of its own (smoke runs)")
    parser.add_argument("--columns", default=",".join(COLUMNS), help="columns to run (default: all four)")
    parser.add_argument("--quick", action="store_true",
                        help="fit in 4 GPU minutes: ours fast on every case, each slow column on one")
    parser.add_argument("--attention", default=engine.ATTENTION, choices=engine.ATTENTIONS,
                        help="ours fast: the engine's attention (default: varlen on CUDA in bfloat16, else sdpa)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers: the fast engine's decode step (engine.COMPILE), "
                             "or with --update the update's (scale.compile_layers); compilation in the warm-up")
    # output
    parser.add_argument("--json", default=None,
                        help="write every measured figure to this file, rewritten after each case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of sampling")
    # the update instead of the samplers
    parser.add_argument("--update", action="store_true",
                        help="time grpo.step on paper-shaped rows, at each --checkpointing setting")
    parser.add_argument("--rows", type=number(int, 1), default=None,
                        help="--update: rows (default 128 on cuda, 4 on cpu)")
    parser.add_argument("--checkpointing", type=numbers(int, 0), default="1,0",
                        help="--update: the settings to time, scale.set_checkpointing's every: 1 every layer, 0 none, "
                             "2 every other layer (default 1,0)")
    parser.add_argument("--micro-batch-tokens", type=number(int, 0), default=None,
                        help="--update: token budget of a micro-batch (default, or 0: 16384 on cuda, 512 on cpu)")
    parser.add_argument("--profile", action="store_true",
                        help="--update: each setting's step again on 16 rows (cpu: 2) under torch's profiler")
    # one decode step instead
    parser.add_argument("--decode-step", type=numbers(int, 1, count=2), default=None, metavar="ROWS,COLUMNS",
                        help="time one decode step of ROWS slots reading COLUMNS cache columns, as the engine runs "
                             "it and with one part changed (engine.py's switches); on cuda its kernels")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",")]
    if unknown := [c for c in columns if c not in COLUMNS]:
        raise SystemExit(f"unknown --columns {', '.join(map(repr, unknown))}: use any of "
                         f"{', '.join(map(repr, COLUMNS))}, comma-separated")
    if args.update:
        return bench_update(args)

    gpu = args.device == "cuda"
    name = args.model or ("random:qwen3-1.7b" if gpu else "smollm2")
    dtype = "bfloat16" if gpu else "float32"
    engine.ATTENTION, engine.COMPILE = args.attention, args.compile
    device_name = torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    model, tok = load_model(name, args.device, dtype)
    if engine.supports(model):  # as the loop does to its sampling copy (HF's columns read the same weights)
        engine.fuse(model)
    if args.decode_step:
        with torch.no_grad():
            return decode_step_variants(model, *args.decode_step)
    batches = args.batches or ([64, 256, 512] if gpu else [1, 8, 32])
    if name.startswith("random:"):
        cases, pad_id = random_cases(model.config.vocab_size, batches, args.cases, args.max_new, args.seed), 0
    else:
        stops = stop_ids(model, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        cases = text_cases(tok, stops, batches, args.cases, args.max_new)
    if not cases:
        raise SystemExit(f"no case to run: --cases {args.cases!r} names none of equal, prefix (text), ragged")

    w_bytes, kv_bytes = weight_bytes(model), kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    bandwidth = copy_bandwidth(args.device)
    meta = dict(device=args.device, device_name=device_name, torch=torch.__version__,
                transformers=transformers.__version__, model=name, dtype=dtype, bandwidth=bandwidth,
                weight_bytes=w_bytes, kv_bytes_per_token=kv_bytes, args=vars(args))
    print(f"model {name} ({dtype}): weights {w_bytes / 2**30:.2f} GiB, K+V {kv_bytes / 2**10:.0f} KiB a "
          f"token; copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)

    # the shape-free columns pay their one-off costs (kernels, allocator) on one small call
    small = Case("warm-up", [cases[0].prompts[0][:8]] * 2, 1, 4)
    for column in [c for c in COLUMNS if c not in SHAPED]:
        run_column(column, model, small, pad_id, args.seed)

    print(f"{'case':<14}{'rows':>6}{'prompt':>8}  {'column':<19}{'new/row':>8}{'tok/s':>10}{'ms/step':>9}"
          f"{'floor':>7}")
    results = []
    for case in cases:
        for column in COLUMNS:
            if column not in columns_to_run(case, gpu, args.quick) or column not in columns:
                print_row(case, column)
                continue
            timed_case = quick_share(case, column, args.quick)
            try:
                results.append(measure(column, model, timed_case, pad_id, args.seed, w_bytes, kv_bytes, bandwidth,
                                       args.device))
            except Exception as e:  # one column failing (a compile error, out of memory) keeps the others
                print(f"  ({column} on {case.name} failed: {type(e).__name__}: {str(e)[:300]})", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            print_row(timed_case, column, results[-1])
            if args.json:  # after every column, so a killed run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(meta, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
