"""The loop: every logged field, own question and own mask per rollout, resume, two gloo ranks, bad input."""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo
import rewards
import selfharmony
from eval import load_benchmark
from sample import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--data", "arith", "--arith-n", "4", "--batch-size", "2", "--n-rollouts", "4",
        "--max-new-tokens", "12", "--eval-n", "2", "--lr", "1e-3", "--micro-batch", "4"]
STEP_FIELDS = ["step", "epoch", "reward0", "reward1", "acc0", "acc1", "hms_mv_agree", "flat_groups", "format",
               "p_div", "len0", "len1", "truncated0", "truncated1", "loss", "kl", "clip_frac", "ratio", "grad_norm",
               "lr", "pad_share", "t_sample", "t_reward", "t_update", "sample_tok_s"] + [
    f"{k}/{s}" for k in ("label_acc", "no_label") for s in ("hms", "mv", "mv0", "mv2", "cross", "gt")]


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def prompt_flags(reframe):
    """The flags first_prompts reads, with no limit on a prompt's length."""
    return types.SimpleNamespace(reframe=reframe, max_prompt_tokens=10**6, thinking_block=False)


def untimed(out):
    """The run's log without its timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if not k.startswith("t_") and k != "sample_tok_s"} for r in read_log(out)]


@pytest.mark.parametrize("extra", [
    ["--selector", "hms"], ["--selector", "mv"], ["--selector", "mv0"], ["--selector", "mv2"], ["--selector", "cross"],
    ["--selector", "gt"], ["--reframe", "given"],
    ["--reframe", "separate", "--engine", "fast", "--kv-cache-gb", "1e-4"],
    ["--engine", "fast", "--dtype", "bfloat16"],
    ["--reward", "additive"],
    ["--micro-batch-tokens", "40"],
])
def test_two_step_run_logs_every_field(tmp_path, extra):
    selfharmony.main(TINY + ["--steps", "2", "--out-dir", str(tmp_path)] + extra)
    rows = read_log(tmp_path)
    train = [r for r in rows if "reward0" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert set(STEP_FIELDS) <= set(r), set(STEP_FIELDS) - set(r)
        assert r["label_acc/gt"] == 1.0  # gold vs gold
        # 2 questions x 4 rollouts in each view
        assert r["sample_tok_s"] == pytest.approx(8 * (r["len0"] + r["len1"]) / r["t_sample"])
        if extra == ["--selector", "gt"]:  # the solver reward is then the accuracy the log measures
            assert r["acc0"] == pytest.approx(r["reward0"])
    if "separate" in extra:
        assert all("rewrite_failed" in r for r in train)
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2] and "mean@2" in evals[0]["eval"]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {s["view"] for s in samples} >= {"solve"} and all("text" in s for s in samples)
    model = type(tiny_model()).from_pretrained(tmp_path / "ckpt")  # a plain Hugging Face folder
    assert model.config.vocab_size == 259


def test_the_reframers_layout_is_the_one_rewards_reads():
    # each prompt's layout with its placeholders filled in: a full format score, and its rewritten problem
    fill = iter(["make it concrete", "Ann has 3 apples and gets 4 more. How many now?", "3 + 4 = \\boxed{7}"] * 2)
    for system, score in ((selfharmony.FUSED_SYSTEM, 1.0), (selfharmony.REWRITE_SYSTEM, 2 / 3)):
        layout = re.sub(r"<[^<>]*>", lambda _: next(fill), system.split("layout:\n")[1])
        assert rewards.format_score(layout) == pytest.approx(score)  # the rewrite asks for no SOLUTION
        assert rewards.rewritten_problem(layout) == "Ann has 3 apples and gets 4 more. How many now?"


def episodes_of(rows, texts0, texts1, done0, done1, lengths=(1, 1)):
    """The episodes rollout gives for these completions: view 0's, then view 1's, each question's G together
    (G = len(texts0) // len(rows)); completions of lengths[view] tokens."""
    G = len(texts0) // len(rows)
    return [selfharmony.Episode(rows[i // G]["id"], v, [0], [0] * lengths[v], text, done)
            for v, texts, dones in ((0, texts0, done0), (1, texts1, done1))
            for i, (text, done) in enumerate(zip(texts, dones))]


def test_each_rollout_is_rewarded_against_its_own_question():
    # two questions with different gold answers and different labels; G = 4 per view
    rows = [{"id": "a", "problem": "1 + 2?", "answer": "3"}, {"id": "b", "problem": "3 + 4?", "answer": "7"}]
    box = lambda x: f"so \\boxed{{{x}}}"
    fused = lambda x: f"STRATEGY: story\nREWRITTEN PROBLEM: Ann has 1 and gets 2.\nSOLUTION: {box(x)}"
    texts0 = [box(3), box(3), box(5), box(3)] + [box(7), box(8), box(8), box(8)]
    texts1 = [fused(3), "STRATEGY: x\nSOLUTION: " + box(3), fused(4), fused(4)] + [fused(7)] * 4
    args = selfharmony.parse_args(["--w-format", "0.1", "--w-div", "0.0"])  # G = 16 by default: set 4
    args.n_rollouts = 4
    done = ([True] * 8, [False] * 8)  # view 1 cut off: it still has its boxed answers
    episodes = episodes_of(rows, texts0, texts1, *done, lengths=(2, 3))
    records = selfharmony.label_and_reward(rows, episodes, args)
    r0, r1 = ([e.reward for e in episodes if e.view == v] for v in (0, 1))
    # a: 3 is the only answer in both views -> y* = 3. b: 8 never appears in view 1, so HMS picks
    # 7 (HM = 2 * 1/4 * 1 / (5/4) = 0.4) where the vote over view 0 picks 8
    assert [rec["labels"]["hms"][0] for rec in records] == ["3", "7"]
    assert [rec["labels"]["mv"][0] for rec in records] == ["3", "8"]
    assert r0 == [1, 1, 0, 1, 1, 0, 0, 0]
    # fused: gated by correctness, the second rollout of a misses REWRITTEN PROBLEM: 1 - 0.1 * 1/3
    assert r1 == pytest.approx([1, 1 - 0.1 / 3, 0, 0, 1, 1, 1, 1])
    # what the log measures against the hidden gold answers (3 and 7), by hand
    log = selfharmony.step_summary(records, episodes, None)
    assert log["acc0"] == 4 / 8 and log["acc1"] == 6 / 8
    # mv: a's views vote 3 and 3 (a 3/4 tie, the smaller string), b's 8 and 7: 3 of 4 labels right;
    # mv0 gives view 0's 3 and 8 to both views: 2 of 4
    assert log["label_acc/hms"] == 1.0 and log["label_acc/mv"] == 0.75 and log["label_acc/mv0"] == 0.5
    assert log["hms_mv_agree"] == 0.5
    assert log["truncated0"] == 0.0 and log["truncated1"] == 1.0 and log["flat_groups"] == 1 / 4
    assert log["len0"] == 2 and log["len1"] == 3
    # two ranks, a question each: question a's 20 completion tokens, b's 8; the update's KL, clip fraction
    # and ratio come as each rank's token mean, and the log gives the token mean over both
    rank_b = episodes_of(rows[1:], texts0[4:], texts1[4:], *done, lengths=(1, 1))
    parts = [(records[:1], [e for e in episodes if e.question == "a"], 0.1), (records[1:], rank_b, 0.8)]
    stats = lambda kl: dict(loss=kl, kl=kl, clip_frac=kl, ratio=kl, grad_norm=1.0, lr=1e-6, pad_share=0.0,
                            t_sample=2.0, t_reward=0.0, t_update=1.0, skipped=False)
    row = selfharmony.step_row([dict(records=r, episodes=e, rewrites=None, stats=stats(kl)) for r, e, kl in parts])
    assert row["kl"] == row["clip_frac"] == row["ratio"] == pytest.approx((0.1 * 20 + 0.8 * 8) / 28)
    assert row["loss"] == pytest.approx(0.9) and row["sample_tok_s"] == pytest.approx(20 / 2 + 8 / 2)


def test_a_rewrite_that_misses_the_layout_or_runs_on_falls_back_to_the_question(monkeypatch):
    # separate reframing: question a's rewrite is fine, b's misses REWRITTEN PROBLEM, c's runs on so long that
    # its solver prompt would be over --max-prompt-tokens (an error for a question, not for a model's rewrite)
    tokenizer = byte_tokenizer()
    rows = [{"id": q, "problem": f"{q}: 1 + 2?", "answer": "3"} for q in "abc"]
    rewrites = ["Ann has 1 apple and gets 2.", None, "Ann has " + "many " * 120 + "apples."]
    texts = [f"STRATEGY: story\nREWRITTEN PROBLEM: {x}\nSOLUTION: 3" if x else "SOLUTION: 3" for x in rewrites]

    def fake_generate(model, prompts, max_new_tokens, n=1, **kw):  # the rewrites when asked for one a question
        return [tokenizer.encode(t) for t in texts] if n == 1 else [[1]] * (len(prompts) * n)

    monkeypatch.setattr(selfharmony, "generate", fake_generate)
    args = selfharmony.parse_args(["--reframe", "separate", "--max-prompt-tokens", "600", "--n-rollouts", "2"])
    episodes, got = selfharmony.rollout(None, tokenizer, rows, args, None, [])
    assert got == [rewrites[0], None, None] and [(e.question, e.view) for e in episodes] == [
        (q, v) for v in (0, 1) for q in "abc" for _ in range(2)]
    prompts0, prompts1 = ([e.prompt for e in episodes if e.view == v][::2] for v in (0, 1))
    assert prompts1[1:] == prompts0[1:] and prompts1[0] != prompts0[0]
    assert rewrites[0] in tokenizer.decode(prompts1[0]) and len(prompts1[0]) <= 600
    assert len(selfharmony.solver_prompt(tokenizer, rows[2], args)) < 600  # c's own question fits


def final_weights(out):
    return load_file(out / "ckpt" / "model.safetensors")


def test_resume_gives_the_same_next_step(tmp_path):
    common = TINY + ["--steps", "3", "--no-eval", "--kl-coef", "0.01"]
    selfharmony.main(common + ["--out-dir", str(tmp_path / "straight")])
    selfharmony.main(common + ["--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    assert [r["step"] for r in read_log(tmp_path / "split")] == [1, 2]
    selfharmony.main(common + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert untimed(tmp_path / "split") == untimed(tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--resume"):  # a fresh run never writes over a finished one
        selfharmony.main(common + ["--out-dir", str(tmp_path / "straight")])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update_on_rows(rows, out_path, fsdp=False):
    """One grpo.step of the loop's batch layout on the given rollout rows (run under gloo or alone;
    fsdp: the model and reference sharded over the ranks, micro-batches by a token budget)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 259, (3 + i % 4,), generator=gen).tolist(),
              torch.randint(0, 259, (2 + (5 * i) % 7,), generator=gen).tolist()) for i in range(8)]
    advantages = torch.randn(8, generator=gen)
    model = tiny_model("qwen3")
    ref = grpo.make_reference(model, 0.05)
    policy = model.train()
    if fsdp:
        policy, ref = grpo.shard(model), grpo.shard(ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # weights move by the gradient itself (Adam's
    # first step is ~lr * sign(grad), which turns float noise on near-zero gradients into full steps)
    views = [0, 0, 0, 0, 1, 1, 1, 1]  # the loop's layout: view 0's rows, then view 1's
    batch = grpo.Rollouts(*grpo.pad_rollouts([pairs[i] for i in rows], pad_id=256), advantages[rows],
                          views=torch.tensor([views[i] for i in rows]))
    # no clipping: a clipped step has one norm whatever the gradient's scale, and the scale is what ranks add up
    grpo.step(policy, optimizer, batch, 2, ref, kl_coef=0.05, micro_batch_tokens=20 if fsdp else None,
              max_grad_norm=float("inf"))
    if fsdp:  # every weight back to this rank's shard, the reference's root too (it ran forward only)
        from torch.distributed.tensor import DTensor
        assert all(isinstance(p, DTensor) for m in (policy, ref) for p in m.parameters())
    weights = {k: v.full_tensor() if fsdp else v for k, v in model.state_dict().items()}
    if out_path:
        torch.save(weights, out_path)
    return weights


def test_resume_refuses_changed_run_flags_and_takes_the_rest_from_the_run(tmp_path, capsys):
    run = ["--no-eval", "--out-dir", str(tmp_path)]
    selfharmony.main(TINY + ["--steps", "3", "--stop-after", "1"] + run)
    for flag, value in (("--n-rollouts", "8"), ("--model", "tiny-llama"), ("--steps", "5")):
        with pytest.raises(SystemExit, match=rf"{flag} {value} \(the run's: "):
            selfharmony.main(TINY + [flag, value, "--resume"] + run)
    with pytest.raises(SystemExit, match=r"--n-rollouts 8 \(the run's: 4\)"):  # --flag=value is the flag too
        selfharmony.main(["--n-rollouts=8", "--resume"] + run)
    # no run flag given: model (also the KL reference), data and steps come from the checkpoint
    selfharmony.main(["--resume"] + run)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    capsys.readouterr()
    selfharmony.main(["--resume"] + run)  # once more: the run is finished (and, --no-eval, owes no evaluation)
    assert capsys.readouterr().out.endswith("holds a finished run (3 steps): nothing to do\n")


def test_sigterm_finishes_the_step_saves_and_exits_with_the_signals_status(tmp_path, monkeypatch):
    # a scheduler's SIGTERM during step 1: the step ends, the checkpoint is written, the exit status is 143
    # (128 + SIGTERM), so a wrapper sees a run cut short; the handlers are put back; --resume goes on
    real = selfharmony.train_step

    def step_then_sigterm(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(selfharmony, "train_step", step_then_sigterm)
    run, before = ["--no-eval", "--out-dir", str(tmp_path)], signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        selfharmony.main(TINY + ["--steps", "3"] + run)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r["step"] for r in read_log(tmp_path)] == [1] and (tmp_path / "ckpt" / "trainer.pt").exists()
    monkeypatch.setattr(selfharmony, "train_step", real)
    selfharmony.main(["--resume"] + run)  # returns: a finished run exits 0
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"trainer.pt", "config.json", "model.safetensors"} <= files
    assert {str(tmp_path / "ckpt.tmp" / f) for f in files} | {str(tmp_path)} <= set(synced)


def test_a_run_killed_between_the_checkpoints_two_renames_resumes_from_the_one_before(tmp_path, monkeypatch):
    # a save moves ckpt to ckpt.old, then ckpt.tmp to ckpt: killed in between, ckpt.old is the run's checkpoint
    argv = TINY + ["--steps", "3", "--no-eval", "--save-every", "1", "--out-dir", str(tmp_path)]
    real_replace, real_step, steps = os.replace, selfharmony.train_step, []

    def killed_before_the_second_rename(src, dst):
        if Path(src).name == "ckpt.tmp" and (tmp_path / "ckpt.old").exists():
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_second_rename)
    with pytest.raises(SystemExit):
        selfharmony.main(argv)
    assert not (tmp_path / "ckpt").exists()
    assert torch.load(tmp_path / "ckpt.old" / "trainer.pt", weights_only=False)["step"] == 1
    shutil.copytree(tmp_path / "ckpt.old", tmp_path / "only" / "ckpt.old")  # a new run never writes over it
    with pytest.raises(SystemExit, match="holds a run already"):
        selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path / "only")])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(selfharmony, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    selfharmony.main(argv + ["--resume"])
    assert len(steps) == 2 and [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]  # steps 2 and 3 again
    assert not (tmp_path / "ckpt.old").exists()
    # step 2's lines from before the kill are dropped from both logs: they hold what the uninterrupted run holds
    monkeypatch.setattr(selfharmony, "train_step", real_step)
    selfharmony.main(argv[:-1] + [str(tmp_path / "straight")])
    assert untimed(tmp_path) == untimed(tmp_path / "straight")
    assert (tmp_path / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()


def test_compiled_layers_under_fsdp_still_checkpoint_and_give_the_eager_gradient(tmp_path):
    # the loop's order under --fsdp --compile --grad-checkpointing: shard, then compile_layers. (Compiled before,
    # the layers would skip checkpointing under transformers 5.2x: FSDP2's subclass wraps forward again.) One gloo
    # rank; the layers' checkpoint calls are counted, the gradient compared with the eager sharded step
    script = f"""
import sys, torch, torch.distributed as dist
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import grpo
from test_grpo import rollouts_for, tiny_model
dist.init_process_group("gloo")
calls, grads = [], []
for compiled in (False, True):
    model, ref = tiny_model(tie=True), tiny_model(seed=5)
    batch = rollouts_for(model)
    grpo.set_checkpointing(model, True)
    policy, ref_sharded = grpo.shard(model.train()), grpo.shard(ref)
    for layer in model.get_decoder().layers:  # count the checkpoint calls of each layer
        layer._gradient_checkpointing_func = lambda *a, f=layer._gradient_checkpointing_func, **k: (
            calls.append(compiled), f(*a, **k))[1]
    if compiled:
        grpo.compile_layers(model)
    grpo.accumulate_gradients(policy, batch, None, ref_sharded, kl_coef=0.1, micro_batch_tokens=20)
    grads.append([p.grad.full_tensor() for p in model.parameters()])
assert calls.count(True) == calls.count(False) > 0, calls
assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
dist.destroy_process_group()
"""
    (tmp_path / "rank.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "WORLD_SIZE": "1"}
    subprocess.run([sys.executable, str(tmp_path / "rank.py")], check=True, env=env, cwd=tmp_path)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_gloo_ranks_equal_one_process_with_the_whole_batch(tmp_path, fsdp):
    # under FSDP the ranks also run unequal numbers of micro-batches (3 rows against 5, by tokens)
    script = f"""
import os, sys, torch, torch.distributed as dist
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from test_selfharmony import _update_on_rows
dist.init_process_group("gloo")
rank = dist.get_rank()
_update_on_rows([0, 1, 2] if rank == 0 else [3, 4, 5, 6, 7], {str(tmp_path)!r} + f"/rank{{rank}}.pt", {fsdp})
dist.destroy_process_group()
"""
    (tmp_path / "ranks.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), str(tmp_path / "ranks.py")], check=True, env=env, cwd=tmp_path)
    whole = _update_on_rows(list(range(8)), None)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(torch.allclose(got[k], whole[k], atol=1e-6) for k in whole)
    # and the unequal split really matters: one rank alone is a different update
    alone = _update_on_rows([0, 1, 2], None)
    assert not all(torch.allclose(alone[k], whole[k], atol=1e-6) for k in whole)


def torchrun(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), str(ROOT / "selfharmony.py")] + argv, check=True, env=env, cwd=cwd)


def test_the_loop_runs_under_torchrun_with_two_gloo_ranks(tmp_path):
    # each rank notes the questions it evaluates, then runs the loop
    script = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}]
import torch.distributed as dist, selfharmony
real = selfharmony.evaluate
def evaluate(model, tokenizer, rows, **kw):
    with open(f"evaluated{{dist.get_rank()}}.txt", "a") as f:
        f.write(" ".join(r["id"] for r in rows) + "\\n")
    return real(model, tokenizer, rows, **kw)
selfharmony.evaluate = evaluate
selfharmony.main(sys.argv[1:])
"""
    (tmp_path / "loop.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_free_port()), str(tmp_path / "loop.py")] + TINY
                   + ["--steps", "1", "--device", "cpu", "--out-dir", str(tmp_path / "run")],
                   check=True, env=env, cwd=tmp_path)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 1] and (tmp_path / "run" / "ckpt" / "config.json").exists()
    # the evaluations at steps 0 and 1: each rank sampled its own half of the 4 questions, and rank 0 logged
    # the metrics over all of them
    halves = [[line.split() for line in open(tmp_path / f"evaluated{rank}.txt")] for rank in (0, 1)]
    assert all(len(h) == 2 and h[0] == h[1] and len(h[0]) == 2 for h in halves)
    assert len(set(halves[0][0]) | set(halves[1][0])) == 4
    assert [r["eval"]["questions"] for r in rows if "eval" in r] == [4, 4]


def test_the_loop_under_fsdp_stops_resumes_and_samples_what_the_replicated_loop_samples(tmp_path):
    argv = TINY + ["--steps", "3", "--no-eval", "--device", "cpu", "--micro-batch-tokens", "64"]
    torchrun(argv + ["--out-dir", str(tmp_path / "replicated")], tmp_path)
    torchrun(argv + ["--fsdp", "--stop-after", "2", "--out-dir", str(tmp_path / "fsdp")], tmp_path)
    torchrun(argv + ["--resume", "--out-dir", str(tmp_path / "fsdp")], tmp_path)  # --fsdp from the checkpoint
    same = lambda r: {k: r[k] for k in ("step", "reward0", "reward1", "len0", "len1")}
    # the sampling copy is gathered from the shards after each update: step 2 and 3 sample the same texts
    assert [same(r) for r in read_log(tmp_path / "fsdp")] == [same(r) for r in read_log(tmp_path / "replicated")]
    a, b = final_weights(tmp_path / "replicated"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(SystemExit, match="made with --fsdp: resume it under torchrun"):
        selfharmony.main(argv + ["--resume", "--steps", "3", "--out-dir", str(tmp_path / "fsdp")])


@pytest.mark.parametrize("argv, message", [
    (["--selector", "vote"], None),  # argparse: invalid choice
    (["--seed", "-1"], "--seed: must be an integer >= 0"),  # numpy's generator takes no negative seed
    (["--data", "nope"], "unknown benchmark"),
    (["--data", "/no/such/file.jsonl"], "no such data file"),
    (["--max-prompt-tokens", "8"], "over --max-prompt-tokens 8"),
    (["--batch-size", "5"], "--batch-size 5"),
    (["--data", "math500", "--data-dir", str(ROOT.parent / "shared" / "data"), "--reframe", "given"], "reframed"),
    (["--resume"], "no checkpoint"),
    (["--device", "gpu"], "unknown device 'gpu'"),
])
def test_bad_input_is_a_clear_message(tmp_path, capsys, argv, message):
    argv = TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path / "run")] + argv
    with pytest.raises(SystemExit) as e:
        selfharmony.main(argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert (message or "invalid choice") in text
    assert not (tmp_path / "run").exists()  # a start that fails leaves no folder behind


def test_each_epoch_draws_a_fresh_shuffle_from_the_seed_and_the_step_alone():
    # 10 questions in batches of 4: two batches an epoch, each epoch 8 different questions of a new order
    draws = [selfharmony.batch_indices(step, 10, 4, seed=0) for step in range(6)]
    assert [epoch for _, epoch in draws] == [0, 0, 1, 1, 2, 2]
    epochs = [draws[i][0] + draws[i + 1][0] for i in (0, 2, 4)]
    assert all(len(set(e)) == 8 and set(e) <= set(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # each epoch its own order
    assert draws == [selfharmony.batch_indices(step, 10, 4, seed=0) for step in range(6)]  # no state kept
    assert [selfharmony.batch_indices(step, 10, 4, seed=1) for step in range(6)] != draws


def test_a_prompt_over_the_limit_stops_the_start_up_before_the_first_evaluation(tmp_path, monkeypatch):
    drawn = selfharmony.batch_indices(0, 4, 2, seed=0)[0]
    questions = load_benchmark("arith", n=4)
    for reframe in ("fused", "given", "separate"):  # view 1's prompt is the longer one (fused, given)
        flags = prompt_flags(reframe)
        longest = [max(map(len, pair)) for pair in zip(*selfharmony.first_prompts(byte_tokenizer(), questions, flags))]
        limit = max(longest[i] for i in drawn) - 1
        run = TINY + ["--reframe", reframe, "--max-prompt-tokens", str(limit), "--out-dir", str(tmp_path / reframe)]
        with monkeypatch.context() as m:
            m.setattr(selfharmony, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
            with pytest.raises(SystemExit, match=f"prompt of {limit + 1} tokens is over --max-prompt-tokens {limit}"):
                selfharmony.main(run + ["--steps", "1"])
        assert not (tmp_path / reframe).exists()
    # a question that no step of the run draws is not checked: step 1 draws q2 and q0, step 2 q1 and q3
    rows = [{"id": f"q{i}", "problem": "What is 2 + 2?" + " Think." * 200 * (i == 1), "answer": "4"} for i in range(4)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = TINY + ["--data", str(tmp_path / "long.jsonl"), "--no-eval", "--max-prompt-tokens", "1024"]
    selfharmony.main(run + ["--steps", "1", "--out-dir", str(tmp_path / "one")])
    with pytest.raises(SystemExit, match="question q1: prompt of 1[0-9]{3} tokens is over --max-prompt-tokens 1024"):
        selfharmony.main(run + ["--steps", "2", "--out-dir", str(tmp_path / "two")])
    assert not (tmp_path / "two").exists()  # at start-up, not when step 2 draws it


def test_each_reframing_asks_its_own_view_1_prompt():
    from eval import prompt_ids, solver_messages
    tokenizer, row = byte_tokenizer(), load_benchmark("arith", n=1)[0]
    solver = prompt_ids(tokenizer, *solver_messages(row))
    view1 = {"given": prompt_ids(tokenizer, *solver_messages({**row, "problem": row["reframed"]})),  # solve the story
             "fused": prompt_ids(tokenizer, selfharmony.FUSED_SYSTEM, row["problem"]),  # rewrite, then solve
             "separate": prompt_ids(tokenizer, selfharmony.REWRITE_SYSTEM, row["problem"])}  # rewrite only
    for reframe, prompt in view1.items():
        flags = prompt_flags(reframe)
        assert selfharmony.first_prompts(tokenizer, [row], flags) == ([solver], [prompt])


def test_a_device_torch_cannot_use_is_one_line():
    assert selfharmony.check_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        selfharmony.check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            selfharmony.check_device("cuda:0")


@pytest.mark.parametrize("damaged", ["trainer.pt", "model.safetensors", "flags.json"])
def test_a_damaged_run_file_is_one_line_and_deletes_nothing(tmp_path, damaged):
    run = ["--no-eval", "--out-dir", str(tmp_path)]
    selfharmony.main(TINY + ["--steps", "2", "--stop-after", "1"] + run)
    if damaged == "flags.json":  # read when the run has no checkpoint yet
        shutil.rmtree(tmp_path / "ckpt")
    path = tmp_path / damaged if damaged == "flags.json" else tmp_path / "ckpt" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a damaged disk would leave it
    with pytest.raises(SystemExit, match=r"--resume: cannot read .*\(\w+: .*\); the run cannot continue"):
        selfharmony.main(["--resume"] + run)
    assert [r["step"] for r in read_log(tmp_path)] == [1]


@pytest.mark.parametrize("content, says", [("", "no questions in the file"),
                                           ('{"id": 1, "problem": 7, "answer": "7"}\n', "'problem' must be")])
def test_bad_data_files_are_one_line_in_both_tools(tmp_path, content, says):
    import eval as ev
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    for main, argv in ((selfharmony.main, TINY + ["--out-dir", str(tmp_path / "run")]),
                       (ev.main, ["--model", "tiny", "--out-dir", str(tmp_path / "eval")])):
        with pytest.raises(SystemExit, match=f"data: .*bad.jsonl.*{says}"):
            main(argv + ["--data", str(data)])


@pytest.mark.parametrize("model, says", [("/no/such/folder", "no such model folder"), ("empty", "holds no model")])
def test_a_bad_model_is_one_line_in_both_tools(tmp_path, model, says):
    import eval as ev
    if model == "empty":  # a folder without a model in it
        (tmp_path / model).mkdir()
        model = str(tmp_path / model)
    for main, argv in ((selfharmony.main, TINY + ["--out-dir", str(tmp_path / "run")]),
                       (ev.main, ["--data", "arith", "--out-dir", str(tmp_path / "eval")])):
        with pytest.raises(SystemExit, match=says):
            main(argv + ["--model", model])


def test_the_update_gets_each_rollouts_view_and_the_sampling_copy_follows_the_policy(tmp_path, monkeypatch):
    # the update's rows carry their views (each view's token-mean in the loss needs them: all 0 would be one
    # token-mean over both); each step samples with a generator of its own; a sampling copy apart from the
    # policy (as on a GPU, here float32 too) holds the policy's weights after every update
    views, copies, started, seeds = [], [], {}, []
    real_step, real_copy, real_load = grpo.step, selfharmony.sampling_copy, selfharmony.load_model
    real_generate = selfharmony.generate

    def generate(*args, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return real_generate(*args, generator=generator, **kwargs)
    monkeypatch.setattr(selfharmony, "generate", generate)

    def step(policy, optimizer, batch, *args, **kwargs):
        views.append(batch.views.tolist())
        return real_step(policy, optimizer, batch, *args, **kwargs)
    monkeypatch.setattr(grpo, "step", step)

    def sampling_copy(model, dtype, separate=False):
        copies.append(real_copy(model, dtype, separate=True))
        return copies[-1]
    monkeypatch.setattr(selfharmony, "sampling_copy", sampling_copy)

    def load_model(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        started.update({k: p.clone() for k, p in model.state_dict().items()})
        return model, tokenizer
    monkeypatch.setattr(selfharmony, "load_model", load_model)
    selfharmony.main(TINY + ["--steps", "2", "--no-eval", "--out-dir", str(tmp_path / "run")])
    Q, G = 2, 4  # TINY's --batch-size and --n-rollouts
    assert views == [[0] * Q * G + [1] * Q * G] * 2
    assert len(seeds) == 2 and seeds[0] != seeds[1]  # each step its own generator (both views in one call)
    (sampler,) = copies
    now, trained = sampler.state_dict(), final_weights(tmp_path / "run")
    assert now.keys() >= trained.keys() and all(torch.equal(now[k], trained[k]) for k in trained)
    assert any(not torch.equal(now[k], started[k]) for k in trained)  # the updates moved the weights


def test_a_cut_off_rollout_names_no_bare_number():
    # arith reads the last number of a finished completion; a cut-off one ("To add 4 and 1, we")
    # would otherwise vote for the question's own operand in both views
    row = {"id": "a", "problem": "What is 4 + 1?", "answer": "5", "answer_format": "number"}
    args = selfharmony.parse_args(["--reframe", "given"])
    args.n_rollouts = 4
    texts = ["5", "It is 5.", "To add 4 and 1, we", "To add 4 and 1, we"]
    done = [True, True, False, False]
    episodes = episodes_of([row], texts, texts, done, done)
    records = selfharmony.label_and_reward([row], episodes, args)
    assert [e.answer for e in episodes[:4]] == ["5", "5", None, None] and records[0]["labels"]["mv"] == ("5", "5")
    assert [e.reward for e in episodes] == [1, 1, 0, 0] * 2
    # the same texts read as finished: the operand 1 ties 5 and wins the tie on the smaller string
    records = selfharmony.label_and_reward([row], episodes_of([row], texts, texts, [True] * 4, [True] * 4), args)
    assert records[0]["labels"]["mv"] == ("1", "1")


def test_each_view_is_rewarded_against_its_own_label():
    # cross (Co-Reward) labels each view with the other's vote, mv each with its own: with view 1 solving a
    # given paraphrase (not fused), its rollouts meet view 1's label, view 0's meet view 0's
    row = {"id": "a", "problem": "What is 4 + 1?", "answer": "5"}
    texts0, texts1 = [f"\\boxed{{{x}}}" for x in (5, 5, 5, 6)], [f"\\boxed{{{x}}}" for x in (6, 6, 6, 5)]
    for selector, want in (("cross", [0, 0, 0, 1, 0, 0, 0, 1]), ("mv", [1, 1, 1, 0, 1, 1, 1, 0])):
        args = selfharmony.parse_args(["--reframe", "given", "--selector", selector])
        args.n_rollouts = 4
        episodes = episodes_of([row], texts0, texts1, [True] * 4, [True] * 4)
        records = selfharmony.label_and_reward([row], episodes, args)
        assert records[0]["labels"][selector] == {"cross": ("6", "5"), "mv": ("5", "6")}[selector]
        assert [e.reward for e in episodes] == want


def test_samples_jsonl_holds_the_first_rollouts_of_each_view_of_one_question_with_the_label_that_trained():
    rows = [{"id": "a", "problem": "1 + 2?", "answer": "3"}, {"id": "b", "problem": "3 + 4?", "answer": "7"}]
    texts0 = [f"\\boxed{{{x}}}" for x in (3, 3, 5, 3, 7, 7, 7, 8)]
    texts1 = [f"\\boxed{{{x}}}" for x in (4, 4, 4, 3, 7, 8, 8, 8)]
    args = selfharmony.parse_args(["--reframe", "given", "--selector", "mv", "--log-texts", "3"])
    args.n_rollouts = 4
    episodes = episodes_of(rows, texts0, texts1, [True] * 8, [True] * 8)
    out = {"records": selfharmony.label_and_reward(rows, episodes, args), "episodes": episodes}
    lines = [json.loads(line) for line in selfharmony.sample_lines(out, rows[0], 5, args)]
    # question a's first 3 of each view, each with its reward and mv's labels (view 0's vote 3, view 1's 4)
    assert [(x["view"], x["text"], x["reward"]) for x in lines] == [
        ("solve", t, r) for t, r in zip(texts0[:3], (1, 1, 0))] + [("given", t, 1) for t in texts1[:3]]
    assert all(x["step"] == 5 and x["id"] == "a" and x["label"] == ["3", "4"] for x in lines)


@pytest.mark.parametrize("flag, value, says", [
    ("--n-rollouts", "1", "integer >= 2"), ("--batch-size", "0", "integer >= 1"), ("--max-new-tokens", "0", ">= 1"),
    ("--micro-batch", "0", ">= 1"), ("--eval-n", "0", ">= 1"), ("--steps", "0", ">= 1"), ("--steps", "-3", ">= 1"),
    ("--limit", "0", ">= 1"), ("--temperature", "0", "number > 0"), ("--temperature", "-1", "number > 0"),
    ("--lr", "-1e-6", "number > 0"), ("--lr", "nan", "number > 0"), ("--lr", "inf", "number > 0"),
    ("--warmup", "1.5", "<= 1"), ("--kv-cache-gb", "0", "> 0"), ("--n-rollouts", "x", "must be an integer"),
    ("--dtype", "float64", "invalid choice"),
])
def test_bad_numbers_are_one_line_from_the_parser(capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:
        selfharmony.parse_args([f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"selfharmony.py: error: argument {flag}:") or f"argument {flag}:" in err[-1]
    assert says in err[-1]


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "--n: must be an integer >= 1"), (["--top-p", "0"], "--top-p: must be a number > 0 and <= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"), (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"), (["--temperature", "-1"], "--temperature"),
    (["--max-rows", "0"], "--max-rows"), (["--dtype", "float64"], "invalid choice"),
])
def test_eval_bad_numbers_are_one_line_from_the_parser(capsys, argv, says):
    import eval as ev
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]




def test_help_states_each_default_once(capsys):
    # argparse adds "(default: X)" to every flag; where the help says the default in words it would say it twice
    import eval as ev
    for main in (selfharmony.main, ev.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0 and "(default: 16)" in text  # the defaults are there
        assert "(default: None)" not in text and not re.search(r"default[^()]*\)\s*\(default", text)
def test_nan_updates_are_skipped_then_the_run_stops_without_saving(tmp_path):
    # lr 1e20: the first update (weight decay alone) blows the weights up, every later gradient is NaN
    with pytest.raises(SystemExit) as e:
        selfharmony.main(TINY + ["--steps", "8", "--no-eval", "--lr", "1e20", "--save-every", "1",
                                 "--out-dir", str(tmp_path)])
    assert "NaN or inf in 3 steps in a row" in str(e.value.code)  # a message: exit status 1
    strict = lambda line: json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the log"))
    rows = [strict(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["skipped"] for r in rows] == [False, True, True, True] and rows[-1]["loss"] is None
    # the log writes NaN and inf alike as null, at any depth (json.dumps with allow_nan=False would raise)
    assert selfharmony.strict_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}}) == \
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    # the checkpoints of the skipped steps hold the weights of step 1, all finite
    state = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)
    model = type(tiny_model()).from_pretrained(tmp_path / "ckpt")
    assert state["step"] == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_only_skipped_updates_in_a_row_stop_the_run(tmp_path, monkeypatch):
    # skipped, done, skipped, skipped, done: never 3 in a row, so the run goes on to its end
    pattern, real_step = iter([True, False, True, True, False]), grpo.step

    def step(*args, **kwargs):
        return {**real_step(*args, **kwargs), "skipped": next(pattern)}
    monkeypatch.setattr(grpo, "step", step)
    selfharmony.main(TINY + ["--steps", "5", "--no-eval", "--out-dir", str(tmp_path)])
    assert [r["skipped"] for r in read_log(tmp_path)] == [True, False, True, True, False]


def test_eval_every_evaluates_after_each_multiple_of_it_and_at_the_start_and_end(tmp_path):
    selfharmony.main(TINY + ["--steps", "5", "--eval-every", "2", "--out-dir", str(tmp_path)])
    assert [r["step"] for r in read_log(tmp_path) if "eval" in r] == [0, 2, 4, 5]


def test_adamws_moments_are_in_memory_before_the_first_rollouts(tmp_path, monkeypatch):
    real, held = selfharmony.train_step, []

    def spy(model, policy, sampler, tokenizer, optimizer, *args, **kwargs):
        held.append(sorted(map(id, optimizer.state)) == sorted(map(id, model.parameters())))
        return real(model, policy, sampler, tokenizer, optimizer, *args, **kwargs)

    monkeypatch.setattr(selfharmony, "train_step", spy)
    selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    assert held == [True]


def test_save_minutes_saves_once_that_long_has_passed_since_the_last_save(tmp_path, monkeypatch):
    # a step takes 40 s on this clock: with --save-minutes 1, saves after steps 2, 4 and 5 (the end)
    clock, saves = [0.0], []
    real_step, real_save = selfharmony.train_step, selfharmony.save_checkpoint

    def step_of_40_seconds(*args, **kwargs):
        clock[0] += 40
        return real_step(*args, **kwargs)

    monkeypatch.setattr(selfharmony, "time", types.SimpleNamespace(**{**vars(time), "monotonic": lambda: clock[0]}))
    monkeypatch.setattr(selfharmony, "train_step", step_of_40_seconds)
    monkeypatch.setattr(selfharmony, "save_checkpoint", lambda *a: saves.append(a[5]) or real_save(*a))
    selfharmony.main(TINY + ["--steps", "5", "--no-eval", "--save-minutes", "1", "--out-dir", str(tmp_path)])
    assert saves == [2, 4, 5]


def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_run(tmp_path):
    argv = TINY + ["--steps", "6", "--no-eval", "--save-every", "2"]
    selfharmony.main(argv + ["--out-dir", str(tmp_path / "straight")])
    out, env = tmp_path / "killed", {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "selfharmony.py")] + argv + ["--out-dir", str(out)]

    def steps_logged():
        try:
            return sum('"reward0"' in line for line in open(out / "log.jsonl"))
        except OSError:
            return 0

    # kill -9 once a given number of steps is logged (+ a pause: inside a step, a checkpoint write,
    # or before the first checkpoint exists), then resume; each resume must continue the same run
    for i, (after, pause) in enumerate([(1, 0.0), (3, 0.05), (4, 0.3)]):
        proc = subprocess.Popen(cmd + (["--resume"] if i else []), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and steps_logged() < after:
            time.sleep(0.01)
        time.sleep(pause)
        proc.kill()
        proc.wait()
    subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one whole line a step, no repeats
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_out_dir_gets_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--batch-size 5"):
        selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--batch-size", "5"])
    assert not (tmp_path / "runs").exists()  # a start that fails names no folder
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261128-120000")  # runs started in the same second
    selfharmony.main(TINY + ["--steps", "1", "--no-eval"])
    run, = (tmp_path / "runs").iterdir()
    assert run.name == "tiny-arith-hms-20261128-120000" and (run / "ckpt").exists()
    args = selfharmony.parse_args(TINY)
    for k in (2, 3):
        assert selfharmony.make_run_dir(args, None, False, True).resolve() == run.with_name(f"{run.name}-{k}")
        args.out_dir = None
    for flag in ("--resume", "--plot"):
        with pytest.raises(SystemExit, match="need the run's --out-dir"):
            selfharmony.main(TINY + [flag])


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stands(tmp_path, monkeypatch):
    argv = TINY + ["--steps", "3", "--no-eval", "--save-every", "1", "--out-dir", str(tmp_path)]
    real_save, saves = torch.save, []

    def full_on_the_second_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # what torch raises when the disk fills mid-write
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second_save)
    with pytest.raises(SystemExit, match=r"could not write the checkpoint of step 2 .* GiB free there\. The last "
                                         r"checkpoint stands"):
        selfharmony.main(argv)
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["step"] == 1
    assert not (tmp_path / "ckpt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    real_json, rows = selfharmony.strict_json, []

    def full_on_the_next_log_line(row):
        rows.append(row)
        if len(rows) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_json(row)

    monkeypatch.setattr(selfharmony, "strict_json", full_on_the_next_log_line)
    with pytest.raises(SystemExit, match="disk full in step 2 .*then --resume"):
        selfharmony.main(argv + ["--resume"])
    monkeypatch.setattr(selfharmony, "strict_json", real_json)
    selfharmony.main(argv + ["--resume"])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def test_memory_plan_adds_what_stays_and_names_the_switches_when_it_will_not_fit():
    model = tiny_model()
    P = sum(p.nbytes for p in model.parameters())  # float32
    args = selfharmony.parse_args(TINY + ["--kv-cache-gb", "0.5"])
    args.micro_batch_tokens = 0
    parts = selfharmony.resident_bytes(model, model, grpo.make_reference(model, 0.1), args, 1)
    line, fits = selfharmony.memory_plan(parts, grpo.activation_estimate(model), model, args, 1, "cpu")
    gib = lambda x: f"{x / 2**30:.1f}"
    assert fits and f"weights {gib(P)} + gradients {gib(P)} + AdamW {gib(2 * P)}" in line
    assert "the KV cache 0.5" in line and "sampling copy" not in line  # the CPU samples with the policy
    args.kv_cache_gb, args.fsdp = 1e6, True
    parts = selfharmony.resident_bytes(model, model, None, args, 2)
    line, fits = selfharmony.memory_plan(parts, grpo.activation_estimate(model), model, args, 2, "cpu", 2**40)
    assert not fits and f"weights {gib(P / 2)}" in line  # under --fsdp, this rank's half
    assert "plus FSDP's gathered units 1024.0" in line
    # tiny: the root holds the (tied) embeddings 259 x 64 and the final norm 64; a layer 4 x 64 x 64 (q k v o: 4 heads,
    # 2 key/value heads of 16, so k and v are 64 x 32), 3 x 64 x 128 (MLP), 2 norms of 64 and q / k norms of 16;
    # float32. Root and its gradients, two layers and theirs
    root, layer = 259 * 64 + 64, 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64 + 2 * 16
    assert grpo.gathered_bytes(model) == 4 * (2 * root + 4 * layer)
    assert line.endswith("It will not fit: try --grad-checkpointing (or 2, every other layer), a lower --micro-batch, "
                         "a lower --kv-cache-gb")
    for every, switch in ((2, "try --grad-checkpointing, "), (6, "try --grad-checkpointing 3, "), (1, "try a lower")):
        args.grad_checkpointing = every  # checkpointing every N-th layer: checkpoint more of them
        line, _ = selfharmony.memory_plan(parts, grpo.activation_estimate(model), model, args, 2, "cpu", 2**40)
        assert switch in line
    # the units FSDP gathers come on top of the update's activations, so they alone can make it not fit
    args.kv_cache_gb = 0.5
    assert selfharmony.memory_plan(parts, grpo.activation_estimate(model), model, args, 2, "cpu", 2**20)[1]
    assert not selfharmony.memory_plan(parts, grpo.activation_estimate(model), model, args, 2, "cpu", 2**50)[1]


def test_the_default_micro_batch_halves_until_the_estimate_fits(monkeypatch):
    # CUDA's defaults on a card (faked) that holds what stays and the activations of 4,096 tokens, not 8,192
    model, args = tiny_model(), selfharmony.parse_args(TINY)
    monkeypatch.setattr(selfharmony, "default_kv_budget_gb", lambda device, reserve_gb: 1e-4)
    stays = sum(selfharmony.resident_bytes(model, model, None, args, 1).values())
    activations = grpo.activation_estimate(model)
    assert activations(4096) < activations(8192) and 1e-4 * 2**30 < activations(4096)
    card = types.SimpleNamespace(total_memory=stays + activations(4096))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    plan = selfharmony.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 4096 and args.kv_cache_gb == 1e-4
    assert "at 4096 tokens a micro-batch" in plan and "will not fit" not in plan
    # given, it is kept even where it will not fit, and the line says which switches to turn
    args = selfharmony.parse_args(TINY + ["--micro-batch-tokens", "8192"])
    plan = selfharmony.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 8192 and "It will not fit: try" in plan
    # a row longer than the budget is a micro-batch of its own: with rows of up to 1,024 + 3,072 tokens the
    # widest holds 4,096 whatever the budget, so halving stops there, and the plan says it will not fit
    card.total_memory = stays + activations(2048)
    args = selfharmony.parse_args(TINY + ["--max-new-tokens", "3072"])
    plan = selfharmony.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 4096 and "at 4096 tokens a micro-batch" in plan
    assert "It will not fit: try --grad-checkpointing (or 2, every other layer), a lower --kv-cache-gb" in plan
    args = selfharmony.parse_args(TINY + ["--max-new-tokens", "3072", "--micro-batch-tokens", "1024"])
    assert "at 4096 tokens a micro-batch" in selfharmony.set_budgets(args, model, model, None, 1, "cuda", torch.float32)


def test_the_default_kv_budget_sets_aside_what_the_first_update_will_allocate(monkeypatch):
    # the gradients (P) and AdamW's moments (2P) come in the first update, after the first KV cache; under
    # --fsdp (2 ranks) this rank's shards of those, and of the weights and the reference, which are sharded
    # after the budget is set
    model, reserved = tiny_model(), []
    P = sum(p.nbytes for p in model.parameters())
    monkeypatch.setattr(selfharmony, "default_kv_budget_gb", lambda device, reserve_gb: reserved.append(reserve_gb) or 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**40))
    selfharmony.set_budgets(selfharmony.parse_args(TINY), model, model, None, 1, "cuda", torch.float32)
    args = selfharmony.parse_args(TINY + ["--fsdp"])
    selfharmony.set_budgets(args, model, model, grpo.make_reference(model, 0.1), 2, "cuda", torch.float32)
    assert reserved == [pytest.approx(3 * P / 2**30), pytest.approx((P + 2 * P + P + P) / 2 / 2**30)]


def test_a_flag_that_a_runs_checkpoint_predates_keeps_its_default():
    args = selfharmony.parse_args(TINY)
    flags = selfharmony.RUN_FLAGS + selfharmony.KEPT_FLAGS
    saved = {k: getattr(args, k) for k in flags if k not in ("w_div", "eval_n")}  # a run from before these two
    saved["lr"] = 0.5
    args = selfharmony.resume_args(selfharmony.parse_args(["--resume"]), ["--resume"], saved)
    default = selfharmony.parse_args([])
    assert args.lr == 0.5 and args.model == "tiny" and (args.w_div, args.eval_n) == (default.w_div, default.eval_n)


def test_resume_keeps_the_runs_evaluation_and_saving_settings(tmp_path):
    run = ["--out-dir", str(tmp_path)]
    selfharmony.main(TINY + ["--steps", "2", "--stop-after", "1", "--eval-every", "1", "--eval-n", "3"] + run)
    selfharmony.main(["--resume"] + run)  # no flag but the folder: the run's own settings, not the defaults
    evals = [r for r in read_log(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and all("mean@3" in r["eval"] for r in evals)


def test_the_start_up_says_how_many_questions_wait_each_epoch(tmp_path, capsys):
    selfharmony.main(TINY + ["--arith-n", "5", "--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    assert "5 questions, 2 a step" in (out := capsys.readouterr().out)
    assert "each epoch's last 1 questions in its shuffled order wait for the next epoch" in out


def test_a_resume_before_the_first_checkpoint_starts_over_with_the_runs_flags(tmp_path):
    run = ["--out-dir", str(tmp_path)]
    selfharmony.main(TINY + ["--selector", "mv", "--steps", "2", "--stop-after", "1", "--no-eval"] + run)
    shutil.rmtree(tmp_path / "ckpt")  # as if killed before its first checkpoint: a log, no checkpoint
    selfharmony.main(["--resume"] + run)  # the default model would be Qwen3-1.7B: the run's is tiny
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    texts = [json.loads(line)["step"] for line in open(tmp_path / "samples.jsonl")]  # step 1's once: started over
    assert texts == sorted(texts) and texts.count(1) == texts.count(2) > 0
    saved = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["args"]
    assert saved["model"] == "tiny" and saved["selector"] == "mv" and saved["no_eval"]
    with pytest.raises(SystemExit, match=r"--selector hms \(the run's: mv\)"):
        shutil.rmtree(tmp_path / "ckpt")
        selfharmony.main(["--resume", "--selector", "hms"] + run)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]  # a refused --resume deletes nothing


def test_a_second_ctrl_c_in_the_first_evaluation_is_one_line_then_resume_starts_over(tmp_path, monkeypatch,
                                                                                      capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfharmony, "evaluate", interrupted)
    run = ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        selfharmony.main(TINY + ["--selector", "mv", "--steps", "1"] + run)
    assert stopped.value.code == 128 + signal.SIGINT  # the shell's status for Ctrl-C
    assert "interrupted in step 0; --resume" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} == {"flags.json"}  # killed before any log line
    monkeypatch.undo()
    selfharmony.main(["--resume", "--no-eval"] + run)  # starts over with the run's flags (tiny, mv), not the defaults
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["args"]["selector"] == "mv"


def test_cuda_peaks_of_sampling_and_update_are_logged(tmp_path, monkeypatch):
    # peak_gib reads the allocator's peak, then starts a new count
    held = {"peak": 3 * 2**30}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=0))
    assert selfharmony.peak_gib(torch.device("cuda")) == 3.0 and held["peak"] == 0
    assert selfharmony.peak_gib(torch.device("cpu")) is None
    # the loop: a count started before sampling, read after it (sampling) and after the update
    calls = iter(range(100))
    monkeypatch.setattr(selfharmony, "peak_gib", lambda device: float(next(calls)))
    selfharmony.main(TINY + ["--steps", "2", "--no-eval", "--out-dir", str(tmp_path)])
    assert [(r["mem_sample"], r["mem_update"]) for r in read_log(tmp_path)] == [(1.0, 2.0), (4.0, 5.0)]
