"""
Running at scale: what lets the loop's step run on a GPU and over torchrun's ranks, apart from the method.

  torchrun       a process group whose ranks each take their own questions (start_ranks), and every rank's
                 numbers gathered to rank 0 (gather); grpo.step sums the gradients over the ranks
  sampling copy  rollouts are drawn from a copy in the compute dtype (bfloat16 on a GPU), refreshed in
                 place after every update; the float32 master weights stay with AdamW
  memory         the KV budget (how many rows the fast engine keeps in flight), the update's token budget
                 (--micro-batch-tokens), and the plan printed at start-up: what stays resident, then the
                 larger of the KV cache and the update's activations (measured on the model), against the
                 device's memory; AdamW's moments allocated up front; gradient checkpointing
  compile        --compile: each decoder layer through torch.compile, in the update and the fast engine
  FSDP2          --fsdp: the policy's weights, gradients and AdamW state, and the reference, sharded over the
                 ranks, each decoder layer a unit; every rank samples with a whole copy

prepare() applies them to the loop's model in the order they need.
"""

import copy
import datetime
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import engine
import grpo
from models import cast_weights, check_device, head_dim

# -----------------------------------------------------------------------------
# torchrun


def start_ranks(args):
    """(ddp, rank, world, device): under torchrun a process group (NCCL on GPUs, else gloo) in which each
    rank takes its own questions and grpo.step sums gradients over ranks, each rank on its own GPU."""
    ddp = "RANK" in os.environ
    if args.fsdp and not ddp:
        raise SystemExit("--fsdp shards the model over torchrun's ranks: run it under torchrun")
    if ddp:  # rank 0 saves alone while the others wait, and evaluations are long: over NCCL's 10 minutes
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo",
                                timeout=datetime.timedelta(hours=3))
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device == "cuda" and ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)  # FSDP's device mesh and NCCL take the current device
    return ddp, rank, world, device


def ranks():
    """(ddp, master): whether this process is one of torchrun's ranks, and whether it is rank 0, which alone
    writes the run's files and draws the progress bars."""
    ddp = dist.is_initialized()
    return ddp, not ddp or dist.get_rank() == 0


def work_bar(total, desc, unit):
    """A progress bar for a part of a step (sampling, the update), on rank 0 only, gone when done."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not ranks()[1])


def gather(obj, world):
    """Every rank's obj, in rank order (a list of one element without torchrun)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs

# -----------------------------------------------------------------------------
# The model, set up to run at scale


def prepare(model, ref_model, args, world, device, compute_dtype, master=True):
    """The loop's model set up to run at scale, in the order each part needs: checkpointing
    (--grad-checkpointing); the sampling copy, its projections joined for the fast engine (engine.fuse);
    the memory budgets, with the plan's line printed (a plan that will not fit stops the run here, before
    anything is written); the FSDP2 shards (--fsdp); the compiled layers
    (--compile, after the copies, which would call these layers, and after the sharding: compile_layers).
    Returns (policy, sampler, ref_model): policy is model, or under --fsdp its sharded grpo.Scorer (and
    ref_model the reference's); `model` keeps holding the weights, which AdamW steps."""
    if args.grad_checkpointing:
        set_checkpointing(model, args.grad_checkpointing)
    # rollouts are drawn from a copy in the compute dtype (the policy itself when that is float32 and
    # whole), refreshed after every update; its KV cache is freed after each call, so the update reuses
    # that memory
    sampler = sampling_copy(model, compute_dtype, separate=args.fsdp).to(device)
    args.engine = args.engine or ("fast" if device.startswith("cuda") else "eager")
    if sampler is not model and args.engine == "fast" and engine.supports(sampler):
        # q / k / v and gate / up weights joined (the sync's copies write through): 4 matmuls a layer for 7
        engine.fuse(sampler)
    plan, fits = set_budgets(args, model, sampler, ref_model, world, device, compute_dtype)
    if not fits:
        raise SystemExit(plan)
    if master:
        print(plan)
    policy, ref_layers = model, ref_model
    if args.fsdp:  # this rank keeps a shard of the weights (and so of AdamW's state); `model` holds them
        policy = shard(model)
        ref_model = ref_model and shard(ref_model)
    if args.compile:
        for m in (model, ref_layers):
            if m is not None:
                compile_layers(m)
        engine.COMPILE = True
        if master:
            print("--compile: the first step compiles the decoder layers as it meets them (tens of seconds)")
    return policy, sampler, ref_model


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


def set_checkpointing(model, every):
    """Gradient (activation) checkpointing of a Hugging Face model's decoder layers 0, every, 2 every, ...:
    every = 1 (or True) checkpoints all of them, 0 (or False) none, 2 every other one, which recomputes
    half the forward and keeps about half the activations: the recomputation that is needed to fit,
    and no more. transformers >= 5.2x names the switch activation_checkpointing_*, older 5.x
    gradient_checkpointing_*; both read each layer's own flag, set here."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{name}_checkpointing_{'enable' if every else 'disable'}")()
    for i, layer in enumerate(model.get_decoder().layers):
        layer.gradient_checkpointing = bool(every) and i % every == 0


def compile_layers(model):
    """torch.compile each decoder layer's forward in place (regional compilation, the loop's --compile): in
    forward and backward Inductor fuses a layer's norms, RoPE, SiLU, residual adds and autocast's casts
    between its matmuls. Module hooks (FSDP's) run in __call__, outside, in eager code; checkpointing is
    compiled with the layer where transformers puts it in forward (5.2x) and stays outside where it wraps
    __call__ (5.17): both tested. One compilation serves every layer and every micro-batch shape (dynamic
    shapes) of two rows or more, and another one a micro-batch of one row (torch specialises a size of 1);
    the recomputation under checkpointing and a no-grad forward (the reference) get their own.
    The gradient is the eager one up to rounding (tests/test_scale.py). Call it after copying model (the
    reference, the sampling copy): a copy would call the original's layers; and after shard(): FSDP2
    gives each layer a subclass, whose forward transformers 5.2x wraps again, and only the outermost
    wrapper checkpoints, so a forward compiled before would run with no checkpointing. Returns model."""
    for layer in model.get_decoder().layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return model

# -----------------------------------------------------------------------------
# Memory


def kv_bytes_per_token(config, dtype):
    """Bytes of keys and values one token of one sequence holds, over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype.itemsize


def rows_for_budget(model, budget_gb, max_len):
    """How many sequences of up to max_len tokens (prompt + completion) a KV cache of budget_gb holds, at
    the fast engine's cache_columns(max_len) a row. (Its prefill also holds the keys and values of at
    most engine.PREFILL_TOKENS prompt tokens for a moment, outside the budget.)"""
    per_row = kv_bytes_per_token(model.config, next(model.parameters()).dtype) * engine.cache_columns(max_len)
    return max(1, int(budget_gb * 2**30 // per_row))


def default_kv_budget_gb(device, reserve_gb=0.0):
    """Half of the device memory free now once reserve_gb (what the run will still allocate, e.g. AdamW's
    state and the gradients) is set aside; None on the CPU, where every row is in flight."""
    if torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(1.0, (free / 2**30 - reserve_gb) / 2)


def max_rows(sampler, max_len, args, default):
    """Rows in flight: as many rows of max_len tokens as --kv-cache-gb holds, else `default`."""
    return rows_for_budget(sampler, args.kv_cache_gb, max_len) if args.kv_cache_gb else default


def resident_bytes(model, sampler, ref_model, args, world):
    """What a rank keeps through the run, by part: float32 weights, gradients, AdamW's two moments and
    the reference (under --fsdp this rank's share of each), and the sampling copy."""
    shards = world if args.fsdp else 1
    P = sum(p.nbytes for p in model.parameters())
    return {"weights": P / shards, "gradients": P / shards, "AdamW": 2 * P / shards,
            "sampling copy": 0 if sampler is model else sum(p.nbytes for p in sampler.parameters()),
            "reference": 0 if ref_model is None else P / shards}


def activation_estimate(model, chunk=1024):
    """bytes(tokens): what the update holds for backward at a micro-batch of `tokens` row x column
    slots. Measured once, here: the tensors autograd saves in the scoring forward of one row (128 and
    256 tokens: a constant plus a cost a token, weights excluded, autocast's bfloat16 weight copies
    included), plus, when the last layer is checkpointed, one layer's activations rebuilt in backward
    (backward rebuilds one checkpointed layer at a time; when layers after it keep their activations,
    those are freed by then, before it is rebuilt); the function adds a logits chunk (float32, chunk x
    vocabulary, three of them alive while its log-softmax is differentiated)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(n):
        """Bytes autograd saves in a forward of one row of n tokens: each storage once (views share
        one), the weights' not at all."""
        seen, sizes = set(own), []

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                sizes.append(t.untyped_storage().nbytes())
            return t
        ids = torch.zeros(1, n, dtype=torch.long, device=model.device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(sizes)

    def per_token_and_fixed():
        a, b = saved(128), saved(256)
        return (b - a) / 128, a - (b - a)

    layers = model.get_decoder().layers
    was_training, checkpointed = model.training, [layer.gradient_checkpointing for layer in layers]
    model.train()
    try:
        per_token, fixed = per_token_and_fixed()
        rebuilt = 0.0
        if checkpointed[-1]:  # the first layer backward reaches is rebuilt at full size, on top of the rest
            for layer in layers:
                layer.gradient_checkpointing = False
            full, _ = per_token_and_fixed()
            rebuilt = (full - per_token) / sum(checkpointed)
    finally:
        model.train(was_training)
        for layer, flag in zip(layers, checkpointed):
            layer.gradient_checkpointing = flag
    vocab = model.config.vocab_size
    return lambda tokens: int(fixed + (per_token + rebuilt) * tokens + 3 * min(chunk, tokens) * vocab * 4)


def memory_plan(parts, activations_at, sampler, args, world, device, gathered=0):
    """The step's memory, estimated before the first one: (a line to print, whether it fits). What stays
    resident (`parts`, from resident_bytes), plus the larger of the rollouts' KV cache and the update's
    activations (activations_at, from activation_estimate; the sampler frees its cache before the
    update) with, under --fsdp, the weights and gradients FSDP holds whole (gathered, from
    gathered_bytes). A row longer than --micro-batch-tokens is a micro-batch of its own, so the
    widest one holds max(budget, the longest row) tokens. The KV cache: the budget, but at least one whole
    row; with no budget (the CPU) every row of a call: one view's rollouts, or an evaluation's batch."""
    longest = args.max_prompt_tokens + args.max_new_tokens
    per_token = kv_bytes_per_token(sampler.config, next(sampler.parameters()).dtype)
    rollouts = per_token * args.batch_size // world * args.n_rollouts * longest
    evals = 0 if args.no_eval else (per_token * args.batch_size * args.eval_n
                                    * (args.max_prompt_tokens + (args.eval_max_new_tokens or args.max_new_tokens)))
    kv = (max(args.kv_cache_gb * 2**30, per_token * engine.cache_columns(longest)) if args.kv_cache_gb
          else max(rollouts, evals))
    tokens = max(args.micro_batch_tokens, longest) if args.micro_batch_tokens else args.micro_batch * longest
    activations = activations_at(tokens)
    total = sum(parts.values()) + max(kv, activations + gathered)
    if device.startswith("cuda"):
        have, where = torch.cuda.get_device_properties(device).total_memory, device
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the CPU (RAM)"
    gib = lambda x: f"{x / 2**30:.1f}"
    line = ("memory (GiB, estimated): " + " + ".join(f"{k} {gib(v)}" for k, v in parts.items() if v) +
            f", then the larger of the KV cache {gib(kv)} and the update's activations at {tokens} tokens a "
            f"micro-batch {gib(activations)}" +
            (f" plus FSDP's gathered units {gib(gathered)}" if gathered else "") +
            f": {gib(total)} of {gib(have)} on {where}")
    if total <= have:
        return line, True
    # 0 none, 1 every layer, N every N-th: checkpointing more layers saves memory
    every = args.grad_checkpointing
    if every == 0:
        switches = ["--grad-checkpointing (or 2, every other layer)"]
    else:
        switches = [] if every == 1 else ["--grad-checkpointing" +
                                          (f" {every // 2}" if every // 2 > 1 else "")]
    if not args.micro_batch_tokens:
        switches.append("a lower --micro-batch")
    elif args.micro_batch_tokens > longest:  # at or below the longest row, a lower budget saves nothing
        switches.append("a lower --micro-batch-tokens")
    if args.kv_cache_gb:
        switches.append("a lower --kv-cache-gb")
    else:  # every row of a call in flight: fewer or shorter rows
        switches.append("a lower --batch-size, --n-rollouts or --max-new-tokens" +
                        (" (or --eval-n, --eval-max-new-tokens)" if evals > rollouts else ""))
    switches += ["--fsdp under torchrun"] if not args.fsdp else []
    return line + ". It will not fit: try " + ", ".join(switches), False


def set_budgets(args, model, sampler, ref_model, world, device, compute_dtype):
    """The defaults of the two memory budgets, set in args where not given, and memory_plan's (line, fits)
    for them. --kv-cache-gb: on CUDA half the free memory, less what is not on the device yet (gradients,
    AdamW, and under --fsdp the shards). --micro-batch-tokens: 16,384 on CUDA, halved until the estimate
    fits or reaches the longest row (0 on the CPU: micro-batches of --micro-batch rows)."""
    auto_budget = args.micro_batch_tokens is None and device.startswith("cuda")
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 16384 if device.startswith("cuda") else 0
    parts = resident_bytes(model, sampler, ref_model, args, world)
    if args.kv_cache_gb is None:
        to_come = parts["gradients"] + parts["AdamW"] + (parts["weights"] + parts["reference"]
                                                         if args.fsdp else 0)
        args.kv_cache_gb = default_kv_budget_gb(device, reserve_gb=to_come / 2**30)
    # measured once, where the model is now (under --fsdp, the CPU), in the update's compute dtype
    with torch.autocast(model.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        activations_at = activation_estimate(model)
    gathered = gathered_bytes(model) if args.fsdp else 0
    plan, fits = memory_plan(parts, activations_at, sampler, args, world, device, gathered)
    longest = args.max_prompt_tokens + args.max_new_tokens  # halved below it, it saves nothing (memory_plan)
    while auto_budget and not fits and args.micro_batch_tokens // 2 >= max(1024, longest):
        args.micro_batch_tokens //= 2
        plan, fits = memory_plan(parts, activations_at, sampler, args, world, device, gathered)
    return plan, fits


def peak_gib(device):
    """GiB of tensors the CUDA device held at most since the last call, which starts a new count; None
    elsewhere."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def allocate_state(optimizer):
    """AdamW's moments allocated now, as zeros, where torch allocates them in the first step: at start-up
    they take their place in device memory beside the weights, so a run that cannot hold them stops before
    it samples, and the caching allocator does not carve them out of the blocks the first step's KV cache
    freed (there they would pin those blocks, and the next step's cache would need new ones). One step at
    learning rate 0 on zero gradients (the weights stay as they are: decay multiplies them by 1, the update
    adds 0), then each step count set back to 0, so the first real step is the one a fresh AdamW takes."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p in params:
        p.grad = None
        optimizer.state[p]["step"].zero_()

# -----------------------------------------------------------------------------
# FSDP2: models whose float32 weights, gradients and AdamW state do not fit on one GPU


def shard(model):
    """Shard model over the ranks with FSDP2: each decoder layer one unit, the rest (embeddings,
    final norm, lm_head, tied or not) the root's, a grpo.Scorer of the model, which is returned. The
    model's weights become DTensors holding this rank's shard; an optimiser built on them keeps
    AdamW's state sharded too. FSDP averages the gradients over ranks, so grpo.accumulate_gradients
    multiplies each rank's loss by the world size: its share of the global mean is then summed.
    (set_gradient_divide_factor(1) would say the same, but gloo lacks the reduction it uses.)
    The root reshards after its forward too: FSDP2 keeps a root whole after forward by default, for
    the backward that follows, and the reference runs forward only, so its root (embeddings and
    lm_head, 5 GB at 8B in float32) would stay whole on every rank for good."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(grpo.Scorer(model), reshard_after_forward=True)


def gathered_bytes(model):
    """What a rank holds whole besides its shards while shard(model) runs forward and backward: the
    root's weights (embeddings, final norm, lm_head: whole for the whole pass, as the root's forward
    is the model's) and their gradients until they are reduced, and two decoder layers with theirs
    (the one at work and the next, prefetched). Of the model before it is sharded."""
    layers = model.get_decoder().layers
    in_layers = {id(p) for p in layers.parameters()}
    root = sum(p.nbytes for p in model.parameters() if id(p) not in in_layers)
    return 2 * root + 2 * 2 * max(sum(p.nbytes for p in layer.parameters()) for layer in layers)
