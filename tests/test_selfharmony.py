"""selfharmony.py, the loop: every logged field, each rollout rewarded against its own question and view, the
update's rows, the data order, the start-up's checks, and the loop under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import grpo
import hms
import prompts
import run
import sample
import scale
import selfharmony
from eval import load_benchmark
from models import byte_tokenizer, tiny_model


ROOT = Path(__file__).resolve().parents[1]


TINY = ["--model", "tiny", "--data", "arith", "--arith-n", "4", "--batch-size", "2", "--n-rollouts", "4",
        "--max-new-tokens", "12", "--eval-n", "2", "--lr", "1e-3", "--micro-batch", "4"]


STEP_FIELDS = ["step", "epoch", "reward0", "reward1", "acc0", "acc1", "hms_mv_agree", "flat_groups", "format",
               "p_div", "len0", "len1", "truncated0", "truncated1", "loss", "kl", "clip_frac", "ratio", "grad_norm",
               "lr", "pad_share", "t_sample", "t_reward", "t_update", "sample_tok_s"] + [
    f"{k}/{s}" for k in ("label_acc", "no_label") for s in ("hms", "mv", "mv0", "mv2", "cross", "gt")]


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def untimed(out):
    """The run's log without its timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if not k.startswith("t_") and k != "sample_tok_s"} for r in read_log(out)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(out):
    return load_file(out / "ckpt" / "model.safetensors")


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
    log = run.step_summary(records, episodes, None)
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
    row = run.step_row([dict(records=r, episodes=e, rewrites=None, stats=stats(kl)) for r, e, kl in parts])
    assert row["kl"] == row["clip_frac"] == row["ratio"] == pytest.approx((0.1 * 20 + 0.8 * 8) / 28)
    assert row["loss"] == pytest.approx(0.9) and row["sample_tok_s"] == pytest.approx(20 / 2 + 8 / 2)


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


def test_a_rewrite_that_misses_the_layout_or_runs_on_falls_back_to_the_question(monkeypatch):
    # separate reframing: question a's rewrite is fine, b's misses REWRITTEN PROBLEM, c's runs on so long that
    # its solver prompt would be over --max-prompt-tokens (an error for a question, not for a model's rewrite)
    tokenizer = byte_tokenizer()
    rows = [{"id": q, "problem": f"{q}: 1 + 2?", "answer": "3"} for q in "abc"]
    rewrites = ["Ann has 1 apple and gets 2.", None, "Ann has " + "many " * 200 + "apples."]
    texts = [f"STRATEGY: story\nREWRITTEN PROBLEM: {x}\nSOLUTION: 3" if x else "SOLUTION: 3" for x in rewrites]

    def fake_generate(model, prompts, max_new_tokens, n=1, **kw):  # the rewrites when asked for one a question
        return [tokenizer.encode(t) for t in texts] if n == 1 else [[1]] * (len(prompts) * n)

    monkeypatch.setattr(sample, "generate", fake_generate)
    args = selfharmony.parse_args(["--reframe", "separate", "--max-prompt-tokens", "800", "--n-rollouts", "2"])
    episodes, got = selfharmony.rollout(None, tokenizer, rows, args, None, [])
    assert got == [rewrites[0], None, None] and [(e.question, e.view) for e in episodes] == [
        (q, v) for v in (0, 1) for q in "abc" for _ in range(2)]
    prompts0, prompts1 = ([e.prompt for e in episodes if e.view == v][::2] for v in (0, 1))
    assert prompts1[1:] == prompts0[1:] and prompts1[0] != prompts0[0]
    assert rewrites[0] in tokenizer.decode(prompts1[0]) and len(prompts1[0]) <= 800
    assert len(prompts.prompt_ids(tokenizer, *prompts.solver_messages(rows[2]))) < 800  # c's own question fits


def test_the_update_gets_each_rollouts_view_and_the_sampling_copy_follows_the_policy(tmp_path, monkeypatch):
    # the update's rows carry their views (each view's token-mean in the loss needs them: all 0 would be one
    # token-mean over both); each step samples with a generator of its own; a sampling copy apart from the
    # policy (as on a GPU, here float32 too) holds the policy's weights after every update
    views, copies, started, seeds = [], [], {}, []
    real_step, real_copy, real_load = grpo.step, scale.sampling_copy, run.load_model
    real_generate = sample.generate

    def generate(*args, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return real_generate(*args, generator=generator, **kwargs)
    monkeypatch.setattr(sample, "generate", generate)

    def step(policy, optimizer, batch, *args, **kwargs):
        views.append(batch.views.tolist())
        return real_step(policy, optimizer, batch, *args, **kwargs)
    monkeypatch.setattr(grpo, "step", step)

    def sampling_copy(model, dtype, separate=False):
        copies.append(real_copy(model, dtype, separate=True))
        return copies[-1]
    monkeypatch.setattr(scale, "sampling_copy", sampling_copy)

    def load_model(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        started.update({k: p.clone() for k, p in model.state_dict().items()})
        return model, tokenizer
    monkeypatch.setattr(run, "load_model", load_model)
    selfharmony.main(TINY + ["--steps", "2", "--no-eval", "--out-dir", str(tmp_path / "run")])
    Q, G = 2, 4  # TINY's --batch-size and --n-rollouts
    assert views == [[0] * Q * G + [1] * Q * G] * 2
    assert len(seeds) == 2 and seeds[0] != seeds[1]  # each step its own generator (both views in one call)
    (sampler,) = copies
    now, trained = sampler.state_dict(), final_weights(tmp_path / "run")
    assert now.keys() >= trained.keys() and all(torch.equal(now[k], trained[k]) for k in trained)
    assert any(not torch.equal(now[k], started[k]) for k in trained)  # the updates moved the weights


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
        longest = [max(map(len, pair)) for pair in zip(*prompts.first_prompts(byte_tokenizer(), questions, reframe))]
        limit = max(longest[i] for i in drawn) - 1
        run = TINY + ["--reframe", reframe, "--max-prompt-tokens", str(limit), "--out-dir", str(tmp_path / reframe)]
        with monkeypatch.context() as m:
            m.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
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


def test_reframe_none_is_ttrl_view_0_alone_trains_on_its_own_vote(tmp_path):
    # TTRL's row of the paper: no view 1 is sampled, view 0's majority vote is its label
    selfharmony.main(TINY + ["--steps", "2", "--no-eval", "--reframe", "none", "--selector", "mv0", "--explain",
                             "--out-dir", str(tmp_path)])
    for r in read_log(tmp_path):
        assert [r[k] for k in ("reward1", "acc1", "len1", "truncated1", "format", "p_div")] == [None] * 6
        assert r["reward0"] is not None and r["len0"] > 0
        assert r["sample_tok_s"] == pytest.approx(8 * r["len0"] / r["t_sample"])  # 2 questions x 4, one view
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {s["view"] for s in samples} == {"solve"}
    for line in open(tmp_path / "explain.jsonl"):
        e = json.loads(line)
        assert e["rewards"][1] == [] and all(r["n1"] == 0 for r in e["candidates"])
        assert e["label"][0] == hms.majority_vote([c["answer"] for c in e["candidates"] for _ in range(c["n0"])])


@pytest.mark.parametrize("argv, message", [
    (["--selector", "vote"], None),  # argparse: invalid choice
    (["--seed", "-1"], "--seed: must be an integer >= 0"),  # numpy's generator takes no negative seed
    (["--data", "nope"], "unknown benchmark"),
    (["--data", "/no/such/file.jsonl"], "no such data file"),
    (["--max-prompt-tokens", "8"], "over --max-prompt-tokens 8"),
    (["--batch-size", "5"], "--batch-size 5"),
    (["--data", "math500", "--data-dir", str(ROOT.parent / "shared" / "data"), "--reframe", "given"], "reframed"),
    (["--resume"], "no checkpoint"),
    (["--reframe", "none"], "--reframe none has view 0 alone, which --selector hms cannot label"),
    (["--device", "gpu"], "unknown device 'gpu'"),
])
def test_bad_input_is_a_clear_message(tmp_path, capsys, argv, message):
    argv = TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path / "run")] + argv
    with pytest.raises(SystemExit) as e:
        selfharmony.main(argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert (message or "invalid choice") in text
    assert not (tmp_path / "run").exists()  # a start that fails leaves no folder behind


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


def test_the_start_up_says_how_many_questions_wait_each_epoch(tmp_path, capsys):
    selfharmony.main(TINY + ["--arith-n", "5", "--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    assert "5 questions, 2 a step" in (out := capsys.readouterr().out)
    assert "each epoch's last 1 questions in its shuffled order wait for the next epoch" in out


def test_eval_every_evaluates_after_each_multiple_of_it_and_at_the_start_and_end(tmp_path):
    selfharmony.main(TINY + ["--steps", "5", "--eval-every", "2", "--out-dir", str(tmp_path)])
    assert [r["step"] for r in read_log(tmp_path) if "eval" in r] == [0, 2, 4, 5]


@pytest.mark.slow
def test_the_loop_runs_under_torchrun_with_two_gloo_ranks(tmp_path):
    # each rank notes the questions it evaluates, then runs the loop
    script = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}]
import torch.distributed as dist, eval, selfharmony
real = eval.evaluate
def evaluate(model, tokenizer, rows, **kw):
    with open(f"evaluated{{dist.get_rank()}}.txt", "a") as f:
        f.write(" ".join(r["id"] for r in rows) + "\\n")
    return real(model, tokenizer, rows, **kw)
eval.evaluate = evaluate
selfharmony.main(sys.argv[1:])
"""
    (tmp_path / "loop.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(tmp_path / "loop.py")] + TINY
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


def test_the_files_import_one_way_down():
    # no import circle: a file that imports another never gets imported back by it, or by what it imports (the
    # fast engine is picked where it is called, and reads no flag helper of the tools above it)
    import ast
    files = {p.stem: p for p in ROOT.glob("*.py")}
    imports = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        imports[name] = found & set(files) - {name}

    def below(name):  # every file `name` imports, directly or through others
        found, todo = set(), [name]
        while todo:
            for m in imports[todo.pop()] - found:
                found.add(m)
                todo.append(m)
        return found
    assert [name for name in files if name in below(name)] == []
    # the method files below the loop read nothing of the machinery above them
    assert not (below("answers") | below("prompts") | below("hms")) & {"run", "scale", "engine", "eval"}
    assert "selfharmony" not in set().union(*(below(name) for name in files if name != "selfharmony"))


@pytest.mark.parametrize("argv, says", [
    (["--seed", str(10**30)], "--seed: must be an integer >= 0 and <= 4294967295"),  # torch's generators: < 2^64
    (["--lr", "1e38"], "--lr: must be a number > 0 and <= 1e+37"),  # AdamW's first step size: lr / 0.1 < 3.4e38
    (["--n-rollouts", str(10**9)], "It will not fit: try"),  # the KV cache of one view's rollouts
    (["--max-new-tokens", str(10**9)], "It will not fit: try"),
    (["--eval-n", str(10**9)], "(or --eval-n, --eval-max-new-tokens)"),  # the evaluation's rows
    (["--arith-n", "10000", "--arith-level", "2"], "arith level 2 has only 8190 distinct questions"),
    (["--device", "mps"], "device 'mps': this torch cannot use it"),
])
def test_absurd_numbers_are_one_line_before_anything_is_written(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        selfharmony.main(TINY + ["--steps", "1", "--out-dir", str(tmp_path / "run")] + argv)
    assert says in str(e.value.code) + capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("length", [["--steps", str(10**15)], ["--epochs", str(10**12)]])
def test_a_run_of_a_huge_number_of_steps_starts_at_once(tmp_path, length):
    # the start-up checks each question the run draws once, an epoch at a time (it built every step's batch)
    selfharmony.main(TINY + length + ["--stop-after", "1", "--no-eval", "--out-dir", str(tmp_path)])
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    assert selfharmony.drawn_questions(0, 10**15, 10, 4, seed=0) == set(range(10))
    # the same questions as the steps' own batches, from any start, for a run of a few steps
    for start, total in ((0, 1), (3, 7), (1, 2)):
        by_step = {i for s in range(start, total) for i in selfharmony.batch_indices(s, 10, 4, seed=0)[0]}
        assert selfharmony.drawn_questions(start, total, 10, 4, seed=0) == by_step
