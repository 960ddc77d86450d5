"""
Self-Harmony test-time RL: the loop (Algorithm 1 of the paper, fused as in its release).

For each question x of a batch, with no label:
  1. Solve:    G completions y_1..y_G of the solver prompt                 (view 0; prompts.py, sample.py)
  2. Reframe:  G completions y'_1..y'_G that rewrite x and solve the rewrite                        (view 1)
  3. Answers:  a_i, a'_i = normal form of the last \\boxed{}                                    (answers.py)
  4. Label:    y* = argmax_a 2 p0(a) p1(a) / (p0(a) + p1(a))                                      (hms.py)
  5. Rewards:  R_solve(y_i) = 1[a_i = y*],  R_fused(y'_i) gated by 1[a'_i = y*]               (rewards.py)
  6. Update:   GRPO, advantages per question and per view, each view's token-mean added        (grpo.py)
Every rollout stays tied to its own question and each row carries its own completion mask (the
release matches fused rollouts to another question's label after re-balancing, and masks the
fused branch with the solver branch's mask; METHOD.md "Known defects").

--reframe makes view 1: `fused` (rewrite then solve, one call: the release's), `separate` (the paper's
three calls: solve x, rewrite it, solve the rewrite x'), `given` (solve a paraphrase the data provides),
`none` (no view 1: with --selector mv0, TTRL).
--selector picks the label that trains: hms, mv, mv0, mv2, cross or gt (README); every selector's label
accuracy is logged on the same rollouts, and the gold answer is read only to measure unless --selector gt.
--explain prints each step's table of its first questions (hms.explain). The machinery behind the loop: run.py
(the run's folder, checkpoints, logs, signals), models.py (--model), scale.py (GPU memory, torchrun,
FSDP2), engine.py (the fast sampler).

    python selfharmony.py --model tiny --data arith --steps 2          # seconds: the machinery
    python selfharmony.py --model smollm2 --data arith --reframe given  # the offline CPU demo (README)
    python selfharmony.py --model Qwen/Qwen3-1.7B-Base --data math500 --data-dir ../shared/data
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load or the run starts: stop at once,
    for sig in (signal.SIGINT, signal.SIGTERM):  # exit 130 / 143; main's own handlers take over later
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import engine
import grpo
import hms
import prompts
import rewards
import run
import sample
import scale
from answers import answer_of, gold_answer
from eval import evaluate_at_step, load_benchmark
from run import DefaultsHelp, number


# -----------------------------------------------------------------------------
# One step: rollouts of both views, labels, rewards, the GRPO update


@dataclass
class Episode:
    """One rollout, as GRPO-Zero keeps it: its question's id, its view (0: the question as asked, 1:
    reframed), prompt and completion ids, text, whether it ended with a stop token (else it was cut off);
    then label_and_reward fills in its answer and reward, and train_step its advantage."""
    question: str
    view: int
    prompt: list
    completion: list
    text: str
    finished: bool
    answer: str | None = None
    reward: float = 0.0
    advantage: float = 0.0


def rollout(sampler, tokenizer, rows, args, generator, stops):
    """The step's episodes, view 0's then view 1's, each question's G together; and x' per question when
    separate. Both views go to the sampler as one pool; it keeps as many rows in flight as the KV budget
    holds."""
    generate = engine.generate if args.engine == "fast" else sample.generate  # fast, or the reference loop

    def draw(batch, n=args.n_rollouts):
        in_flight = scale.max_rows(sampler, max(map(len, batch)) + args.max_new_tokens, args, len(rows) * n)
        with scale.work_bar(len(batch) * n, "rollouts", "rollout") as bar:
            return generate(sampler, batch, args.max_new_tokens, n=n, temperature=args.temperature,
                            stop_ids=stops, generator=generator, max_rows=in_flight, progress=bar.update)

    limits = args.thinking_block, args.max_prompt_tokens
    prompts0, prompts1 = prompts.first_prompts(tokenizer, rows, args.reframe, *limits)
    rewrites = None
    if args.reframe == "separate":  # prompts1 ask for one rewrite a question; view 1 solves it G times
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in draw(prompts1, 1)]
        # a rewrite that failed falls back to the question's own prompt (logged as the share rewrite_failed)
        rewrites, prompts1 = prompts.rewrite_prompts(tokenizer, rows, map(rewards.rewritten_problem, texts),
                                                     prompts0, *limits)
    Q, G = len(rows), args.n_rollouts
    both = prompts0 + prompts1  # prompt p: view p // Q of question p % Q; its G samples come together
    return [Episode(rows[i // G % Q]["id"], i // G // Q, both[i // G], c,
                    tokenizer.decode(c, skip_special_tokens=True), sample.finished(c, stops))
            for i, c in enumerate(draw(both))], rewrites


def label_and_reward(rows, episodes, args):
    """Every selector's labels for each question, and each episode's answer and reward (filled in).
    Returns a record a question: its id, gold answer, labels, the fused view's mean format score, P_div."""
    groups, records = defaultdict(list), []
    for e in episodes:
        groups[e.question, e.view].append(e)
    for row in rows:
        e0, e1 = groups[row["id"], 0], groups[row["id"], 1]
        for e in e0 + e1:  # a cut-off rollout names no bare number (answers.answer_of)
            e.answer = answer_of(e.text, row, e.finished)
        a0, a1 = [e.answer for e in e0], [e.answer for e in e1]
        gold = gold_answer(row)  # measured for every selector; trains only under --selector gt
        labels = {s: hms.select_labels(s, a0, a1, gold=gold) for s in hms.SELECTORS}
        y0, y1 = labels[args.selector]
        t1 = [e.text for e in e1]
        r1 = (rewards.fused_rewards(t1, a1, a0, y1, args.w_format, args.w_div, args.reward)
              if args.reframe == "fused" else rewards.solve_rewards(a1, y1))  # else view 1 solves x'
        for e, r in zip(e0 + e1, rewards.solve_rewards(a0, y0) + r1):
            e.reward = r
        records.append(dict(id=row["id"], gold=gold, labels=labels,  # --reframe none: no view 1 to score
                            format=float(np.mean([rewards.format_score(t) for t in t1])) if t1 else None,
                            p_div=rewards.div_penalty(a0, a1) if e1 else None))
    return records


def train_step(model, policy, sampler, tokenizer, optimizer, scheduler, ref_model, rows, args, generator,
               stops, pad_id, autocast):
    """Algorithm 1 on one batch of questions: both views drawn from the sampling copy, every selector's
    labels, rewards, one GRPO update on both views' rollouts (by default each view's token-mean, the two
    added), the sampling copy refreshed with the new weights. policy: the model, or under FSDP its Scorer."""
    t0 = time.perf_counter()
    scale.peak_gib(sampler.device)  # counts from here
    sampler.eval()  # on the CPU the sampler is the policy, which the update left in training mode
    episodes, rewrites = rollout(sampler, tokenizer, rows, args, generator, stops)
    t1, mem_sample = time.perf_counter(), scale.peak_gib(sampler.device)
    records = label_and_reward(rows, episodes, args)
    # advantages per question and per view: rollout's order is view 0's episodes then view 1's, G a question
    advantages = torch.cat([grpo.group_advantages([e.reward for e in episodes if e.view == v],
                                                  args.n_rollouts, scale=args.adv_scale)
                            for v in (0, 1) if any(e.view == v for e in episodes)])  # --reframe none: view 0
    for e, a in zip(episodes, advantages.tolist()):
        e.advantage = a
    pairs = [(e.prompt, e.completion) for e in episodes]
    views = torch.tensor([e.view for e in episodes])
    batch = grpo.Rollouts(*grpo.pad_rollouts(pairs, pad_id), advantages, views=views).to(model.device)
    t2 = time.perf_counter()
    policy.train()
    with autocast, scale.work_bar(len(episodes), "update", "row") as bar:
        stats = grpo.step(policy, optimizer, batch, None if args.micro_batch_tokens else args.micro_batch,
                          ref_model, scheduler, max_grad_norm=args.max_grad_norm, clip_eps=args.clip_eps,
                          kl_coef=args.kl_coef, temperature=args.temperature, agg=args.loss_agg,
                          micro_batch_tokens=args.micro_batch_tokens or None, progress=bar.update)
    scale.sync_sampling_copy(sampler, model)
    stats.update(t_sample=t1 - t0, t_reward=t2 - t1, t_update=time.perf_counter() - t2)
    if mem_sample is not None:  # CUDA: the peaks that the start-up's memory estimate predicts
        stats.update(mem_sample=mem_sample, mem_update=scale.peak_gib(sampler.device))
    return dict(records=records, episodes=episodes, rewrites=rewrites, stats=stats)

# -----------------------------------------------------------------------------
# The loop: its flags (one line each where it fits; argparse says each default in --help), then main

parser = argparse.ArgumentParser(description="Self-Harmony test-time RL (defaults: the release's settings).",
                                 formatter_class=DefaultsHelp, allow_abbrev=False)
flag = parser.add_argument
# model and data
flag("--model", default="Qwen/Qwen3-1.7B-Base", help="hub id, local folder, .gguf, 'smollm2' or 'tiny'")
flag("--data", default="math500", help="benchmark name, 'arith', or a .jsonl file in the schema")
flag("--data-dir", default=None, help="folder of the benchmark files (default: $SELFHARMONY_DATA)")
flag("--limit", type=number(int, 1), default=None, help="train on the first N questions only (default: all)")
flag("--arith-n", type=number(int, 1), default=16, help="arith: number of questions")
flag("--arith-seed", type=int, default=0, help="arith: which question set")
flag("--arith-level", type=number(int, 1, 3), default=1,
     help="arith: 1 one-digit sums, 2 two-digit +/-, 3 two steps")
# the method
flag("--selector", default="hms", choices=hms.SELECTORS, help="pseudo-label selector that trains")
flag("--reframe", default="fused", choices=("fused", "separate", "given", "none"),
     help="how view 1 is made (none: no view 1, TTRL: with --selector mv0, view 0 trains on its own vote)")
flag("--reward", default="gated", choices=rewards.MODES, help="fused reward: gated (paper) or additive")
flag("--w-format", type=number(float, 0, 1), default=0.1, help="weight of the format penalty P_format")
flag("--w-div", type=number(float, 0, 1), default=0.1, help="weight of the diversity penalty P_div")
flag("--n-rollouts", type=number(int, 2), default=16, help="G: rollouts a question in each view")
# sampling
flag("--batch-size", type=number(int, 1), default=128, help="questions a step, over all ranks")
flag("--max-prompt-tokens", type=number(int, 1), default=1024, help="longest prompt; longer is an error")
flag("--max-new-tokens", type=number(int, 1), default=3072, help="longest completion")
flag("--thinking-block", action="store_true",
     help="render with enable_thinking=False (Qwen3 then adds an empty <think></think>); the release passes "
          "no flag")
flag("--engine", default=None, choices=("eager", "fast"),
     help="sampler: fast (engine.py: slot pool, CUDA graphs; default on cuda) or eager (the reference; "
          "default on cpu)")
flag("--kv-cache-gb", type=number(float, 0, above=True), default=None,
     help="KV cache budget; sets the rows in flight (default on cuda: half of the memory left free once the "
          "gradients and AdamW's state are set aside; on cpu: one view's rollouts at a time)")
flag("--temperature", type=number(float, 0, above=True), default=1.0,
     help="sampling temperature, also divides logits when scoring")
# optimisation
flag("--lr", type=number(float, 0, 1e37, above=True), default=3e-6, help="AdamW learning rate")
flag("--weight-decay", type=number(float, 0), default=0.01, help="AdamW weight decay")
flag("--warmup", type=number(float, 0, 1), default=0.1,
     help="share of the steps for linear warm-up, then cosine (the first step at 1/warm-up steps of --lr, "
          "where the release's is at 0)")
flag("--kl-coef", type=number(float, 0), default=0.005,
     help="beta of the k3 KL loss term (0: no reference model)")
flag("--clip-eps", type=number(float, 0, above=True), default=0.2, help="PPO clip range")
flag("--max-grad-norm", type=number(float, 0, above=True), default=1.0, help="gradient-norm clip")
flag("--loss-agg", default="view-token-mean", choices=("view-token-mean", "token-mean", "seq-mean"),
     help="each view's token-mean over the step, added (the release: per micro-batch), one token-mean over "
          "both views, or seq-mean")
flag("--adv-scale", default="std", choices=("std", "none"), help="divide advantages by the group std or not")
flag("--micro-batch", type=number(int, 1), default=8,
     help="rows a forward/backward pass, in order, when --micro-batch-tokens is 0")
flag("--micro-batch-tokens", type=number(int, 0), default=None,
     help="rows sorted by length, as many a pass as fill this many row x column slots, a longer row alone "
          "(0: off; default on cuda 16384, halved until the memory estimate fits, not below the longest "
          "row; on cpu 0)")
flag("--grad-checkpointing", type=number(int, 0), nargs="?", const=1, default=0, metavar="N",
     help="recompute activations in backward (saves memory): every layer's, or every N-th layer's (2: half "
          "the recomputation, about half the memory saved)")
flag("--compile", action="store_true",
     help="torch.compile the decoder layers, in the update (scale.compile_layers) and in the fast engine's "
          "decode step (engine.COMPILE): fewer, fused kernels after tens of seconds of compilation")
flag("--fsdp", action="store_true",
     help="under torchrun: shard the weights, gradients, AdamW state and reference over the ranks (FSDP2); "
          "each rank samples with a whole copy in the compute dtype")
flag("--steps", type=number(int, 1), default=None,
     help="optimiser steps (default: --epochs over the questions)")
flag("--epochs", type=number(int, 1), default=100, help="passes over the questions when --steps is not given")
# evaluation, logging, checkpoints
flag("--eval-every", type=number(int, 0), default=0,
     help="mean@k on the same questions every N steps (0: start and end only)")
flag("--eval-n", type=number(int, 1), default=16, help="samples a question for mean@k (paper: 16)")
flag("--eval-max-new-tokens", type=number(int, 1), default=None,
     help="longest eval completion (default: --max-new-tokens)")
flag("--no-eval", action="store_true", help="skip evaluation entirely")
flag("--log-texts", type=number(int, 0), default=2, help="full rollout texts logged a step and view")
flag("--explain", action="store_true",
     help="print each step's table of its first questions (answers, labels, rewards); also to explain.jsonl")
flag("--explain-questions", type=number(int, 1), default=1, help="questions a step --explain shows")
flag("--save-every", type=number(int, 0), default=10, help="checkpoint every N steps (0: only at the end)")
flag("--save-minutes", type=number(float, 0), default=30,
     help="also checkpoint when this long has passed since the last one (0: never by time)")
flag("--out-dir", default=None,
     help="log, samples, checkpoint and plot go here (default: a new runs/<model>-<data>-<selector>-<time>)")
flag("--plot", action="store_true", help="only draw <out-dir>/curves.png from its log.jsonl, and exit")
flag("--resume", action="store_true", help="continue from <out-dir>/ckpt")
flag("--stop-after", type=number(int, 0), default=0,
     help="stop after N steps of this run with a checkpoint, as Ctrl-C does")
flag("--device", default=None, help="torch device (default: cuda if available, else cpu)")
flag("--dtype", default=None, choices=("float32", "bfloat16"),
     help="compute dtype of sampling and the update's autocast (default: bfloat16 on cuda, float32 on cpu)")
flag("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of data order and sampling")


def parse_args(argv=None):
    return parser.parse_args(argv)


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
    if args.reframe == "none" and args.selector not in ("mv0", "mv", "gt"):
        raise SystemExit(f"--reframe none has view 0 alone, which --selector {args.selector} cannot label: "
                         "pass --selector mv0 (its own vote: TTRL) or gt")
    if args.batch_size % world or args.batch_size > len(questions):
        raise SystemExit(f"--batch-size {args.batch_size} must divide by {world} ranks and be "
                         f"<= {len(questions)} questions")
    return questions, args.steps or args.epochs * (len(questions) // args.batch_size)


def batch_indices(step, n_questions, batch_size, seed):
    """The questions of a step: a fresh shuffle each epoch, derived from (seed, step) alone, so a
    resumed run needs no saved data-order state."""
    epoch, k = divmod(step, n_questions // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n_questions)
    return order[k * batch_size : (k + 1) * batch_size].tolist(), epoch


def drawn_questions(start, total_steps, n_questions, batch_size, seed):
    """The questions that steps start .. total_steps - 1 draw (batch_indices'), each once: an epoch at a
    time, stopping once every question is drawn, so that a run of 10^15 steps is read in a few epochs."""
    per_epoch, drawn, step = n_questions // batch_size, set(), start
    while step < total_steps and len(drawn) < n_questions:
        epoch, k = divmod(step, per_epoch)
        end = min(total_steps, (epoch + 1) * per_epoch)  # this epoch's last step of the run, + 1
        order = np.random.default_rng([seed, epoch]).permutation(n_questions)
        drawn.update(order[k * batch_size : (end - epoch * per_epoch) * batch_size].tolist())
        step = end
    return drawn


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, device = scale.start_ranks(args)
    master = rank == 0
    args, out_dir, ckpt, state = run.open_run(args, argv)
    torch.manual_seed(args.seed)
    questions, total_steps = load_questions(args, world)
    start, skips = (state["step"], state.get("skips", 0)) if args.resume else (0, 0)  # skips: the NaN streak

    # weights stay float32 (AdamW's lr-3e-6 updates vanish in bfloat16); bfloat16 is autocast compute. Under
    # --fsdp the whole float32 weights stay on the CPU until fully_shard moves each rank's shard over
    compute_dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    autocast = torch.autocast(device.split(":")[0], dtype=compute_dtype,
                              enabled=compute_dtype != torch.float32)
    home = "cpu" if args.fsdp else device
    model, tokenizer, ref_model = run.load_models(args, ckpt, home)
    # the prompts of every question the run's steps draw fit --max-prompt-tokens: checked here, not hours in
    drawn = drawn_questions(start, total_steps, len(questions), args.batch_size, args.seed)
    prompts.first_prompts(tokenizer, [questions[i] for i in sorted(drawn)], args.reframe, args.thinking_block,
                          args.max_prompt_tokens)
    policy, sampler, ref_model = scale.prepare(model, ref_model, args, world, device, compute_dtype, master)
    optimizer = grpo.make_optimizer(model, args.lr, args.weight_decay)
    if not args.resume:  # AdamW's moments now, beside the weights (a resumed run loads them below)
        scale.allocate_state(optimizer)
    out_dir = run.make_run_dir(args, out_dir)
    scheduler = grpo.make_scheduler(optimizer, total_steps, args.warmup)
    if args.resume and run.restore(state, model, optimizer, scheduler, args, out_dir, total_steps):
        return  # a finished run
    del state  # a resumed run's AdamW state now lives in the optimizer
    stops = sample.stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if master:
        run.print_start(args, len(questions), total_steps, world, device)
    log_path = out_dir / "log.jsonl"
    evaluate_at = lambda s: evaluate_at_step(s, sampler, tokenizer, questions, args, rank, world, log_path)

    last_save, step = time.monotonic(), start - 1  # step: the one in progress, for exits_explained
    with (run.stop_signals() as stop, run.exits_explained(out_dir, lambda: step + 1),
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
            everything = scale.gather({**out, "episodes": [replace(e, prompt=None, text=None)
                                                           for e in out["episodes"]]}, world)
            if master:
                run.log_step(out_dir, step + 1, epoch, everything, out, rows, args, bar.write)
            bar.update()
            skips = run.count_skips(skips, out["stats"]["skipped"], step + 1)

            done = step + 1 == total_steps
            if args.stop_after and step + 1 - start >= args.stop_after and not done and not stop:
                stop.append(0)
            if args.eval_every and (step + 1) % args.eval_every == 0 and not done:
                evaluate_at(step + 1)
            # save_due on every rank (a collective), before the others: rank 0's stop request is every rank's
            if run.save_due(step + 1, args, last_save, stop) or stop or done:
                run.save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, step + 1, args, skips)
                last_save = time.monotonic()
            if stop:
                if master:
                    print(f"stopped after step {step + 1}; continue with --resume")
                break
        else:
            evaluate_at(total_steps)
            if master:
                run.plot_run(out_dir)
    if ddp:
        dist.destroy_process_group()
    run.let_go(out_dir)
    if stop and stop[0]:  # stopped by a signal (0: --stop-after), the checkpoint written
        raise SystemExit(128 + stop[0])


if __name__ == "__main__":
    main()
