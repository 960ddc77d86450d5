"""
Self-Harmony test-time RL: the loop (Algorithm 1 of the paper, fused as in its release).

For each question x of a batch, with no label:
  1. Solve:    G completions y_1..y_G of the solver prompt                       (view 0)
  2. Reframe:  G completions y'_1..y'_G that rewrite x and solve the rewrite     (view 1)
  3. Answers:  a_i, a'_i = normalised content of the last \\boxed{} (hms.py)
  4. Label:    y* = argmax_a 2 p0(a) p1(a) / (p0(a) + p1(a))                     (hms.py)
  5. Rewards:  R_solve(y_i) = 1[a_i = y*],  R_fused(y'_i) gated by 1[a'_i = y*]  (rewards.py)
  6. Update:   GRPO, advantages per question and per view, each view's token-mean added (grpo.py)
Every rollout stays tied to its own question and each row carries its own completion mask (the
release matches fused rollouts to another question's label after re-balancing, and masks the
fused branch with the solver branch's mask; METHOD.md "Known defects").

--reframe picks how view 1 is made: `fused` (one call: rewrite then solve, the default and the
release's), `separate` (the paper's three calls: solve x; rewrite x into x'; solve x' with the
solver prompt; only the solving rollouts are trained), `given` (x' is a paraphrase the data row
provides, Co-Reward's offline setting; `arith` rows carry one). --selector picks the label: hms,
mv (each view its own vote, the release's baseline), mv0 (view 0's vote for both, TTRL), mv2
(pooled vote), cross (Co-Reward), gt (the gold answer: the upper bound). Every
selector's label accuracy is logged on the same rollouts whatever trains; the gold answer is read
only to measure, unless --selector gt.

    python selfharmony.py --model tiny --data arith --steps 2          # seconds: the machinery
    python selfharmony.py --model smollm2 --data arith --reframe given  # the offline CPU demo (README)
    python selfharmony.py --model Qwen/Qwen3-1.7B-Base --data math500 --data-dir ../shared/data
    torchrun --standalone --nproc_per_node=8 selfharmony.py --model Qwen/Qwen3-1.7B-Base ...
    torchrun --standalone --nproc_per_node=8 selfharmony.py --model Qwen/Qwen3-4B-Base \\
        --fsdp --grad-checkpointing ...
"""

import argparse
import datetime
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

import engine
import grpo
import hms
import rewards
from eval import (DefaultsHelp, evaluate, format_question, load_benchmark, number, prompt_ids,
                  solver_messages, summarize_records)
from sample import (check_device, default_kv_budget_gb, finished, generate, kv_bytes_per_token, load_model,
                    rows_for_budget, sampling_copy, stop_ids, sync_sampling_copy)

# -----------------------------------------------------------------------------
# The reframer's prompts (this project's wording; METHOD.md gives the required layout)

REFRAME_STRATEGIES = ("make it concrete with a small example or story, generalise it, move it to another "
                      "domain, work backward from what is asked, add one irrelevant detail, or tell it from "
                      "inside the problem")
STRATEGY, REWRITTEN, SOLUTION = rewards.SECTIONS  # the headers rewards.py reads
FUSED_SYSTEM = (
    "First rewrite the problem in a different way, then solve your rewritten problem.\n"
    f"Choose one strategy: {REFRAME_STRATEGIES}. Keep the logic, every number and the answer exactly the "
    "same, and do not copy long runs of the original words.\n"
    "Reply in exactly this layout:\n"
    f"{STRATEGY}: <the strategy you chose, one line>\n"
    f"{REWRITTEN}: <the problem, rewritten>\n"
    f"{SOLUTION}: <step-by-step solution of the rewritten problem, ending with the final answer "
    "in \\boxed{}>"
)
REWRITE_SYSTEM = (
    "Rewrite the problem in a different way. Do not solve it.\n"
    f"Choose one strategy: {REFRAME_STRATEGIES}. Keep the logic, every number and the answer exactly the "
    "same, and do not copy long runs of the original words.\n"
    "Reply in exactly this layout:\n"
    f"{STRATEGY}: <the strategy you chose, one line>\n"
    f"{REWRITTEN}: <the problem, rewritten>"
)


def make_parser():
    p = argparse.ArgumentParser(description="Self-Harmony test-time RL (defaults: the release's settings).",
                                formatter_class=DefaultsHelp, allow_abbrev=False)
    # model and data
    p.add_argument("--model", default="Qwen/Qwen3-1.7B-Base",
                   help="hub id, local folder, .gguf, 'smollm2' or 'tiny'")
    p.add_argument("--data", default="math500",
                   help="benchmark name, 'arith', or a .jsonl file in the schema")
    p.add_argument("--data-dir", default=None,
                   help="folder of the benchmark files (default: $SELFHARMONY_DATA)")
    p.add_argument("--limit", type=number(int, 1), default=None,
                   help="train on the first N questions only (default: all)")
    p.add_argument("--arith-n", type=number(int, 1), default=16, help="arith: number of questions")
    p.add_argument("--arith-seed", type=int, default=0, help="arith: which question set")
    p.add_argument("--arith-level", type=number(int, 1, 3), default=1,
                   help="arith: 1 one-digit sums, 2 two-digit +/-, 3 two steps")
    # the method
    p.add_argument("--selector", default="hms", choices=hms.SELECTORS,
                   help="pseudo-label selector that trains")
    p.add_argument("--reframe", default="fused", choices=("fused", "separate", "given"),
                   help="how view 1 is made")
    p.add_argument("--reward", default="gated", choices=rewards.MODES,
                   help="fused reward: gated (paper) or additive")
    p.add_argument("--w-format", type=number(float, 0, 1), default=0.1,
                   help="weight of the format penalty P_format")
    p.add_argument("--w-div", type=number(float, 0, 1), default=0.1,
                   help="weight of the diversity penalty P_div")
    p.add_argument("--n-rollouts", type=number(int, 2), default=16,
                   help="G: rollouts a question in each view")
    # sampling
    p.add_argument("--batch-size", type=number(int, 1), default=128, help="questions a step, over all ranks")
    p.add_argument("--max-prompt-tokens", type=number(int, 1), default=1024,
                   help="longest prompt; longer is an error")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=3072, help="longest completion")
    p.add_argument("--thinking-block", action="store_true",
                   help="render with enable_thinking=False (Qwen3 then adds an empty <think></think>); the "
                        "release passes no flag")
    p.add_argument("--engine", default=None, choices=("eager", "fast"),
                   help="sampler: fast (engine.py: slot pool, CUDA graphs; default on cuda) or eager "
                        "(the reference; default on cpu)")
    p.add_argument("--kv-cache-gb", type=number(float, 0, above=True), default=None,
                   help="KV cache budget; sets the rows in flight (default on cuda: half of the memory left "
                        "free once the gradients and AdamW's state are set aside; on cpu: one view's "
                        "rollouts at a time)")
    p.add_argument("--temperature", type=number(float, 0, above=True), default=1.0,
                   help="sampling temperature, also divides logits when scoring")
    # optimisation
    p.add_argument("--lr", type=number(float, 0, above=True), default=3e-6, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.1,
                   help="share of the steps for linear warm-up, then cosine (the first step at 1/warm-up "
                        "steps of --lr, where the release's is at 0)")
    p.add_argument("--kl-coef", type=number(float, 0), default=0.005,
                   help="beta of the k3 KL loss term (0: no reference model)")
    p.add_argument("--clip-eps", type=number(float, 0, above=True), default=0.2, help="PPO clip range")
    p.add_argument("--max-grad-norm", type=number(float, 0, above=True), default=1.0,
                   help="gradient-norm clip")
    p.add_argument("--loss-agg", default="view-token-mean",
                   choices=("view-token-mean", "token-mean", "seq-mean"),
                   help="each view's token-mean, added (the release), one token-mean over both views, "
                        "or seq-mean")
    p.add_argument("--adv-scale", default="std", choices=("std", "none"),
                   help="divide advantages by the group std or not")
    p.add_argument("--micro-batch", type=number(int, 1), default=8,
                   help="rows a forward/backward pass, in order, when --micro-batch-tokens is 0")
    p.add_argument("--micro-batch-tokens", type=number(int, 0), default=None,
                   help="rows sorted by length, as many a pass as fill this many row x column slots, a "
                        "longer row alone (0: off; default on cuda 16384, halved until the memory estimate "
                        "fits, not below the longest row; on cpu 0)")
    p.add_argument("--grad-checkpointing", type=number(int, 0), nargs="?", const=1, default=0, metavar="N",
                   help="recompute activations in backward (saves memory): every layer's, or every N-th "
                        "layer's (2: half the recomputation, about half the memory saved)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers, in the update (grpo.compile_layers) and in the "
                        "fast engine's decode step (engine.COMPILE): fewer, fused kernels after tens of "
                        "seconds of compilation")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the weights, gradients, AdamW state and reference over the "
                        "ranks (FSDP2); each rank samples with a whole copy in the compute dtype")
    p.add_argument("--steps", type=number(int, 1), default=None,
                   help="optimiser steps (default: --epochs over the questions)")
    p.add_argument("--epochs", type=number(int, 1), default=100,
                   help="passes over the questions when --steps is not given")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=number(int, 0), default=0,
                   help="mean@k on the same questions every N steps (0: start and end only)")
    p.add_argument("--eval-n", type=number(int, 1), default=16,
                   help="samples a question for mean@k (paper: 16)")
    p.add_argument("--eval-max-new-tokens", type=number(int, 1), default=None,
                   help="longest eval completion (default: --max-new-tokens)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation entirely")
    p.add_argument("--log-texts", type=number(int, 0), default=2,
                   help="full rollout texts logged a step and view")
    p.add_argument("--save-every", type=number(int, 0), default=10,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--save-minutes", type=number(float, 0), default=30,
                   help="also checkpoint when this long has passed since the last one (0: never by time)")
    p.add_argument("--out-dir", default=None,
                   help="log, samples, checkpoint and plot go here (default: a new "
                        "runs/<model>-<data>-<selector>-<time>)")
    p.add_argument("--plot", action="store_true",
                   help="only draw <out-dir>/curves.png from its log.jsonl, and exit")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt")
    p.add_argument("--stop-after", type=number(int, 0), default=0,
                   help="stop after N steps of this run with a checkpoint, as Ctrl-C does")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of sampling and the update's autocast (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of data order and sampling")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


# the flags that define a run: --resume takes them from the checkpoint and refuses other values
# (the rest steer logging, evaluation, saving, memory or the device, and may change)
RUN_FLAGS = ("model", "data", "limit", "arith_n", "arith_seed", "arith_level", "selector", "reframe",
             "reward", "w_format", "w_div", "n_rollouts", "batch_size", "max_prompt_tokens", "max_new_tokens",
             "thinking_block", "temperature", "lr", "weight_decay", "warmup", "kl_coef", "clip_eps",
             "max_grad_norm", "loss_agg", "adv_scale", "steps", "epochs", "seed",
             "fsdp")  # not the run's maths, but the layout of AdamW's state in its checkpoint
# the flags that steer a run's evaluation, logging, saving and memory as its user set them: --resume keeps
# the run's unless given again (not those the start-up derives: --engine, --kv-cache-gb, --micro-batch-tokens)
KEPT_FLAGS = ("data_dir", "eval_every", "eval_n", "eval_max_new_tokens", "no_eval", "log_texts", "save_every",
              "save_minutes", "micro_batch", "grad_checkpointing", "dtype")


def resume_args(args, argv, saved):
    """args with the run-defining flags of the run being resumed (`saved`, from its checkpoint); a
    flag given on the command line with another value stops with the list of every difference. The
    KEPT_FLAGS not given on the command line are the run's too."""
    argv = sys.argv[1:] if argv is None else argv
    flag = lambda k: "--" + k.replace("_", "-")
    # the parser takes no abbreviations
    named = lambda k: any(a == flag(k) or a.startswith(flag(k) + "=") for a in argv)
    changed = [f"{flag(k)} {getattr(args, k)} (the run's: {saved[k]})" for k in RUN_FLAGS
               if k in saved and named(k) and getattr(args, k) != saved[k]]
    if changed:
        raise SystemExit("--resume: these flags differ from the run's: " + "; ".join(changed) +
                         ". Drop them to continue the run, or start a new run in another --out-dir")
    for k in RUN_FLAGS + tuple(k for k in KEPT_FLAGS if not named(k)):
        if k in saved:  # a checkpoint older than a flag keeps that flag's default
            setattr(args, k, saved[k])
    return args

# -----------------------------------------------------------------------------
# One step: rollouts of both views, labels, rewards, the batch for GRPO


def encode(tokenizer, system, user, args, qid):
    """Token ids of a rendered prompt; a prompt over --max-prompt-tokens is an error, not a silent cut."""
    ids, limit = prompt_ids(tokenizer, system, user, args.thinking_block), args.max_prompt_tokens
    if len(ids) > limit:
        raise SystemExit(f"question {qid}: prompt of {len(ids)} tokens is over --max-prompt-tokens {limit}")
    return ids


def solver_prompt(tokenizer, row, args, problem=None):
    """The solver prompt of row, or of the same row with its problem replaced by a rewrite x'."""
    row = row if problem is None else {**row, "problem": problem}
    return encode(tokenizer, *solver_messages(row), args, row["id"])


def max_rows(sampler, max_len, args, default):
    """Rows in flight: as many rows of max_len tokens as --kv-cache-gb holds, else `default`."""
    return rows_for_budget(sampler, args.kv_cache_gb, max_len) if args.kv_cache_gb else default


@dataclass
class Episode:
    """One rollout, as GRPO-Zero keeps it: its question's id and its view (0: the question as asked, 1:
    reframed), the prompt and completion token ids, the completion's text and whether it ended with a stop
    token (else --max-new-tokens cut it off); then label_and_reward fills in its answer and reward."""
    question: str
    view: int
    prompt: list
    completion: list
    text: str
    finished: bool
    answer: str | None = None
    reward: float = 0.0


def work_bar(total, desc, unit):
    """A progress bar for a part of a step (sampling, the update), on rank 0 only, gone when done."""
    quiet = dist.is_initialized() and dist.get_rank() > 0
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=quiet)


def first_prompts(tokenizer, rows, args):
    """The prompts a step starts from, a row each: view 0's (the solver's), and view 1's (fused: rewrite
    and solve; given: the solver's on the row's paraphrase; separate: the request for a rewrite). The
    start-up builds them for every question the run will draw, so that a prompt over --max-prompt-tokens
    stops the run there, not hours in."""
    prompts0 = [solver_prompt(tokenizer, r, args) for r in rows]
    if args.reframe == "given":
        return prompts0, [solver_prompt(tokenizer, r, args, r["reframed"]) for r in rows]
    system = FUSED_SYSTEM if args.reframe == "fused" else REWRITE_SYSTEM
    return prompts0, [encode(tokenizer, system, format_question(r), args, r["id"]) for r in rows]


def rollout(sampler, tokenizer, rows, args, generator, stops):
    """The step's episodes, view 0's then view 1's, each question's G together; and x' per question when
    separate. Both views go to the sampler as one pool; it keeps as many rows in flight as the KV budget
    holds."""
    def sample(prompts, n=args.n_rollouts):
        rows_in_flight = max_rows(sampler, max(map(len, prompts)) + args.max_new_tokens, args, len(rows) * n)
        with work_bar(len(prompts) * n, "rollouts", "rollout") as bar:
            return generate(sampler, prompts, args.max_new_tokens, n=n, temperature=args.temperature,
                            stop_ids=stops, generator=generator, engine=args.engine, max_rows=rows_in_flight,
                            progress=bar.update)

    rewrites = None
    prompts0, prompts1 = first_prompts(tokenizer, rows, args)
    if args.reframe == "separate":  # prompts1 ask for one rewrite a question; view 1 solves it G times
        rewrites = [rewards.rewritten_problem(tokenizer.decode(o, skip_special_tokens=True))
                    for o in sample(prompts1, 1)]
        # a rewrite that missed the layout, or ran on so long that its solver prompt is over
        # --max-prompt-tokens, falls back to the original wording (logged as the share rewrite_failed)
        prompts1 = []
        for i, (r, x) in enumerate(zip(rows, rewrites)):
            ids = x and prompt_ids(tokenizer, *solver_messages({**r, "problem": x}), args.thinking_block)
            if not ids or len(ids) > args.max_prompt_tokens:
                rewrites[i], ids = None, prompts0[i]
            prompts1.append(ids)
    Q, G = len(rows), args.n_rollouts
    prompts = prompts0 + prompts1  # prompt p: view p // Q of question p % Q; its G samples come together
    return [Episode(rows[i // G % Q]["id"], i // G // Q, prompts[i // G], c,
                    tokenizer.decode(c, skip_special_tokens=True), finished(c, stops))
            for i, c in enumerate(sample(prompts))], rewrites


def label_and_reward(rows, episodes, args):
    """Every selector's labels for each question, and each episode's answer and reward (filled in).
    Returns a record a question: its id, gold answer, labels, the fused view's mean format score, P_div."""
    groups, records = defaultdict(list), []
    for e in episodes:
        groups[e.question, e.view].append(e)
    for row in rows:
        e0, e1 = groups[row["id"], 0], groups[row["id"], 1]
        for e in e0 + e1:  # a cut-off rollout names no bare number (hms.answer_of)
            e.answer = hms.answer_of(e.text, row, e.finished)
        a0, a1 = [e.answer for e in e0], [e.answer for e in e1]
        gold = hms.gold_answer(row)  # measured for every selector; trains only under --selector gt
        labels = {s: hms.select_labels(s, a0, a1, gold=gold) for s in hms.SELECTORS}
        y0, y1 = labels[args.selector]
        t1 = [e.text for e in e1]
        r1 = (rewards.fused_rewards(t1, a1, a0, y1, args.w_format, args.w_div, args.reward)
              if args.reframe == "fused" else rewards.solve_rewards(a1, y1))  # else view 1 solves x'
        for e, r in zip(e0 + e1, rewards.solve_rewards(a0, y0) + r1):
            e.reward = r
        records.append(dict(id=row["id"], gold=gold, labels=labels,
                            format=float(np.mean([rewards.format_score(t) for t in t1])),
                            p_div=rewards.div_penalty(a0, a1)))
    return records


def train_step(model, policy, sampler, tokenizer, optimizer, scheduler, ref_model, rows, args, generator,
               stops, pad_id, autocast):
    """Algorithm 1 on one batch of questions: both views drawn from the sampling copy, every selector's
    labels, rewards, one GRPO update on the rollouts of both views (by default each view's token-mean,
    the two added), and the sampling copy refreshed with the updated weights. policy: the model, or
    under FSDP its sharded grpo.Scorer."""
    t0 = time.perf_counter()
    peak_gib(sampler.device)  # counts from here
    sampler.eval()  # on the CPU the sampler is the policy, which the update left in training mode
    episodes, rewrites = rollout(sampler, tokenizer, rows, args, generator, stops)
    t1, mem_sample = time.perf_counter(), peak_gib(sampler.device)
    records = label_and_reward(rows, episodes, args)
    # advantages per question and per view: rollout's order is view 0's episodes then view 1's, G a question
    advantages = torch.cat([grpo.group_advantages([e.reward for e in episodes if e.view == v],
                                                  args.n_rollouts, scale=args.adv_scale) for v in (0, 1)])
    pairs = [(e.prompt, e.completion) for e in episodes]
    views = torch.tensor([e.view for e in episodes])
    batch = grpo.Rollouts(*grpo.pad_rollouts(pairs, pad_id), advantages, views=views).to(model.device)
    t2 = time.perf_counter()
    policy.train()
    with autocast, work_bar(len(episodes), "update", "row") as bar:
        stats = grpo.step(policy, optimizer, batch, None if args.micro_batch_tokens else args.micro_batch,
                          ref_model, scheduler, max_grad_norm=args.max_grad_norm, clip_eps=args.clip_eps,
                          kl_coef=args.kl_coef, temperature=args.temperature, agg=args.loss_agg,
                          micro_batch_tokens=args.micro_batch_tokens or None, progress=bar.update)
    sync_sampling_copy(sampler, model)
    stats.update(t_sample=t1 - t0, t_reward=t2 - t1, t_update=time.perf_counter() - t2)
    if mem_sample is not None:  # CUDA: the peaks that the start-up's memory estimate predicts
        stats.update(mem_sample=mem_sample, mem_update=peak_gib(sampler.device))
    return dict(records=records, episodes=episodes, rewrites=rewrites, stats=stats)


def peak_gib(device):
    """GiB of tensors the CUDA device held at most since the last call, which starts a new count; None
    elsewhere."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def step_summary(records, episodes, rewrites):
    """The step's numbers (over all ranks' questions): rewards, every selector's label accuracy, shapes.
    records: label_and_reward's, a question each; episodes: every rollout, its answer and reward filled in."""
    gold = {rec["id"]: rec["gold"] for rec in records}
    views = [e for e in episodes if e.view == 0], [e for e in episodes if e.view == 1]
    G = len(views[0]) // len(records)
    out = {f"reward{v}": float(np.mean([e.reward for e in views[v]])) for v in (0, 1)}
    for s in hms.SELECTORS:  # (label of view 0, label of view 1): they differ under cross only
        out[f"label_acc/{s}"] = float(np.mean([y == rec["gold"] for rec in records
                                               for y in rec["labels"][s]]))
        out[f"no_label/{s}"] = float(np.mean([y is None for rec in records for y in rec["labels"][s]]))
    for v in (0, 1):  # how often each view reaches the gold answer: is the view invariance there?
        out[f"acc{v}"] = float(np.mean([e.answer == gold[e.question] for e in views[v]]))
    out["hms_mv_agree"] = float(np.mean([rec["labels"]["hms"][0] == rec["labels"]["mv"][0]
                                         for rec in records]))
    flat = sum(grpo.count_flat_groups([e.reward for e in view], G) for view in views)
    out["flat_groups"] = flat / (2 * len(records))
    out["format"] = float(np.mean([rec["format"] for rec in records]))
    out["p_div"] = float(np.mean([rec["p_div"] for rec in records]))
    for v in (0, 1):
        out[f"len{v}"] = float(np.mean([len(e.completion) for e in views[v]]))
        out[f"truncated{v}"] = float(np.mean([not e.finished for e in views[v]]))
    if rewrites is not None:
        out["rewrite_failed"] = float(np.mean([x is None for x in rewrites]))
    return out


def step_row(everything):
    """A step's log numbers from every rank's train_step output (a list in rank order): step_summary's
    over all ranks' questions, and the update's over the ranks (KL, clip fraction and ratio, each rank's
    token mean, weighted by its completion tokens: the token mean over all)."""
    cat = lambda k: [x for part in everything for x in (part[k] or [])]
    rewrites = cat("rewrites") if everything[0]["rewrites"] is not None else None  # --reframe separate
    row = step_summary(cat("records"), cat("episodes"), rewrites)
    stats = [part["stats"] for part in everything]
    tokens = [sum(len(e.completion) for e in part["episodes"]) for part in everything]  # a rank's new tokens
    row["loss"] = sum(st["loss"] for st in stats)  # each rank's share of the global mean
    for k in ("kl", "clip_frac", "ratio"):
        row[k] = float(np.average([st[k] for st in stats], weights=tokens))
    for k in ("grad_norm", "lr", "pad_share", "t_sample", "t_reward", "t_update"):
        row[k] = float(np.mean([st[k] for st in stats]))
    # new tokens a second while sampling, the ranks' rates added
    row["sample_tok_s"] = sum(t / st["t_sample"] for t, st in zip(tokens, stats))
    for k in ("mem_sample", "mem_update"):  # CUDA only: the fullest rank's
        if k in stats[0]:
            row[k] = max(st[k] for st in stats)
    row["skipped"] = stats[0]["skipped"]  # the same on every rank: the gradient norm is summed over ranks
    return row


def sample_lines(out, question, step, args):
    """samples.jsonl's lines of a step: the first --log-texts rollouts of each view of one question (rank 0's
    first), each with its reward and the label that trained."""
    label = next(rec for rec in out["records"] if rec["id"] == question["id"])["labels"][args.selector]
    lines = []
    for v, view in enumerate(("solve", args.reframe)):
        own = [e for e in out["episodes"] if (e.question, e.view) == (question["id"], v)]
        lines += [strict_json({"step": step, "id": question["id"], "view": view, "text": e.text,
                               "reward": e.reward, "label": label}) + "\n" for e in own[: args.log_texts]]
    return lines


def progress_line(row):
    """The line a step writes under the progress bar."""
    acc = lambda s: "none" if row[f"no_label/{s}"] == 1 else f"{row[f'label_acc/{s}']:.2f}"
    return (f"step {row['step']}: reward {row['reward0']:.3f}/{row['reward1']:.3f}  label acc "
            f"hms {acc('hms')} mv {acc('mv')}  kl {row['kl']:.4f}  len {row['len0']:.0f}/{row['len1']:.0f}  "
            f"{row['t_sample'] + row['t_reward'] + row['t_update']:.1f}s (sampling {row['sample_tok_s']:.0f} "
            "tok/s)"
            + ("  SKIPPED: NaN or inf gradient, weights unchanged" if row["skipped"] else ""))


MAX_SKIPS = 3  # updates in a row skipped for a NaN or inf gradient before the run stops


def strict_json(obj):
    """json.dumps with NaN and inf written as null, so every log line is valid JSON for any reader."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(obj), allow_nan=False)


def gather(obj, world):
    """Every rank's obj, in rank order (a list of one element without torchrun)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def batch_indices(step, n_questions, batch_size, seed):
    """The questions of a step: a fresh shuffle each epoch, derived from (seed, step) alone, so a
    resumed run needs no saved data-order state."""
    epoch, k = divmod(step, n_questions // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n_questions)
    return order[k * batch_size : (k + 1) * batch_size].tolist(), epoch


def truncate_log(path, step):
    """Keep the whole lines of a JSONL log that belong to steps <= step: a run killed after its last
    checkpoint logged steps that the resumed run logs again, and may have left half a line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except json.JSONDecodeError:
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, step, args, master=True):
    """The model as a Hugging Face folder plus trainer.pt, written by rank 0 beside and then renamed
    in: a run killed while saving keeps the previous checkpoint. Under --fsdp every rank calls it:
    the weights and AdamW's state are gathered whole onto rank 0's CPU (AdamW's keyed by weight name)."""
    if args.fsdp:
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optim = (get_model_state_dict(model, options=whole),
                          get_optimizer_state_dict(model, optimizer, options=whole))
        own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        weights = {k: v for k, v in weights.items() if k in own}  # a tied lm_head comes back as a second copy
    else:
        weights, optim = None, optimizer.state_dict()  # weights None: save_pretrained reads the model's own
    if not master:
        return
    tmp, final, old = out_dir / "ckpt.tmp", out_dir / "ckpt", out_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                    "args": vars(args)}, tmp / "trainer.pt")
    except (OSError, RuntimeError) as e:
        # a full disk: torch says "[enforce fail at inline_container.cc:672]"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2**30
        raise SystemExit(f"could not write the checkpoint of step {step} to {out_dir} "
                         f"({str(e).strip()[:200]}); {free:.1f} GiB free there. The last checkpoint stands: "
                         "free some space, then --resume")
    # on disk before the rename, so that a crash or power cut never leaves a renamed, half-written ckpt
    sync(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    sync(out_dir)  # and the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def sync(folder):
    """fsync a folder's files and the folder itself: written data reaches the disk, not just a cache."""
    for path in [*(p for p in folder.iterdir() if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resident_bytes(model, sampler, ref_model, args, world):
    """What a rank keeps through the run, by part: float32 weights, gradients, AdamW's two moments and
    the reference (under --fsdp this rank's share of each), and the sampling copy."""
    shards = world if args.fsdp else 1
    P = sum(p.nbytes for p in model.parameters())
    return {"weights": P / shards, "gradients": P / shards, "AdamW": 2 * P / shards,
            "sampling copy": 0 if sampler is model else sum(p.nbytes for p in sampler.parameters()),
            "reference": 0 if ref_model is None else P / shards}


def memory_plan(parts, activations_at, sampler, args, world, device, gathered=0):
    """The step's memory, estimated before the first one: (a line to print, whether it fits). What stays
    resident (`parts`, from resident_bytes), plus the larger of the rollouts' KV cache and the update's
    activations (activations_at, from grpo.activation_estimate; the sampler frees its cache before the
    update) with, under --fsdp, the weights and gradients FSDP holds whole (gathered, from
    grpo.gathered_bytes). A row longer than --micro-batch-tokens is a micro-batch of its own, so the
    widest one holds max(budget, the longest row) tokens."""
    longest = args.max_prompt_tokens + args.max_new_tokens
    kv = (args.kv_cache_gb * 2**30 if args.kv_cache_gb else  # no budget: one view's rollouts at a time
          kv_bytes_per_token(sampler.config, next(sampler.parameters()).dtype) * args.batch_size // world
          * args.n_rollouts * longest)
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
    switches += ["a lower --kv-cache-gb"] + (["--fsdp under torchrun"] if not args.fsdp else [])
    return line + ". It will not fit: try " + ", ".join(switches), False


def set_budgets(args, model, sampler, ref_model, world, device, compute_dtype):
    """The defaults of the two memory budgets, set in args where not given, and memory_plan's line for
    them. --kv-cache-gb: on CUDA half the free memory, less what is not on the device yet (gradients,
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
        activations_at = grpo.activation_estimate(model)
    gathered = grpo.gathered_bytes(model) if args.fsdp else 0
    plan, fits = memory_plan(parts, activations_at, sampler, args, world, device, gathered)
    longest = args.max_prompt_tokens + args.max_new_tokens  # halved below it, it saves nothing (memory_plan)
    while auto_budget and not fits and args.micro_batch_tokens // 2 >= max(1024, longest):
        args.micro_batch_tokens //= 2
        plan, fits = memory_plan(parts, activations_at, sampler, args, world, device, gathered)
    return plan


def plot(log_path, png_path):
    """Curves of the run, when matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(log_path)]
    train = [r for r in rows if "reward0" in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in hms.SELECTORS[:-1]:
        axes[0].plot([r["step"] for r in train], [r[f"label_acc/{s}"] for r in train], label=s)
    axes[0].set_title("pseudo-label accuracy (vs hidden gold)")
    for v in ("0", "1"):
        axes[1].plot([r["step"] for r in train], [r[f"reward{v}"] for r in train], label=f"view {v}")
    axes[1].set_title("mean reward")
    for key in ("mean", "maj"):
        axes[2].plot([r["step"] for r in evals],
                     [next(v for k, v in r["eval"].items() if k.startswith(key + "@")) for r in evals],
                     "o-", label=f"{key}@k")
    axes[2].set_title("accuracy on the questions")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


# -----------------------------------------------------------------------------
# The loop


def open_run(args, argv, ddp):
    """The run's --out-dir and, under --resume, the state of its checkpoint. Refuses to write over another
    run; a run killed before its first checkpoint starts over; a resumed run takes its own flags
    (resume_args). --plot draws the curves of the folder's log and exits here. Makes nothing: the folder is
    made by make_run_dir once the start-up checks have passed. Returns (args, out_dir, ckpt, state):
    out_dir None for a new run with no --out-dir, state None unless resuming."""
    if args.out_dir is None:
        if args.resume or args.plot:
            raise SystemExit("--resume and --plot need the run's --out-dir")
        return args, None, None, None
    out_dir = Path(args.out_dir)
    if args.plot:
        png = (plot(out_dir / "log.jsonl", out_dir / "curves.png") if (out_dir / "log.jsonl").exists()
               else None)
        raise SystemExit(f"wrote {png}" if png
                         else f"no plot: {out_dir}/log.jsonl missing or matplotlib not installed")
    if not args.resume and any((out_dir / f).exists() for f in ("log.jsonl", "ckpt", "ckpt.old")):
        raise SystemExit(f"{out_dir} holds a run already: pass --resume to continue it, or another --out-dir")
    ckpt = out_dir / "ckpt" if (out_dir / "ckpt").exists() else out_dir / "ckpt.old"
    state = saved = None  # saved: the flags of the run being resumed
    if args.resume and ckpt.exists():  # read once: the run's flags now, the optimiser and schedule later
        try:  # mapped, not read: under FSDP every rank opens the whole AdamW state and keeps only its shard
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # torch's errors for a damaged file are RuntimeError, EOFError, pickle's...
            raise SystemExit(unreadable(ckpt / "trainer.pt", e))
        saved = state["args"]
    elif args.resume:  # killed before its first checkpoint, maybe in the first evaluation
        if not any((out_dir / f).exists() for f in ("log.jsonl", "flags.json")):
            raise SystemExit(f"--resume: no checkpoint in {out_dir}")
        if (out_dir / "flags.json").exists():
            try:
                saved = json.loads((out_dir / "flags.json").read_text())
            except json.JSONDecodeError as e:
                raise SystemExit(unreadable(out_dir / "flags.json", e))
    if saved is not None:
        args = resume_args(args, argv, saved)
        if args.fsdp and not ddp:
            raise SystemExit("this run was made with --fsdp: resume it under torchrun")
    if args.resume and state is None:  # nothing to continue from: the run starts over, with its own flags
        print(f"--resume: {out_dir} has no checkpoint yet; the run starts over")
        for name in ("log.jsonl", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        args.resume = False
    return args, out_dir, ckpt, state


def unreadable(path, error):
    """The message for a run file that exists but cannot be read (a damaged disk, a hand edit): the
    checkpoints themselves are written atomically."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"--resume: cannot read {path} ({type(error).__name__}: {first}); the run cannot continue "
            "from it: start it again in another --out-dir")


def make_run_dir(args, out_dir, ddp, master):
    """The run's folder, made once the start-up checks have passed (a start that fails leaves none):
    --out-dir, or a new runs/<model>-<data>-<selector>-<time>, which a run started in the same second
    cannot take too (it gets -2, -3, ...). A new run's flags go to its flags.json, for a --resume before
    its first checkpoint."""
    if out_dir is None:
        name = [None]
        if master:  # rank 0 names the folder for every rank
            stem = (f"runs/{Path(args.model).name}-{Path(args.data).stem}-{args.selector}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}")
            name[0], k = stem, 1
            while True:
                try:
                    Path(name[0]).mkdir(parents=True)  # not exist_ok: the run that makes it has it
                    break
                except FileExistsError:
                    k += 1
                    name[0] = f"{stem}-{k}"
        if ddp:
            dist.broadcast_object_list(name, src=0)
        args.out_dir, out_dir = name[0], Path(name[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    if master and not args.resume:
        tmp = out_dir / "flags.json.tmp"
        tmp.write_text(json.dumps({k: getattr(args, k) for k in RUN_FLAGS + KEPT_FLAGS}))
        os.replace(tmp, out_dir / "flags.json")
    return out_dir


def load_questions(args, world):
    """The run's questions (--data, its first --limit) and its number of steps; a one-line error for data
    the run cannot use."""
    try:
        questions = load_benchmark(args.data, args.data_dir, n=args.arith_n, seed=args.arith_seed,
                                   level=args.arith_level)
    except (OSError, ValueError) as e:
        raise SystemExit(f"data: {e}")
    questions = questions[: args.limit] if args.limit else questions
    if args.reframe == "given" and not all(q.get("reframed") for q in questions):
        raise SystemExit("--reframe given needs a 'reframed' wording in every row (arith rows have one)")
    if args.batch_size % world or args.batch_size > len(questions):
        raise SystemExit(f"--batch-size {args.batch_size} must divide by {world} ranks and be "
                         f"<= {len(questions)} questions")
    return questions, args.steps or args.epochs * (len(questions) // args.batch_size)


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


def restore(state, model, optimizer, scheduler, args, out_dir, total_steps, ddp, master):
    """A resumed run's AdamW state and schedule from its checkpoint's `state`, and its logs cut back to
    the checkpoint's step. Returns whether the run had already finished: all its steps done and its
    final evaluation logged (or --no-eval)."""
    if args.fsdp:  # the whole state, keyed by weight name; each rank takes its shard
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if master:
        for path in (out_dir / "log.jsonl", out_dir / "samples.jsonl"):
            truncate_log(path, state["step"])
    if ddp:
        dist.barrier()
    logged = ([json.loads(line) for line in open(out_dir / "log.jsonl")]
              if (out_dir / "log.jsonl").exists() else [])
    final_eval = any("eval" in r and r["step"] == total_steps for r in logged)
    return state["step"] >= total_steps and (final_eval or args.no_eval)


def log_line(path, row):
    """One strict JSON line appended to a log."""
    with open(path, "a") as f:
        f.write(strict_json(row) + "\n")


def run_eval(step, sampler, tokenizer, questions, args, rank, world, log_path):
    """mean@k / maj@k / pass@k on the run's questions at --eval-every steps, the start and the end: each
    rank samples its share, rank 0 logs (the paper's protocol: temperature 0.8, top-p 0.95)."""
    if args.no_eval:
        return
    max_new = args.eval_max_new_tokens or args.max_new_tokens
    _, records = evaluate(sampler, tokenizer, questions[rank::world], n=args.eval_n, temperature=0.8,
                          top_p=0.95, max_new_tokens=max_new, batch_size=args.batch_size, seed=args.seed,
                          engine=args.engine, thinking_block=args.thinking_block,
                          max_rows=max_rows(sampler, args.max_prompt_tokens + max_new, args, None))
    grades = [{k: r[k] for k in ("id", "kind", "answer", "correct")} for r in records]  # not the texts
    everyone = [r for part in gather(grades, world) for r in part]
    if rank == 0:
        summary = summarize_records(questions, everyone, args.eval_n)
        log_line(log_path, {"step": step, "eval": {k: v for k, v in summary.items()
                                                   if not k.startswith("by_")}})
        print(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()
                                                if isinstance(v, float)))


@contextmanager
def stop_signals():
    """Ctrl-C (or SIGTERM from a scheduler) asks the run to stop: it finishes the step in progress,
    saves, and exits with the shell's status for that signal (130, 143), so that a wrapper script or a
    scheduler sees a run cut short; a second Ctrl-C stops at once (KeyboardInterrupt). Yields the list
    that says why the run stops early, empty until then: the signal's number (or 0, put there by the
    loop, for --stop-after)."""
    stop_requested = []

    def on_signal(signum, _):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)
        print("\nstopping after this step (Ctrl-C again to stop now)")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop_requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def exits_explained(out_dir, step):
    """A step that runs out of memory or disk, or a second Ctrl-C, ends with a line that says what to do
    (and for Ctrl-C the shell's status, 130) instead of a traceback. step(): the step in progress."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise SystemExit(f"out of memory in step {step()}: lower --micro-batch, --kv-cache-gb or "
                         "--max-new-tokens, or add --grad-checkpointing; --resume continues from the last "
                         "checkpoint")
    except OSError as e:  # the logs on a full disk (resume drops a half-written last line)
        if e.errno != errno.ENOSPC:
            raise
        raise SystemExit(f"disk full in step {step()} ({e}): free some space in {out_dir}, then --resume")
    except KeyboardInterrupt:  # the second Ctrl-C: checkpoints are written atomically, so the last one stands
        print(f"interrupted in step {step()}; --resume --out-dir {out_dir} continues from the last "
              "checkpoint", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT)  # the shell's status for Ctrl-C, as after the first


def save_due(step, args, last_save, stop_requested, ddp):
    """Whether a checkpoint is due after `step` (1-based) by --save-every or --save-minutes. Under
    torchrun rank 0's clock and signals decide for all (its stop request is every rank's), so that every
    rank reaches the same collectives."""
    due = ((args.save_every and step % args.save_every == 0)
           or (args.save_minutes and time.monotonic() - last_save >= 60 * args.save_minutes))
    if ddp:
        decision = [due, stop_requested[:1]]
        dist.broadcast_object_list(decision, src=0)
        due, stop_requested[:] = decision
    return due


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, device = start_ranks(args)
    master = rank == 0
    compute_dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    args, out_dir, ckpt, state = open_run(args, argv, ddp)
    torch.manual_seed(args.seed)

    questions, total_steps = load_questions(args, world)
    start = state["step"] if args.resume else 0

    # weights stay float32 (AdamW's lr-3e-6 updates vanish in bfloat16); bfloat16 is autocast compute
    autocast = torch.autocast(device.split(":")[0], dtype=compute_dtype,
                              enabled=compute_dtype != torch.float32)
    # under --fsdp the whole float32 weights stay on the CPU until fully_shard moves each rank's shard over
    home = "cpu" if args.fsdp else device
    try:
        model, tokenizer = load_model(str(ckpt) if args.resume else args.model, home, torch.float32)
    except Exception as e:  # a damaged checkpoint (load_model's own messages are SystemExits, not Exceptions)
        if not args.resume:
            raise
        raise SystemExit(unreadable(ckpt, e))
    # the prompts of every question the run's steps draw fit --max-prompt-tokens: checked here, not hours in
    drawn = {i for s in range(start, total_steps) for i in batch_indices(s, len(questions), args.batch_size,
                                                                         args.seed)[0]}
    first_prompts(tokenizer, [questions[i] for i in sorted(drawn)], args)
    ref_model = None
    if args.kl_coef:  # the reference is the starting model (the run's --model), also after a resume
        ref_model = (load_model(args.model, home, torch.float32)[0] if args.resume
                     else grpo.make_reference(model, args.kl_coef))
        ref_model.requires_grad_(False)
    if args.grad_checkpointing:
        grpo.set_checkpointing(model, args.grad_checkpointing)
    # rollouts are drawn from a copy in the compute dtype (the policy itself when that is float32 and
    # whole), refreshed after every update; its KV cache is freed after each call, so the update reuses
    # that memory
    sampler = sampling_copy(model, compute_dtype, separate=args.fsdp).to(device)
    args.engine = args.engine or ("fast" if device.startswith("cuda") else "eager")
    if sampler is not model and args.engine == "fast" and engine.supports(sampler):
        # q / k / v and gate / up weights joined (the sync's copies write through): 4 matmuls a layer for 7
        engine.fuse(sampler)
    plan = set_budgets(args, model, sampler, ref_model, world, device, compute_dtype)
    if master:
        print(plan)
    policy, ref_layers = model, ref_model
    if args.fsdp:  # this rank keeps a shard of the weights (and so of AdamW's state); `model` holds them
        policy = grpo.shard(model)
        ref_model = ref_model and grpo.shard(ref_model)
    # after the copies (a copy would call these layers) and the sharding (grpo.compile_layers)
    if args.compile:
        for m in (model, ref_layers):
            if m is not None:
                grpo.compile_layers(m)
        engine.COMPILE = True
        if master:
            print("--compile: the first step compiles the decoder layers as it meets them (tens of seconds)")
    optimizer = grpo.make_optimizer(model, args.lr, args.weight_decay)
    if not args.resume:  # AdamW's moments now, beside the weights (a resumed run loads them below)
        grpo.allocate_state(optimizer)
    out_dir = make_run_dir(args, out_dir, ddp, master)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: grpo.lr_schedule(s, total_steps, args.warmup))
    if args.resume:
        ended = restore(state, model, optimizer, scheduler, args, out_dir, total_steps, ddp, master)
        del state  # AdamW's state now lives in the optimizer
        if ended:
            if master:
                print(f"{out_dir} holds a finished run ({total_steps} steps): nothing to do")
            return
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    log_path, texts_path = out_dir / "log.jsonl", out_dir / "samples.jsonl"
    if master:
        print(vars(args))
        left = len(questions) % args.batch_size  # each epoch is a new shuffle: other questions wait each time
        print(f"{len(questions)} questions, {args.batch_size} a step, {total_steps} steps, "
              f"{world} rank(s), {device}"
              + (f"; each epoch's last {left} questions in its shuffled order wait for the next epoch"
                 if left else ""))
    evaluate_at = lambda step: run_eval(step, sampler, tokenizer, questions, args, rank, world, log_path)

    # step: the one in progress, for exits_explained's messages
    skips, last_save, step = 0, time.monotonic(), start - 1
    with (stop_signals() as stop_requested, exits_explained(out_dir, lambda: step + 1),
          tqdm(initial=start, total=total_steps, disable=not master, desc="train") as bar):
        if start == 0:
            evaluate_at(0)
        for step in range(start, total_steps):
            indices, epoch = batch_indices(step, len(questions), args.batch_size, args.seed)
            rows = [questions[i] for i in indices[rank::world]]
            # each step draws from its own generator: a resumed run samples what an uninterrupted one would
            generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)

            out = train_step(model, policy, sampler, tokenizer, optimizer, scheduler, ref_model, rows, args,
                             generator, stops, pad_id, autocast)
            # every rank's numbers reach rank 0, which logs: its episodes without their prompts and texts
            slim = [replace(e, prompt=None, text=None) for e in out["episodes"]]
            everything = gather({**out, "episodes": slim}, world)
            if master:
                row = {"step": step + 1, "epoch": epoch, **step_row(everything)}
                log_line(log_path, row)
                with open(texts_path, "a") as f:
                    f.writelines(sample_lines(out, rows[0], step + 1, args))
                bar.write(progress_line(row))
            bar.update()

            # the same on every rank: the gradient norm is summed over ranks before it is judged
            skips = skips + 1 if out["stats"]["skipped"] else 0
            if skips == MAX_SKIPS:
                raise SystemExit(f"stopped at step {step + 1}: the gradient was NaN or inf in {MAX_SKIPS} "
                                 "steps in a row, and those updates were skipped (no checkpoint written "
                                 "since). Start a new run with a lower --lr or --max-grad-norm: --resume "
                                 "keeps the run's flags, and from its last checkpoint would draw these "
                                 "steps' rollouts again")

            done = step + 1 == total_steps
            if args.stop_after and step + 1 - start >= args.stop_after and not done and not stop_requested:
                stop_requested.append(0)
            if args.eval_every and (step + 1) % args.eval_every == 0 and not done:
                evaluate_at(step + 1)
            due = save_due(step + 1, args, last_save, stop_requested, ddp)  # on every rank: a collective
            if due or stop_requested or done:
                if master or args.fsdp:
                    save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, step + 1, args, master)
                last_save = time.monotonic()
                if ddp:
                    dist.barrier()
            if stop_requested:
                if master:
                    print(f"stopped after step {step + 1}; continue with --resume")
                break
        else:
            evaluate_at(total_steps)
            if master:
                png = plot(log_path, out_dir / "curves.png")
                print(f"wrote {png}" if png else "no curves.png: matplotlib is not installed "
                      f"(pip install matplotlib, then python selfharmony.py --plot --out-dir {out_dir})")
    if ddp:
        dist.destroy_process_group()
    if stop_requested and stop_requested[0]:  # stopped by a signal, the checkpoint written
        raise SystemExit(128 + stop_requested[0])


if __name__ == "__main__":
    main()
