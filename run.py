"""
A run's life on disk: the machinery behind the loop, from the command line to its folder.

  flags        the number types that refuse a bad value in one line, the help that says each default once;
               which flags define a run (RUN_FLAGS: --resume takes them from the checkpoint and refuses
               other values) and which steer it (KEPT_FLAGS: --resume keeps the run's unless given again)
  the folder   --out-dir, or a new runs/<model>-<data>-<selector>-<time>, checked before anything loads
               and made only once the start-up's checks have passed; a new run's flags go to flags.json;
               one process at a time runs in it (its lock, which the kernel drops when the process ends)
  checkpoints  ckpt/, a Hugging Face folder plus trainer.pt (AdamW, schedule, step, NaN streak, flags),
               written beside and renamed into place after an fsync, so a run killed at any moment keeps a
               whole checkpoint; --resume cuts the logs back to its step and goes on as if never stopped
  log lines    log.jsonl (a step's numbers, strict JSON), samples.jsonl (a step's first rollout texts),
               the line under the progress bar, curves.png (with matplotlib)
  stopping     Ctrl-C or SIGTERM finishes the step, saves and exits 130 / 143; a second Ctrl-C stops at
               once; out of memory or disk is one line that says what to do; NaN or inf gradients skip
               their update, and MAX_SKIPS of them in a row stop the run
"""

import argparse
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import grpo
import hms
import rewards
import scale
from models import load_model

MAX_SKIPS = 3  # updates in a row skipped for a NaN or inf gradient before the run stops

# -----------------------------------------------------------------------------
# Flags


def number(kind, low=None, high=None, above=False):
    """An argparse type: a finite `kind` (int or float) >= low (> low if above) and <= high; anything
    else is one clear line from argparse ("argument --n-rollouts: must be an integer >= 2, not 1")."""
    name = "an integer" if kind is int else "a number"
    bounds = " and ".join(b for b in (low is not None and f"{'>' if above else '>='} {low}",
                                      high is not None and f"<= {high}") if b)
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {name}, not {text!r}")
        if (not math.isfinite(x) or (low is not None and (x <= low if above else x < low))
                or (high is not None and x > high)):
            raise argparse.ArgumentTypeError(f"must be {name} {bounds}, not {text}")
        return x
    return parse


def numbers(kind, low=None, high=None, count=None):
    """An argparse type: comma-separated `number`s ("64,256,512"), exactly `count` of them if count is set."""
    one, name = number(kind, low, high), "integers" if kind is int else "numbers"
    def parse(text):
        items = text.split(",")
        if count is not None and len(items) != count:
            raise argparse.ArgumentTypeError(f"must be {count} comma-separated {name}, not {text!r}")
        return [one(x) for x in items]
    return parse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each flag's default after it, unless its help speaks of the default itself."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


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
              "save_minutes", "micro_batch", "grad_checkpointing", "dtype", "explain", "explain_questions")


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
# The folder and its checkpoints


def open_run(args, argv):
    """The run's --out-dir and, under --resume, the state of its checkpoint. Refuses to write over another
    run; a run killed before its first checkpoint starts over; a resumed run takes its own flags
    (resume_args). --plot draws the curves of the folder's log and exits here. Makes nothing: the folder is
    made by make_run_dir once the start-up checks have passed. A folder another process runs in is one line
    (hold). Returns (args, out_dir, ckpt, state): out_dir None for a new run with no --out-dir, state None
    unless resuming."""
    ddp, master = scale.ranks()
    if args.out_dir is None:
        if args.resume or args.plot:
            raise SystemExit("--resume and --plot need the run's --out-dir")
        check_out_dir("runs")
        return args, None, None, None
    out_dir = Path(args.out_dir)
    if args.plot:
        png = (plot(out_dir / "log.jsonl", out_dir / "curves.png") if (out_dir / "log.jsonl").exists()
               else None)
        raise SystemExit(f"wrote {png}" if png
                         else f"no plot: {out_dir}/log.jsonl missing or matplotlib not installed")
    check_out_dir(args.out_dir)
    if master and (out_dir / "lock").is_file():  # a run's folder: this process holds it before reading it
        hold(out_dir)
    for name in ("log.jsonl", "samples.jsonl", "flags.json"):
        if (out_dir / name).exists() and not (out_dir / name).is_file():
            raise SystemExit(f"{out_dir / name} is not a file: {out_dir} holds no run of this project; pass "
                             "another --out-dir")
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
        for name in ("log.jsonl", "samples.jsonl", "explain.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        args.resume = False
    return args, out_dir, ckpt, state


def check_out_dir(out_dir):
    """One line, before anything loads or is written, when --out-dir cannot be a run's folder: no name, a
    file, a folder below a file, a name too long, or a place this process cannot write in (a read-only
    disk, /proc, another user's folder). Tried by making and removing a folder where the run's will be."""
    if not str(out_dir):
        raise SystemExit("--out-dir '' names no folder: pass the run's folder")
    path = Path(out_dir).absolute()
    there, to_make = Path(path.anchor), list(path.parts[1:])  # there: the deepest part that exists
    while to_make and len(to_make[0]) <= os.pathconf(there, "PC_NAME_MAX") and (there / to_make[0]).exists():
        there = there / to_make.pop(0)
    if not there.is_dir():
        raise SystemExit(f"--out-dir {out_dir}: {there} is a file, not a folder")
    longest = os.pathconf(there, "PC_NAME_MAX")
    if any(len(name) > longest for name in to_make):
        raise SystemExit(f"--out-dir {out_dir}: a name in it is longer than the {longest} characters a name "
                         "can have here")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selfharmony-", dir=there))
    except OSError as e:
        raise SystemExit(f"--out-dir {out_dir}: cannot write in {there} ({e.strerror or e})")


_HELD = {}  # the run folders this process holds: folder -> its lock file, open (the lock lives while it is)


def hold(out_dir):
    """One process a run folder: a lock on out_dir/lock, taken before the run first writes there and held
    until it ends (let_go) or its process does (the kernel then drops it, after a kill -9 too). A folder
    that another process holds is one line naming its process id. The lock is fcntl's, which belongs to
    a process: the same process takes it again at once (a test that runs, then resumes, in one process)."""
    folder = Path(out_dir).resolve()
    if folder in _HELD:
        return
    lock = open(folder / "lock", "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SystemExit(f"{out_dir} is in use by another run (process {holder}): wait for it to end, or "
                         "pass another --out-dir")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _HELD[folder] = lock


def let_go(out_dir):
    """The folder hold took, free for another process."""
    lock = _HELD.pop(Path(out_dir).resolve(), None)
    if lock is not None:
        lock.close()


def unreadable(path, error):
    """The message for a run file that exists but cannot be read (a damaged disk, a hand edit): the
    checkpoints themselves are written atomically."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"--resume: cannot read {path} ({type(error).__name__}: {first}); the run cannot continue "
            "from it: start it again in another --out-dir")


def make_run_dir(args, out_dir):
    """The run's folder, made once the start-up checks have passed (a start that fails leaves none):
    --out-dir, or a new runs/<model>-<data>-<selector>-<time>, which a run started in the same second
    cannot take too (it gets -2, -3, ...). A new run's flags go to its flags.json, for a --resume before
    its first checkpoint."""
    ddp, master = scale.ranks()
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
    if master:
        hold(out_dir)
    if master and not args.resume:
        tmp = out_dir / "flags.json.tmp"
        tmp.write_text(json.dumps({k: getattr(args, k) for k in RUN_FLAGS + KEPT_FLAGS}))
        os.replace(tmp, out_dir / "flags.json")
    return out_dir


def load_models(args, ckpt, device):
    """The model to train, its tokenizer and its frozen KL reference (None under --kl-coef 0), all in
    float32: the run's --model and a copy of it, or a resumed run's checkpoint and its --model again (the
    reference is the starting model). A checkpoint that cannot be read is one line (load_model's own
    messages are one line already: SystemExits, not Exceptions)."""
    try:
        model, tokenizer = load_model(str(ckpt) if args.resume else args.model, device, torch.float32)
    except Exception as e:  # a damaged checkpoint
        if not args.resume:
            raise
        raise SystemExit(unreadable(ckpt, e))
    ref_model = None
    if args.kl_coef:
        ref_model = (load_model(args.model, device, torch.float32)[0] if args.resume
                     else grpo.make_reference(model, args.kl_coef))
        ref_model.requires_grad_(False)
    return model, tokenizer, ref_model


def save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, step, args, skips=0):
    """The checkpoint of `step`: the model as a Hugging Face folder plus trainer.pt (AdamW, schedule, step,
    the NaN streak `skips`, flags). Under torchrun every rank calls it: under --fsdp the weights and AdamW's
    state are gathered whole onto rank 0's CPU (AdamW's keyed by weight name), rank 0 writes, and every rank
    waits for it."""
    ddp, master = scale.ranks()
    weights, optim = None, None  # weights None: save_pretrained reads the model's own
    if args.fsdp:
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optim = (get_model_state_dict(model, options=whole),
                          get_optimizer_state_dict(model, optimizer, options=whole))
        own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        weights = {k: v for k, v in weights.items() if k in own}  # a tied lm_head comes back as a second copy
    elif master:
        optim = optimizer.state_dict()
    if master:
        trainer = {"step": step, "skips": skips, "optimizer": optim, "scheduler": scheduler.state_dict(),
                   "args": vars(args)}
        write_checkpoint(out_dir, model, tokenizer, weights, trainer)
    if ddp:
        dist.barrier()


def write_checkpoint(out_dir, model, tokenizer, weights, trainer):
    """ckpt/, written beside as ckpt.tmp and then renamed in, so that a kill at any moment leaves a whole
    checkpoint that --resume reads: ckpt, or (between the two renames) ckpt.old; and the next save works
    from any state a kill leaves (a ckpt.tmp, a ckpt.old beside ckpt or alone). A write that fails (a full
    disk) is one line, leaves no ckpt.tmp, and the last checkpoint stands."""
    tmp, final, old = out_dir / "ckpt.tmp", out_dir / "ckpt", out_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer, tmp / "trainer.pt")
        sync(tmp)  # on disk before the rename: a crash or power cut never leaves a renamed, half-written ckpt
    except (OSError, RuntimeError, SafetensorError) as e:
        # a full disk: torch says "[enforce fail at inline_container.cc:672]", safetensors "No space left"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2**30
        raise SystemExit(f"could not write the checkpoint of step {trainer['step']} to {out_dir} "
                         f"({str(e).strip()[:200]}); {free:.1f} GiB free there. The last checkpoint stands: "
                         "free some space, then --resume")
    if final.exists():  # a ckpt.old beside a whole ckpt is stale: a kill after the second rename left it
        shutil.rmtree(old, ignore_errors=True)
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


def restore(state, model, optimizer, scheduler, args, out_dir, total_steps):
    """A resumed run's AdamW state and schedule from its checkpoint's `state`, and its logs cut back to
    the checkpoint's step. Returns whether the run had already finished (and says so): all its steps
    done and its final evaluation logged (or --no-eval)."""
    ddp, master = scale.ranks()
    if args.fsdp:  # the whole state, keyed by weight name; each rank takes its shard
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if master:
        for path in (out_dir / "log.jsonl", out_dir / "samples.jsonl", out_dir / "explain.jsonl"):
            truncate_log(path, state["step"])
    if ddp:
        dist.barrier()
    logged = ([json.loads(line) for line in open(out_dir / "log.jsonl")]
              if (out_dir / "log.jsonl").exists() else [])
    final_eval = any("eval" in r and r["step"] == total_steps for r in logged)
    ended = state["step"] >= total_steps and (final_eval or args.no_eval)
    if ended and master:
        print(f"{out_dir} holds a finished run ({total_steps} steps): nothing to do")
        let_go(out_dir)
    return ended


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

# -----------------------------------------------------------------------------
# Log lines


def strict_json(obj):
    """json.dumps with NaN and inf written as null, so every log line is valid JSON for any reader."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(obj), allow_nan=False)


def log_line(path, row):
    """One strict JSON line appended to a log."""
    with open(path, "a") as f:
        f.write(strict_json(row) + "\n")


def step_summary(records, episodes, rewrites):
    """The step's numbers (over all ranks' questions): rewards, every selector's label accuracy, shapes.
    records: label_and_reward's, a question each; episodes: every rollout, its answer and reward filled in.
    Under --reframe none there is no view 1: its numbers, format and P_div are None (null in log.jsonl)."""
    gold = {rec["id"]: rec["gold"] for rec in records}
    views = [e for e in episodes if e.view == 0], [e for e in episodes if e.view == 1]
    G = len(views[0]) // len(records)
    mean = lambda xs: float(np.mean(xs)) if xs and None not in xs else None
    out = {f"reward{v}": mean([e.reward for e in views[v]]) for v in (0, 1)}
    for s in hms.SELECTORS:  # (label of view 0, label of view 1): they differ under cross only
        out[f"label_acc/{s}"] = float(np.mean([y == rec["gold"] for rec in records
                                               for y in rec["labels"][s]]))
        out[f"no_label/{s}"] = float(np.mean([y is None for rec in records for y in rec["labels"][s]]))
    for v in (0, 1):  # how often each view reaches the gold answer: is the view invariance there?
        out[f"acc{v}"] = mean([e.answer == gold[e.question] for e in views[v]])
    out["hms_mv_agree"] = float(np.mean([rec["labels"]["hms"][0] == rec["labels"]["mv"][0]
                                         for rec in records]))
    flat = sum(grpo.count_flat_groups([e.reward for e in view], G) for view in views)
    out["flat_groups"] = flat / (len(records) * sum(bool(view) for view in views))
    out["format"] = mean([rec["format"] for rec in records])
    out["p_div"] = mean([rec["p_div"] for rec in records])
    for v in (0, 1):
        out[f"len{v}"] = mean([len(e.completion) for e in views[v]])
        out[f"truncated{v}"] = mean([not e.finished for e in views[v]])
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
    """The line a step writes under the progress bar (view 1's numbers "-" where there is none)."""
    acc = lambda s: "none" if row[f"no_label/{s}"] == 1 else f"{row[f'label_acc/{s}']:.2f}"
    two = lambda k, f: "/".join("-" if row[f"{k}{v}"] is None else format(row[f"{k}{v}"], f) for v in (0, 1))
    return (f"step {row['step']}: reward {two('reward', '.3f')}  label acc "
            f"hms {acc('hms')} mv {acc('mv')}  kl {row['kl']:.4f}  len {two('len', '.0f')}  "
            f"{row['t_sample'] + row['t_reward'] + row['t_update']:.1f}s (sampling {row['sample_tok_s']:.0f} "
            "tok/s)"
            + ("  SKIPPED: NaN or inf gradient, weights unchanged" if row["skipped"] else ""))


def print_start(args, n_questions, total_steps, world, device):
    """The start-up's lines: every flag, then the run's shape."""
    print(vars(args))
    left = n_questions % args.batch_size  # each epoch is a new shuffle: other questions wait each time
    print(f"{n_questions} questions, {args.batch_size} a step, {total_steps} steps, {world} rank(s), {device}"
          + (f"; each epoch's last {left} questions in its shuffled order wait for the next epoch" if left else ""))


def log_step(out_dir, step, epoch, everything, out, questions, args, write=print):
    """Rank 0's lines of a step: its row in log.jsonl (step_row, over every rank's part in `everything`), the
    texts of its first question in samples.jsonl (sample_lines, from its own `out`), the line under the
    progress bar (write), and under --explain the tables of its first --explain-questions questions, also
    into explain.jsonl."""
    row = {"step": step, "epoch": epoch, **step_row(everything)}
    log_line(out_dir / "log.jsonl", row)
    with open(out_dir / "samples.jsonl", "a") as f:
        f.writelines(sample_lines(out, questions[0], step, args))
    write(progress_line(row))
    for question in questions[: args.explain_questions] if args.explain else []:
        table = explanation(out, question, step, args)
        log_line(out_dir / "explain.jsonl", table)
        write("\n".join(hms.explanation_lines(table)))


def explanation(out, question, step, args):
    """--explain: one question's step as it trained, read from the step's own records (train_step's `out`):
    hms.explain's table of its answers and every selector's labels, then the label that trained, each view's
    rewards and advantages and, for the fused view, each rollout's format score and P_div."""
    record = next(r for r in out["records"] if r["id"] == question["id"])
    views = [[e for e in out["episodes"] if (e.question, e.view) == (question["id"], v)] for v in (0, 1)]
    table = hms.explain(*([e.answer for e in view] for view in views), record["labels"], record["gold"],
                        *([e.finished for e in view] for view in views))
    fused = args.reframe == "fused"
    return dict(step=step, id=question["id"], question=question["problem"], gold=record["gold"],
                selector=args.selector, **table, label=record["labels"][args.selector],
                views=["solve", args.reframe], rewards=[[e.reward for e in view] for view in views],
                advantages=[[e.advantage for e in view] for view in views],
                format=[rewards.format_score(e.text) for e in views[1]] if fused else None,
                p_div=record["p_div"] if fused else None)


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
    for v in ("0", "1"):  # under --reframe none, view 0 alone
        if any(r[f"reward{v}"] is not None for r in train):
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


def plot_run(out_dir):
    """curves.png of a finished run, or a line that says how to draw it later."""
    png = plot(out_dir / "log.jsonl", out_dir / "curves.png")
    print(f"wrote {png}" if png else "no curves.png: matplotlib is not installed "
          f"(pip install matplotlib, then python selfharmony.py --plot --out-dir {out_dir})")

# -----------------------------------------------------------------------------
# Stopping


def count_skips(skips, skipped, step):
    """The NaN streak after `step`: how many updates in a row were skipped for a NaN or inf gradient; the
    MAX_SKIPS-th stops the run (on every rank alike: the gradient norm is summed over ranks before it is
    judged)."""
    skips = skips + 1 if skipped else 0
    if skips == MAX_SKIPS:
        raise SystemExit(f"stopped at step {step}: the gradient was NaN or inf in {MAX_SKIPS} "
                         "steps in a row, and those updates were skipped (no checkpoint written "
                         "since). Start a new run with a lower --lr or --max-grad-norm: --resume "
                         "keeps the run's flags, and from its last checkpoint would draw these "
                         "steps' rollouts again")
    return skips


def save_due(step, args, last_save, stop_requested):
    """Whether a checkpoint is due after `step` (1-based) by --save-every or --save-minutes. Under
    torchrun rank 0's clock and signals decide for all (its stop request is every rank's), so that every
    rank reaches the same collectives."""
    ddp, _ = scale.ranks()
    due = ((args.save_every and step % args.save_every == 0)
           or (args.save_minutes and time.monotonic() - last_save >= 60 * args.save_minutes))
    if ddp:
        decision = [due, stop_requested[:1]]
        dist.broadcast_object_list(decision, src=0)
        due, stop_requested[:] = decision
    return due


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
