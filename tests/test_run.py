"""run.py: a run's flags, folder, checkpoints and logs: resume gives the uninterrupted run (after a stop, a
signal, a kill -9 at any moment, a kill between a checkpoint's renames), damaged files and a full disk are one
line, NaN updates are skipped, and bad numbers are refused by the parser."""
import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import eval as ev
import grpo
import selfharmony
from models import byte_tokenizer, tiny_model
from run import KEPT_FLAGS, RUN_FLAGS, make_run_dir, numbers, resume_args, sample_lines, strict_json
from test_selfharmony import ROOT, TINY, episodes_of, final_weights, read_log, untimed

# the uninterrupted run that the resumed ones are held against (one shared run: finished_run)
STRAIGHT = TINY + ["--steps", "3", "--no-eval", "--save-every", "1", "--kl-coef", "0.01"]


def test_resume_gives_the_same_next_step(tmp_path, finished_run):
    straight = finished_run(STRAIGHT)
    selfharmony.main(STRAIGHT + ["--out-dir", str(tmp_path / "split"), "--stop-after", "2"])
    assert [r["step"] for r in read_log(tmp_path / "split")] == [1, 2]
    selfharmony.main(STRAIGHT + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert untimed(tmp_path / "split") == untimed(straight)
    a, b = final_weights(straight), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--resume"):  # a fresh run never writes over a finished one
        selfharmony.main(STRAIGHT + ["--out-dir", str(straight)])


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


def test_a_flag_that_a_runs_checkpoint_predates_keeps_its_default():
    args = selfharmony.parse_args(TINY)
    flags = RUN_FLAGS + KEPT_FLAGS
    saved = {k: getattr(args, k) for k in flags if k not in ("w_div", "eval_n")}  # a run from before these two
    saved["lr"] = 0.5
    args = resume_args(selfharmony.parse_args(["--resume"]), ["--resume"], saved)
    default = selfharmony.parse_args([])
    assert args.lr == 0.5 and args.model == "tiny" and (args.w_div, args.eval_n) == (default.w_div, default.eval_n)


def test_resume_keeps_the_runs_evaluation_and_saving_settings(tmp_path):
    run = ["--out-dir", str(tmp_path)]
    selfharmony.main(TINY + ["--steps", "2", "--stop-after", "1", "--eval-every", "1", "--eval-n", "3"] + run)
    selfharmony.main(["--resume"] + run)  # no flag but the folder: the run's own settings, not the defaults
    evals = [r for r in read_log(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and all("mean@3" in r["eval"] for r in evals)


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


def test_a_second_ctrl_c_in_the_first_evaluation_is_one_line_then_resume_starts_over(tmp_path, monkeypatch,
                                                                                      capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    run = ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        selfharmony.main(TINY + ["--selector", "mv", "--steps", "1"] + run)
    assert stopped.value.code == 128 + signal.SIGINT  # the shell's status for Ctrl-C
    assert "interrupted in step 0; --resume" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} == {"flags.json", "lock"}  # killed before any log line
    monkeypatch.undo()
    selfharmony.main(["--resume", "--no-eval"] + run)  # starts over with the run's flags (tiny, mv), not the defaults
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["args"]["selector"] == "mv"


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"trainer.pt", "config.json", "model.safetensors"} <= files
    assert {str(tmp_path / "ckpt.tmp" / f) for f in files} | {str(tmp_path)} <= set(synced)


def test_a_run_killed_between_the_checkpoints_two_renames_resumes_from_the_one_before(tmp_path, monkeypatch,
                                                                                      finished_run):
    # a save moves ckpt to ckpt.old, then ckpt.tmp to ckpt: killed in between, ckpt.old is the run's checkpoint
    straight = finished_run(STRAIGHT)
    argv = STRAIGHT + ["--out-dir", str(tmp_path)]
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
    assert untimed(tmp_path) == untimed(straight)
    assert (tmp_path / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_run(tmp_path):
    # every run here is a process of its own under the same settings: runs made with other thread counts differ
    # in their last bits
    argv = TINY + ["--steps", "6", "--no-eval", "--save-every", "2"]
    out, env = tmp_path / "killed", {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "selfharmony.py")] + argv
    subprocess.run(cmd + ["--out-dir", str(tmp_path / "straight")], env=env, cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL)
    cmd += ["--out-dir", str(out)]

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


@pytest.mark.parametrize("damaged", ["trainer.pt", "model.safetensors", "flags.json"])
def test_a_damaged_run_file_is_one_line_and_deletes_nothing(tmp_path, damaged, finished_run):
    # a copy of one shared run, stopped after step 1 of 2
    stopped = finished_run(TINY + ["--steps", "2", "--stop-after", "1", "--no-eval"])
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    run = ["--no-eval", "--out-dir", str(tmp_path)]
    if damaged == "flags.json":  # read when the run has no checkpoint yet
        shutil.rmtree(tmp_path / "ckpt")
    path = tmp_path / damaged if damaged == "flags.json" else tmp_path / "ckpt" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a damaged disk would leave it
    with pytest.raises(SystemExit, match=r"--resume: cannot read .*\(\w+: .*\); the run cannot continue"):
        selfharmony.main(["--resume"] + run)
    assert [r["step"] for r in read_log(tmp_path)] == [1]


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
    real_json, rows = strict_json, []

    def full_on_the_next_log_line(row):
        rows.append(row)
        if len(rows) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_json(row)

    monkeypatch.setattr("run.strict_json", full_on_the_next_log_line)
    with pytest.raises(SystemExit, match="disk full in step 2 .*then --resume"):
        selfharmony.main(argv + ["--resume"])
    monkeypatch.setattr("run.strict_json", real_json)
    selfharmony.main(argv + ["--resume"])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


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
        assert make_run_dir(args, None).resolve() == run.with_name(f"{run.name}-{k}")
        args.out_dir = None
    for flag in ("--resume", "--plot"):
        with pytest.raises(SystemExit, match="need the run's --out-dir"):
            selfharmony.main(TINY + [flag])


def test_save_minutes_saves_once_that_long_has_passed_since_the_last_save(tmp_path, monkeypatch):
    # a step takes 40 s on this clock: with --save-minutes 1, saves after steps 2, 4 and 5 (the end)
    clock, saves = [0.0], []
    real_step, real_save = selfharmony.train_step, __import__("run").save_checkpoint

    def step_of_40_seconds(*args, **kwargs):
        clock[0] += 40
        return real_step(*args, **kwargs)

    clock_time = types.SimpleNamespace(**{**vars(time), "monotonic": lambda: clock[0]})
    for reader in ("selfharmony.time", "run.time"):  # the loop notes when it saved, run.save_due compares
        monkeypatch.setattr(reader, clock_time)
    monkeypatch.setattr(selfharmony, "train_step", step_of_40_seconds)
    monkeypatch.setattr("run.save_checkpoint", lambda *a, **k: saves.append(a[5]) or real_save(*a, **k))
    selfharmony.main(TINY + ["--steps", "5", "--no-eval", "--save-minutes", "1", "--out-dir", str(tmp_path)])
    assert saves == [2, 4, 5]


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
    assert strict_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}}) == \
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


def test_samples_jsonl_holds_the_first_rollouts_of_each_view_of_one_question_with_the_label_that_trained():
    rows = [{"id": "a", "problem": "1 + 2?", "answer": "3"}, {"id": "b", "problem": "3 + 4?", "answer": "7"}]
    texts0 = [f"\\boxed{{{x}}}" for x in (3, 3, 5, 3, 7, 7, 7, 8)]
    texts1 = [f"\\boxed{{{x}}}" for x in (4, 4, 4, 3, 7, 8, 8, 8)]
    args = selfharmony.parse_args(["--reframe", "given", "--selector", "mv", "--log-texts", "3"])
    args.n_rollouts = 4
    episodes = episodes_of(rows, texts0, texts1, [True] * 8, [True] * 8)
    out = {"records": selfharmony.label_and_reward(rows, episodes, args), "episodes": episodes}
    lines = [json.loads(line) for line in sample_lines(out, rows[0], 5, args)]
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


def test_help_states_each_default_once(capsys):
    # argparse adds "(default: X)" to every flag; where the help says the default in words it would say it twice
    import eval as ev
    for main in (selfharmony.main, ev.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0 and "(default: 16)" in text  # the defaults are there
        assert "(default: None)" not in text and not re.search(r"default[^()]*\)\s*\(default", text)


def test_numbers_parses_comma_separated_numbers_or_says_what_is_wrong():
    assert numbers(int, 1)("64,256") == [64, 256] and numbers(int, 1, count=2)("8,512") == [8, 512]
    for parse, text, message in [(numbers(int, 1), "8,0", "must be an integer >= 1, not 0"),
                                 (numbers(int, 1), "8,,2", "must be an integer, not ''"),
                                 (numbers(int, 1, count=2), "abc", "must be 2 comma-separated integers, not 'abc'"),
                                 (numbers(int, 1, count=2), "1,2,3", "must be 2 comma-separated integers")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_a_kill_after_the_second_rename_resumes_and_saves_again(tmp_path, monkeypatch, finished_run):
    # killed after ckpt.tmp became ckpt, before the stale ckpt.old went: a later save must replace that stale one
    # (it failed with 'Directory not empty', and so did every later --resume)
    straight, argv = finished_run(STRAIGHT), STRAIGHT + ["--out-dir", str(tmp_path)]
    real_rmtree = shutil.rmtree

    def killed_before_the_stale_copy_goes(path, *args, **kwargs):
        if Path(path).name == "ckpt.old" and Path(path).exists() and not (tmp_path / "ckpt.tmp").exists():
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_before_the_stale_copy_goes)
    with pytest.raises(SystemExit):
        selfharmony.main(argv)
    steps = [torch.load(tmp_path / d / "trainer.pt", weights_only=False)["step"] for d in ("ckpt", "ckpt.old")]
    assert steps == [2, 1]  # the second save's renames done, its stale copy left
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    selfharmony.main(argv + ["--resume"])
    assert not (tmp_path / "ckpt.old").exists() and untimed(tmp_path) == untimed(straight)
    a, b = final_weights(straight), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_full_disk_error_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    # the weights' own writer raises its own error on a full disk, not an OSError
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError
    real, calls = modeling.safe_save_file, []

    def full_on_the_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "safe_save_file", full_on_the_second_save)
    with pytest.raises(SystemExit, match=r"could not write the checkpoint of step 2 .*No space left.* The last "
                                         "checkpoint stands"):
        selfharmony.main(TINY + ["--steps", "3", "--no-eval", "--save-every", "1", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "ckpt.tmp").exists()
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["step"] == 1


def test_one_process_a_run_folder_and_a_killed_one_leaves_it_free(tmp_path):
    # another process holds the folder (as a live run does, from the moment it makes it): a second run there and a
    # --resume are refused, naming it; killed (kill -9), it holds nothing
    argv = TINY + ["--steps", "2", "--no-eval", "--out-dir", str(tmp_path)]
    selfharmony.main(argv + ["--stop-after", "1"])  # this process lets the folder go when main ends
    holder = subprocess.Popen([sys.executable, "-c", f"import run, time; run.hold({str(tmp_path)!r}); "
                               "print('held', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        for again in (["--resume"], ["--steps", "1"]):
            with pytest.raises(SystemExit, match=rf"{tmp_path} is in use by another run \(process {holder.pid}\)"):
                selfharmony.main(argv[:-2] + ["--out-dir", str(tmp_path)] + again)
    finally:
        holder.kill()
        holder.wait()
    assert [r["step"] for r in read_log(tmp_path)] == [1]  # the refused runs wrote nothing
    selfharmony.main(["--resume", "--out-dir", str(tmp_path)])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_the_nan_streak_is_counted_across_a_resume(tmp_path, monkeypatch):
    # skipped, skipped | resume | skipped: the third in a row stops the run, as it would have uninterrupted
    pattern, real_step = iter([True, True, True, False]), grpo.step
    monkeypatch.setattr(grpo, "step", lambda *a, **k: {**real_step(*a, **k), "skipped": next(pattern)})
    argv = TINY + ["--steps", "4", "--no-eval", "--out-dir", str(tmp_path)]
    selfharmony.main(argv + ["--stop-after", "2"])
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["skips"] == 2
    with pytest.raises(SystemExit, match="stopped at step 3: the gradient was NaN or inf in 3 steps in a row"):
        selfharmony.main(["--resume", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_first_step_stops_at_once_with_the_shells_status(tmp_path, signum):
    # while the imports load: Python's own KeyboardInterrupt traceback (exit -2) before
    run = subprocess.Popen([sys.executable, str(ROOT / "selfharmony.py")] + TINY + ["--out-dir", str(tmp_path)],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signum and "Traceback" not in err


@pytest.mark.parametrize("out_dir, says", [
    ("", "--out-dir '' names no folder"),
    ("a-file", "is a file, not a folder"),
    ("a-file/run", "is a file, not a folder"),
    ("x" * 300, "a name in it is longer than the 255 characters"),
    ("/proc/selfharmony-run", "cannot write in /proc"),
])
def test_an_out_dir_that_cannot_be_a_run_folder_is_one_line_before_the_model_loads(tmp_path, monkeypatch, out_dir,
                                                                                    says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr("run.load_models", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match=re.escape(says)):
        selfharmony.main(TINY + ["--out-dir", out_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_read_only_out_dir_is_one_line(tmp_path, monkeypatch):
    # (root writes in a folder whatever its mode: the refusal of a read-only disk is played by mkdtemp)
    def refused(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("tempfile.mkdtemp", refused)
    with pytest.raises(SystemExit, match=f"--out-dir {tmp_path}/run: cannot write in {tmp_path} \\(Read-only"):
        selfharmony.main(TINY + ["--out-dir", str(tmp_path / "run")])


def test_a_log_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "log.jsonl").mkdir()
    for again in ([], ["--resume"]):
        with pytest.raises(SystemExit, match="log.jsonl is not a file"):
            selfharmony.main(TINY + ["--out-dir", str(tmp_path)] + again)


def test_explain_shows_what_trained_on_a_hand_built_step(tmp_path, monkeypatch, capsys):
    # question a: view 0 votes 5, only 3 is in both views (HMS takes it), the gold is 7 (test_hms's table); the
    # samplers' completions are written by hand, and the table must show what the step trained on
    rows = [{"id": "a", "problem": "Alpha?", "answer": "7", "reframed": "Alpha, retold?"},
            {"id": "b", "problem": "Beta?", "answer": "1", "reframed": "Beta, retold?"}]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    completions = {"Alpha?": [r"\boxed{5}", r"\boxed{5}", "no box", r"\boxed{3}"],
                   "Alpha, retold?": [r"\boxed{3}", r"\boxed{3}", None, r"\boxed{7}"],  # None: cut off, no box
                   "Beta?": [r"\boxed{1}"] * 4, "Beta, retold?": [r"\boxed{1}"] * 4}
    tokenizer = byte_tokenizer()

    def by_hand(model, prompts, max_new_tokens, n=1, **kwargs):
        texts = [completions[next(k for k in completions if f"\n{k}<" in tokenizer.decode(p))] for p in prompts]
        return [tokenizer.encode("cut") if t is None else tokenizer.encode(t) + [tokenizer.eos_token_id]
                for view in texts for t in view]

    monkeypatch.setattr("sample.generate", by_hand)
    argv = TINY + ["--data", str(tmp_path / "two.jsonl"), "--reframe", "given", "--steps", "1", "--no-eval"]
    selfharmony.main(argv + ["--explain", "--explain-questions", "2", "--out-dir", str(tmp_path / "explained")])
    printed = capsys.readouterr().out
    a, b = sorted((json.loads(line) for line in open(tmp_path / "explained" / "explain.jsonl")), key=lambda e: e["id"])
    assert [(r["answer"], r["n0"], r["n1"], r["p0"], r["p1"], r["labels"]) for r in a["candidates"]] == [
        ("3", 1, 2, 0.25, 0.5, ["hms", "mv:1", "mv2", "cross:0"]), ("5", 2, 0, 0.5, 0.0, ["mv:0", "mv0", "cross:1"]),
        ("7", 0, 1, 0.0, 0.25, ["gt", "gold"])]
    assert a["candidates"][0]["hm"] == pytest.approx(1 / 3) and a["none"] == [1, 0] and a["cut_off"] == [0, 1]
    assert a["label"] == ["3", "3"] and a["gold"] == "7" and a["format"] is None and a["step"] == 1
    assert a["rewards"] == [[0, 0, 0, 1], [1, 1, 0, 0]]
    # view 0: mean 1/4, std (unbiased) 1/2; view 1: mean 1/2, std sqrt(1/3)
    assert a["advantages"][0] == pytest.approx([-0.5, -0.5, -0.5, 1.5], rel=1e-5)
    assert a["advantages"][1] == pytest.approx([0.5 * 3 ** 0.5] * 2 + [-0.5 * 3 ** 0.5] * 2, rel=1e-5)
    assert a["why"].startswith("the vote's answer 5 is frequent in view 0 only") and b["why"] is None
    assert "step 1, a: Alpha?" in printed and "  gold 7 (not used to train)" in printed
    assert "  trains (hms): 3" in printed and "  why: the vote's answer 5" in printed
    # off, nothing is printed or written, and the run's own logs are the same
    selfharmony.main(argv + ["--out-dir", str(tmp_path / "plain")])
    assert "trains (" not in capsys.readouterr().out and not (tmp_path / "plain" / "explain.jsonl").exists()
    assert untimed(tmp_path / "plain") == untimed(tmp_path / "explained")
    assert (tmp_path / "plain" / "samples.jsonl").read_text() == (tmp_path / "explained" / "samples.jsonl").read_text()


@pytest.mark.parametrize("reframe", ["fused", "separate", "given"])
def test_explain_on_the_tiny_model_for_each_reframing(tmp_path, capsys, reframe):
    selfharmony.main(TINY + ["--reframe", reframe, "--steps", "2", "--no-eval", "--explain", "--out-dir", str(tmp_path)])
    tables = [json.loads(line) for line in open(tmp_path / "explain.jsonl")]
    assert [t["step"] for t in tables] == [1, 2] and all(len(t["rewards"][v]) == 4 for t in tables for v in (0, 1))
    assert all((t["format"] is None) == (reframe != "fused") for t in tables)
    assert capsys.readouterr().out.count("  trains (hms): ") == 2
