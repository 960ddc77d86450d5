"""
GRPO, the policy update of one Self-Harmony step (METHOD.md step 6).

Each rollout i of a group (one question, one view) has a reward r_i and gets the advantage
    A_i = (r_i - mean(r)) / (std(r) + eps)
shared by all its completion tokens t. The loss per completion token is
    l_t = -min(rho_t A, clip(rho_t, 1 - eps_clip, 1 + eps_clip) A) + beta k3_t
    rho_t = exp(logp_t - logp_old_t),   k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1
and the step loss is each view's token-mean over the whole step, the two added,
    L = sum over views v of (1 / N_v) sum of l_t over the completion tokens t of view v,
with N_v the count of view v's completion tokens in the whole step (all micro-batches, all
ranks), fixed before the first backward. This rule is this project's: the release (its
dp_actor) takes each view's token-mean within each micro-batch (8 rows a GPU), adds the two,
and divides by the number of micro-batches, so its weights depend on how the step is split;
the whole-step rule does not, and equals the release's when every micro-batch holds as many
completion tokens of a view. One joint token-mean over both views ("token-mean") would give
the fused view, whose responses run about twice as long, ~2/3 of the weight instead of 1/2,
and about half the gradient the grad-norm clip sees; it and "seq-mean" stay selectable.

As in the release: a token-mean per view, k3 KL as a loss term (not folded into the reward),
no entropy bonus, the unbiased std of torch.std, and ONE optimiser update per batch. So
logp_old is the policy itself: rho = 1 in value and the clip never fires at the first and only
pass. We use logp_old = logp.detach(), which has the same value and gradient as the release's
separate no-grad forward and saves that forward; fill Rollouts.old_logp to run several passes.
Options: scale="none" drops the std (Dr. GRPO); agg="token-mean" is one token-mean over both
views; agg="seq-mean" averages within each sequence first; kl_coef=0 keeps no reference model.
Departures: verl, under the release, clamps k3 to [-10, 10], dual-clips negative advantages at
rho = 3 and adds 1e-8 to each token-mean's denominator (a later verl also clamps log rho to
[-20, 20]; the release's does not); we keep the plain formulas: at rho = 1 and a small KL none
of those act, and the 1e-8 is below float32's resolution of any real token count.

At scale: micro-batches by a token budget (rows sorted by length, each moved to column 0, so a
micro-batch pads only its spread of lengths); under torchrun each rank's loss carries the whole
step's denominators and the gradients are summed over the ranks; scale.py shards the model with
FSDP2 (--fsdp) into a Scorer, checkpoints and compiles its layers, and estimates the update's memory.

    python grpo.py     # a tiny random model learns to start its answer with one token
"""
import copy
import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def token_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                   chunk=1024):
    """logp[b, t] = log softmax(logits(x_<t) / temperature)[x_t] on completion tokens, else 0.

    Aligned with input_ids: entry t scores token t given the tokens before it, so position 0
    (no context) can't be a completion token. Positions come from the attention mask, as in the
    sampler. Logits exist only for completion rows, `chunk` rows at a time: a float32 (B, T, V)
    at V = 151k and T = 4k would be 2.5 GB a sequence.
    """
    assert not completion_mask[:, 0].any(), "token 0 has no context to be scored from"
    # Rows that all start at column 0 (micro-batches by a token budget) are scored as an unpadded batch, no mask
    # and positions 0, 1, ...: causal attention keeps the padding after a row's end out of its real tokens.
    # SDPA then runs plain causal attention (flash on CUDA, grouped queries without copying K and V) instead of
    # a kernel reading a (B, 1, T, T) mask. (A mask of None with positions given would not do: transformers
    # reads packed sequences from the positions and builds a mask again.)
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        masks = {}
    else:
        masks = dict(attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0))
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False, **masks).last_hidden_state  # (B, T, H)
    scored = completion_mask[:, 1:].bool()  # (B, T-1) targets x_1..x_{T-1}
    h = hidden[:, :-1][scored]  # (N, H) the state that predicts each completion token
    targets = input_ids[:, 1:][scored]  # (N,)
    lm_head = model.get_output_embeddings()  # may share its weight with the embeddings

    def chunk_logp(h, y):
        logits = lm_head(h)  # (n, V), in float32 at least (float64 stays: the tests' references)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1:  # x / 1.0 == x: a pass over (n, V) saved in forward, recompute and backward
            logits = logits / temperature
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (n,)

    parts = []
    for i in range(0, len(targets), chunk):
        h_i, y_i = h[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled():
            # recompute the chunk's logits in backward rather than keep all of them alive
            parts.append(checkpoint(chunk_logp, h_i, y_i, use_reentrant=False))
        else:
            parts.append(chunk_logp(h_i, y_i))
    # no token to score (a micro-batch of empty completions): an empty logp still in the graph, so that the
    # backward runs, and under FSDP its collectives with the other ranks'
    logp = torch.cat(parts) if parts else h[:, 0].to(torch.promote_types(h.dtype, torch.float32))  # (N,)
    out = torch.zeros(input_ids.shape, dtype=logp.dtype, device=input_ids.device)  # (B, T)
    return out.masked_scatter(completion_mask.bool(), logp)


def group_advantages(rewards, group_size, eps=1e-6, scale="std"):
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each contiguous group of group_size.

    std is torch.std, the unbiased one (divides by G - 1), as the release (verl) does.
    scale="none" gives A_i = r_i - mean(r) (Dr. GRPO). With scale="std", multiplying a
    group's rewards by c > 0 leaves A unchanged up to eps (c (r - m) / (c s + eps) against
    (r - m) / (s + eps)): a per-question factor such as the diversity penalty (1 - w_d P_div)
    cancels here, to within a relative ~eps / s.
    """
    assert group_size > 1, "an advantage needs a group to compare against"
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (n_groups, G)
    A = r - r.mean(-1, keepdim=True)
    if scale == "std":
        A = A / (r.std(-1, keepdim=True) + eps)
    else:
        assert scale == "none", scale
    return A.view(-1)


def count_flat_groups(rewards, group_size):
    """Number of groups whose rewards are all equal: their advantages are 0, no gradient."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (n_groups, G)
    return int((r == r[:, :1]).all(-1).sum())


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.005,
              agg="view-token-mean", n_tokens=None, n_seqs=None, views=None, n_view_tokens=None):
    """Clipped surrogate + beta k3 over completion tokens (formulas in the module docstring).

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,); views: (B,) 0 or 1, each row's view
    (None: all view 0). ref_logp may be None if kl_coef == 0. "view-token-mean": sum_v sum_{t in v}
    l_t / n_view_tokens[v]; "token-mean": sum_t l_t / n_tokens; "seq-mean": sum_b mean_t(l_bt) /
    n_seqs. The denominators default to this batch's, and must be the whole step's under
    accumulation. Returns (loss, stats) with stats averaged over this batch's completion tokens.
    """
    mask = mask.bool()
    A = advantages[:, None].to(logp.dtype)  # (B, 1)
    # select, don't multiply: padding may hold anything, and 0 * inf is NaN
    log_rho = torch.where(mask, logp - old_logp, 0.0)  # (B, T)
    rho = log_rho.exp()
    rho_clipped = rho.clamp(1 - clip_eps, 1 + clip_eps)
    pg = -torch.minimum(rho * A, rho_clipped * A)  # (B, T)
    per_token = pg
    if kl_coef != 0:
        d = torch.where(mask, ref_logp - logp, 0.0)  # (B, T)
        k3 = d.exp() - d - 1
        per_token = pg + kl_coef * k3
    per_token = torch.where(mask, per_token, 0.0)  # (B, T)

    if agg == "view-token-mean":
        views = torch.zeros(len(mask), dtype=torch.long, device=mask.device) if views is None else views
        if n_view_tokens is None:
            n_view_tokens = view_token_counts(mask, views)
        loss = (per_token.sum(-1) / n_view_tokens[views].clamp(min=1)).sum()
    elif agg == "token-mean":
        loss = per_token.sum() / (mask.sum() if n_tokens is None else n_tokens)
    elif agg == "seq-mean":
        seq_mean = per_token.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        loss = seq_mean.sum() / (mask.shape[0] if n_seqs is None else n_seqs)
    else:
        raise ValueError(agg)

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac": ((rho_clipped * A < rho * A) & mask).sum().item() / n.item(),
            "ratio": rho[mask].sum().item() / n.item(),
            "kl": (k3[mask].sum().item() / n.item()) if kl_coef != 0 else 0.0,
        }
    return loss, stats


def pad_rollouts(pairs, pad_id):
    """(input_ids, attention_mask, completion_mask), each (N, P + C), of N (prompt, completion) token lists:
    row i is prompt i left-padded to the longest prompt P, then completion i right-padded to the longest
    completion C. The masks come from lengths, never from token values (the pad id may be EOS)."""
    P, C = max(len(p) for p, _ in pairs), max(len(c) for _, c in pairs)
    ids = torch.full((len(pairs), P + C), pad_id, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(pairs):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, P - len(p) : P + len(c)] = 1
        completion[i, P : P + len(c)] = 1
    return ids, attention, completion


@dataclass
class Rollouts:
    """A padded batch of prompt+completion rows, one rollout a row, ready for step()."""
    input_ids: torch.Tensor  # (B, T) prompt left-padded, completion right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens, from lengths (EOS included)
    advantages: torch.Tensor  # (B,)
    old_logp: torch.Tensor | None = None  # (B, T) None: the policy at the first pass
    ref_logp: torch.Tensor | None = None  # (B, T) None: computed by step() from ref_model
    views: torch.Tensor | None = None  # (B,) 0 or 1: the view of each row; None: all one view

    def micro_batches(self, size=None, tokens=None):
        """Micro-batches of the rows, each exact: its loss terms are those rows' terms in the whole batch.

        tokens None: row slices of `size` in order, less the columns that are padding in every row
        (such a column is attended by no one and leaves the cumsum positions unchanged).
        tokens: rows sorted by length, longest first, each moved to start at column 0 (positions count
        real tokens only, so its scores do not change), grouped so that rows x the longest <= tokens
        and at most `size` rows (a row longer than `tokens` goes alone): a micro-batch then pads only
        the spread of lengths within it, and the first one holds the longest rows, so a budget that
        is too big fails at once.
        """
        if tokens is None:
            for i in range(0, len(self.advantages), size):
                rows = torch.arange(i, min(i + size, len(self.advantages)))
                keep = self.attention_mask[rows].bool().any(0)  # (T,)
                yield self._take(rows, lambda x: x[rows][:, keep])
            return
        length = self.attention_mask.sum(-1)  # (B,) real tokens a row: prompt + completion
        order = length.argsort(descending=True, stable=True).tolist()
        size = size or len(order)
        while order:
            width = int(length[order[0]])
            n = max(1, min(size, tokens // width, len(order)))
            rows, order = torch.tensor(order[:n]), order[n:]
            yield self._take(rows, self._left_aligner(rows, width))

    def _left_aligner(self, rows, width):
        """x -> x[rows] with each row's real tokens (contiguous: prompt left-padded, completion
        right-padded) moved to columns 0 .. its length - 1, zeros after, `width` columns."""
        mask = self.attention_mask[rows]  # (b, T)
        first = mask.argmax(-1)  # (b,) the first real column (argmax returns the first maximum)
        cols = torch.arange(width, device=mask.device)
        src = (first[:, None] + cols).clamp(max=mask.shape[1] - 1)  # (b, width)
        real = cols < mask.sum(-1, keepdim=True)  # (b, width)
        return lambda x: torch.where(real, x[rows].gather(1, src), 0)

    def _take(self, rows, cut_2d):
        """A Rollouts of `rows`, the (B, T) fields cut by cut_2d."""
        cut = lambda x: None if x is None else cut_2d(x) if x.dim() == 2 else x[rows]
        return Rollouts(*(cut(getattr(self, f.name)) for f in fields(self)))

    def to(self, device):
        """The same rollouts on `device`."""
        return Rollouts(*(None if x is None else x.to(device) for x in (getattr(self, f.name) for f in fields(self))))


def view_token_counts(completion_mask, views):
    """(2,) completion tokens of view 0 and of view 1 (views: (B,) 0 or 1, or None: all view 0)."""
    per_row = completion_mask.sum(-1).float()  # (B,)
    if views is None:
        views = torch.zeros(len(per_row), dtype=torch.long, device=per_row.device)
    return torch.zeros(2, device=per_row.device).index_add_(0, views, per_row)


def make_reference(model, kl_coef):
    """A frozen copy of the starting policy for the k3 term; None (no memory) when kl_coef == 0."""
    if kl_coef == 0:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def make_optimizer(model, lr=3e-6, weight_decay=0.01, betas=(0.9, 0.999)):
    """AdamW on every trainable weight; the release decays all of them, norms and biases too."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=lr, weight_decay=weight_decay, betas=betas)


def lr_schedule(step, total_steps, warmup_frac=0.1):
    """lr multiplier: linear warm-up over warmup_frac of the steps, then cosine to 0 (make_scheduler).
    The release's warm-up starts at 0, which wastes the first batch; ours starts at 1/warmup.
    """
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, total_steps, warmup_frac=0.1):
    """The optimiser's learning rate set by lr_schedule at each of the run's total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_schedule(s, total_steps, warmup_frac))


def accumulate_gradients(model, rollouts, micro_batch_size, ref_model=None, clip_eps=0.2,
                         kl_coef=0.005, temperature=1.0, agg="view-token-mean", micro_batch_tokens=None,
                         progress=None):
    """Backward of the step's loss, micro-batch by micro-batch, into model's .grad. progress: called with
    each micro-batch's number of rows once its backward is done (a progress bar's update).

    Each micro-batch divides by the whole step's denominator (fixed before the first
    backward), so the sum of their gradients is the gradient of the full batch, however split:
    micro_batch_size rows each in order, or with micro_batch_tokens by length (Rollouts.micro_batches).
    model and ref_model may be Scorers sharded by shard() (FSDP2).
    """
    n_tokens = rollouts.completion_mask.sum().float()
    n_seqs = torch.tensor(float(len(rollouts.advantages)), device=n_tokens.device)
    n_view_tokens = view_token_counts(rollouts.completion_mask, rollouts.views)  # (2,)
    if dist.is_initialized():
        # the global counts, so that each rank's loss is its share of the global mean and
        # summing gradients over ranks (step() or FSDP does) gives the global token-mean gradient
        for count in (n_tokens, n_seqs, n_view_tokens):
            dist.all_reduce(count)
    micro = list(rollouts.micro_batches(micro_batch_size, micro_batch_tokens))
    weight = [1.0] * len(micro)
    if isinstance(model, Scorer) and dist.is_initialized():
        # FSDP gathers each layer's weights in every forward and backward, as a collective: every rank
        # runs as many micro-batches as the busiest one, the extra ones (a repeat) with weight 0.
        # And FSDP averages gradients over ranks where we sum them: the world size undoes its division
        most = torch.tensor(len(micro), device=n_tokens.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        extra = int(most) - len(micro)
        micro, weight = micro + micro[-1:] * extra, [float(dist.get_world_size())] * len(micro) + [0.0] * extra
    score = model if isinstance(model, Scorer) else functools.partial(token_logprobs, model)
    score_ref = ref_model if isinstance(ref_model, Scorer) else functools.partial(token_logprobs, ref_model)
    totals = {"loss": 0.0, "clip_frac": 0.0, "ratio": 0.0, "kl": 0.0}
    n_local, slots = rollouts.completion_mask.sum().item(), 0
    for mb, w in zip(micro, weight):
        args = (mb.input_ids, mb.attention_mask, mb.completion_mask, temperature)
        logp = score(*args)  # (b, t)
        old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
        ref_logp = mb.ref_logp
        if kl_coef != 0 and ref_logp is None:
            assert ref_model is not None, "kl_coef > 0 needs ref_model or Rollouts.ref_logp"
            with torch.no_grad():
                ref_logp = score_ref(*args)  # (b, t)
        loss, stats = grpo_loss(logp, old_logp, ref_logp, mb.advantages, mb.completion_mask,
                                clip_eps, kl_coef, agg, n_tokens, n_seqs, mb.views, n_view_tokens)
        (loss * w).backward()
        real = w != 0  # weight 0: a repeat that only keeps FSDP's collectives in step
        totals["loss"] += loss.item() * real
        share = real * mb.completion_mask.sum().item() / max(1, n_local)
        for k in ("clip_frac", "ratio", "kl"):
            totals[k] += stats[k] * share
        slots += mb.attention_mask.numel() * real
        if progress and real:
            progress(len(mb.advantages))
    # the share of the forward's row x column slots that were padding
    totals["pad_share"] = 1 - rollouts.attention_mask.sum().item() / max(1, slots)
    return totals


def step(model, optimizer, rollouts, micro_batch_size, ref_model=None, scheduler=None,
         max_grad_norm=1.0, **loss_kwargs):
    """One optimiser update on a batch of rollouts; returns loss, grad norm, clip frac, KL, lr, skipped,
    pad share.

    Under torchrun pass the bare model, not a DDP wrapper: the scoring forward goes through
    model.get_decoder(), and this function sums the gradients over ranks itself (under FSDP, pass
    the Scorer of shard(): its backward sums them). A NaN or inf gradient norm (summed over ranks,
    so every rank decides alike) skips the update: weights and AdamW's moments stay as they were,
    and stats["skipped"] says so.
    """
    optimizer.zero_grad(set_to_none=True)
    stats = accumulate_gradients(model, rollouts, micro_batch_size, ref_model, **loss_kwargs)
    if dist.is_initialized() and not isinstance(model, Scorer):
        # a SUM, not an average: each rank's loss already carries the global denominator
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    stats["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["skipped"] = not math.isfinite(stats["grad_norm"])
    if not stats["skipped"]:  # one NaN update would make every weight and both AdamW moments NaN
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


class Scorer(torch.nn.Module):
    """token_logprobs(model, ...) as a module, the root that FSDP2 wraps: fully_shard gathers a
    unit's weights in hooks on its own forward, and token_logprobs calls the decoder and lm_head
    directly, past the model's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask, temperature=1.0):
        return token_logprobs(self.model, input_ids, attention_mask, completion_mask, temperature)


if __name__ == "__main__":
    # the tiny random byte-level model; reward 1 when a completion starts with `target`
    from models import load_model
    from sample import generate
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny")
    prompt = tokenizer("Say a letter:").input_ids
    G, L, steps = 16, 4, 20
    with torch.no_grad():
        p0 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # (V,)
    visible = tokenizer.convert_tokens_to_ids([chr(c) for c in range(33, 127)])
    target = max(visible, key=lambda i: p0[i])  # the likeliest printable byte, still rare
    print(f"target {tokenizer.decode([target])!r}, G={G}, {L} tokens a completion")
    optimizer = make_optimizer(model, lr=2e-3)  # toy lr: the release's 3e-6 is for 1.7B weights
    ref_model = make_reference(model, kl_coef=0.005)
    for it in range(steps + 1):
        completions = generate(model.eval(), [prompt], L, n=G)  # no stop ids: every row has L tokens
        with torch.no_grad():
            p = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)[target].item()
        rewards = torch.tensor([float(c[0] == target) for c in completions])  # (G,)
        if it % 4 == 0:
            print(f"step {it:2d}  p(target first) {p:.3f} ({p / p0[target]:4.1f}x)  "
                  f"mean reward {rewards.mean():.2f}  e.g. {tokenizer.decode(completions[0])!r}")
        if it == steps:
            break
        ids = torch.tensor([prompt + c for c in completions])  # (G, P + L)
        completion_mask = torch.zeros_like(ids)
        completion_mask[:, len(prompt):] = 1
        batch = Rollouts(ids, torch.ones_like(ids), completion_mask, group_advantages(rewards, G))
        step(model.train(), optimizer, batch, micro_batch_size=8, ref_model=ref_model)
