"""eval.py: benchmark loading, the arith generator, grading, metrics, and the CLI end to end."""

import io
import json
import operator
import os
import re
from pathlib import Path

import pytest
import torch

import engine
import eval as ev
import prompts
import sample
from answers import answer_of
from models import load_model


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


if not DATA.is_dir():
    raise RuntimeError(f"the benchmark files are missing: expected them in {DATA}")


COUNTS = {"math500": 500, "gsm8k": 1319, "aime24": 30, "amc": 83, "gpqa": 198, "mmlu_pro": 70, "mmlu_pro_test": 12032}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("name", list(COUNTS))
def test_every_benchmark_loads_and_its_gold_grades_right(name):
    rows = ev.load_benchmark(name, DATA)
    assert len(rows) == COUNTS[name]
    assert len({r["id"] for r in rows}) == len(rows)
    multiple_choice = name in ("gpqa", "mmlu_pro", "mmlu_pro_test")
    for r in rows:
        assert bool(r.get("choices")) == multiple_choice
        assert ev.is_correct("So the answer is \\boxed{" + r["answer"] + "}.", r), r["id"]
        assert not ev.is_correct("I am not sure.", r)


def test_folder_from_the_environment(monkeypatch):
    monkeypatch.setenv("SELFHARMONY_DATA", str(DATA))
    assert len(ev.load_benchmark("aime24")) == 30


def test_any_schema_file_loads(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        json.dumps({"id": 1, "problem": "What is 2 + 3?", "answer": 5}), "",
        json.dumps({"id": "q2", "problem": "Pick one.", "choices": ["x", "y"], "answer": "B"})])
    rows = ev.load_benchmark(str(path))
    assert [r["id"] for r in rows] == ["1", "q2"] and rows[0]["answer"] == "5"


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "problem": "p", "answer": "1"', "invalid JSON"),
    ('{"id": "a", "problem": "p"}', "'answer'"),
    ('{"problem": "p", "answer": "1"}', "'id'"),
    ('{"id": "a", "problem": "p", "answer": "A", "choices": "x y"}', "'choices' must be a non-empty list"),
    ('{"id": "a", "problem": "p", "answer": "E", "choices": ["w", "x", "y", "z"]}', "not a letter A-D"),
    ('{"id": "a", "problem": "p", "answer": "1"}', "duplicate id"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "a", "problem": "p", "answer": "1"}', "", line])
    with pytest.raises(ValueError) as e:
        ev.load_benchmark(str(path))
    assert "bad.jsonl:3:" in str(e.value) and message in str(e.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ev.load_benchmark(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="math500.jsonl"):
        ev.load_benchmark("math500", tmp_path)  # a folder without the file
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'.*math500.*mmlu_pro_test.*arith"):
        ev.load_benchmark("math5000", DATA)


def test_offline_without_a_folder_says_how_to_give_one(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise ev.urllib.error.URLError("no network")

    monkeypatch.delenv("SELFHARMONY_DATA", raising=False)
    monkeypatch.setattr(ev, "CACHE", tmp_path)
    monkeypatch.setattr(ev.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match="--data-dir.*SELFHARMONY_DATA"):
        ev.load_benchmark("gsm8k")
    with pytest.raises(FileNotFoundError, match="--data-dir.*SELFHARMONY_DATA"):
        ev.load_benchmark("gpqa")  # no JSON source at all


def test_download_converts_each_public_source_once_into_the_cache(tmp_path, monkeypatch):
    upstream = {  # a row of each source in its own layout, as its URL serves it
        "math500": {"unique_id": "test/algebra/1.json", "problem": "P?", "answer": "\\frac{1}{2}", "subject": "Algebra",
                    "level": "3"},
        "gsm8k": {"question": "Q?", "answer": "So 1,200 + 34 = 1,234.\n#### 1,234"},
        "aime24": {"problem": "A?", "answer": "033"},
        "mmlu_pro": {"question": "Which?\n" + "\n".join(f"{c}. opt {c}" for c in "ABCDEFGHIJ"), "answer": "C"},
    }
    fetched = []

    def urlopen(url, timeout):
        name = next(name for name, (source, _) in ev.SOURCES.items() if source == url)
        fetched.append(name)
        return io.BytesIO((json.dumps(upstream[name]) + "\n").encode())

    monkeypatch.delenv("SELFHARMONY_DATA", raising=False)
    monkeypatch.setattr(ev, "CACHE", tmp_path)
    monkeypatch.setattr(ev.urllib.request, "urlopen", urlopen)
    rows = {name: ev.load_benchmark(name) for name in upstream}
    assert rows == {
        "math500": [dict(id="test/algebra/1.json", problem="P?", answer="\\frac{1}{2}", source="math500",
                         subject="Algebra", level=3)],
        "gsm8k": [dict(id="gsm8k-test-0000", problem="Q?", answer="1234", source="gsm8k")],
        "aime24": [dict(id="aime24-00", problem="A?", answer="33", source="aime24")],
        "mmlu_pro": [dict(id="mmlu-pro-val-0", problem="Which?", choices=[f"opt {c}" for c in "ABCDEFGHIJ"],
                          answer="C", source="mmlu_pro")]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ev.FILES[name] for name in upstream)  # no .tmp
    assert {name: ev.load_benchmark(name) for name in upstream} == rows and len(fetched) == 4  # fetched once


def test_download_conversion_of_the_mmlu_pro_harness_layout():
    question, choices = ev._split_options("Q line 1\nQ line 2\n" + "\n".join(f"{c}. opt {c}" for c in "ABCDEFGHIJ"))
    assert question == "Q line 1\nQ line 2" and choices == [f"opt {c}" for c in "ABCDEFGHIJ"]


OPS = {"+": operator.add, "-": operator.sub}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arith_answers_are_right_and_reframed_keeps_the_numbers(level):
    rows = ev.load_benchmark("arith", n=40, seed=3, level=level)
    assert len(rows) == 40 and len({r["problem"] for r in rows}) == 40
    for r in rows:
        numbers = [int(x) for x in re.findall(r"\d+", r["problem"])]
        ops = re.findall(r" ([+-]) ", r["problem"])
        assert numbers == r["numbers"] and ops == r["ops"]
        value = numbers[0]
        for op, x in zip(ops, numbers[1:]):
            value = OPS[op](value, x)
        assert r["answer"] == str(value) and value >= 0
        assert sorted(int(x) for x in re.findall(r"\d+", r["reframed"])) == sorted(numbers)
        assert r["reframed"] != r["problem"] and ev.is_correct(f"\\boxed{{{value}}}", r)
        digits = 1 if level == 1 else 2
        assert all(len(str(x)) == digits for x in numbers)
    assert {len(r["numbers"]) for r in rows} == ({3} if level == 3 else {2})


def test_arith_is_deterministic_for_a_seed():
    a = ev.load_benchmark("arith", n=16, seed=0, level=2)
    assert a == ev.load_benchmark("arith", n=16, seed=0, level=2)
    assert a[:8] == ev.load_benchmark("arith", n=8, seed=0, level=2)
    assert a != ev.load_benchmark("arith", n=16, seed=1, level=2)
    assert ev.load_benchmark("arith")[0]["problem"].startswith("What is ")
    with pytest.raises(ValueError, match="level"):
        ev.load_benchmark("arith", level=4)
    # one-digit sums: 9 x 9 distinct questions, all of them at n = 81, and no more (one more would never end)
    assert len({r["problem"] for r in ev.load_benchmark("arith", n=81)}) == 81
    with pytest.raises(ValueError, match="only 81 distinct"):
        ev.load_benchmark("arith", n=82)


@pytest.mark.parametrize("text, answer, right", [
    ("2 + 3 = 5, so \\boxed{5}.", "5", True),
    ("First \\boxed{4}; no wait, it is \\boxed{5}.", "5", True),  # the last box counts
    ("First \\boxed{5}; no wait, it is \\boxed{4}.", "5", False),
    ("The answer is 5.", "5", False),  # no box, no answer
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{6}", "5", False),
])
def test_open_answers(text, answer, right):
    assert ev.is_correct(text, {"id": "q", "problem": "p", "answer": answer}) is right


@pytest.mark.parametrize("text, right", [
    ("A is wrong and C is tempting, but B fits. \\boxed{D}", False),
    ("A is wrong and C is tempting, but D does not. \\boxed{B}", True),
    ("Not A, not C: \\boxed{B}", True),
    ("\\boxed{F}", False),  # out of the 4 options
    ("The answer is B.", False),  # no box
])
def test_multiple_choice_reads_the_letter_in_the_last_box(text, right):
    row = {"id": "q", "problem": "p", "choices": ["w", "x", "y", "z"], "answer": "B"}
    assert ev.is_correct(text, row) is right


def test_mean_maj_pass_at_k_by_hand():
    answers = [["5", "5", "6", None],   # 2 of 4 right, vote 5 right
               ["7", "8", "8", None],   # 1 of 4 right, vote 8 wrong
               [None, None, None, "1"]]  # 0 of 4 right, vote 1 (None never wins) wrong
    golds = ["5", "7", "2"]
    correct = [[a == g for a in q] for q, g in zip(answers, golds)]
    assert ev.mean_at_k(correct) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert ev.maj_at_k(answers, correct) == pytest.approx(1 / 3)
    assert ev.pass_at_k(correct) == pytest.approx(2 / 3)
    assert ev.maj_at_k([[None, None, "3"]], [[False, False, True]]) == 1.0


def test_summary_by_group():
    rows = [{"id": str(i), "problem": "p", "answer": g, "subject": s, "level": lv}
            for i, (g, s, lv) in enumerate([("5", "Algebra", 1), ("7", "Algebra", 2), ("2", "Geometry", 2)])]
    answers = [["5", "5"], ["8", "7"], [None, None]]
    correct = [[True, True], [False, True], [False, False]]
    s = ev.summarize(rows, correct, answers, greedy=[True, False, False])
    assert s["questions"] == 3 and s["mean@2"] == pytest.approx(0.5) and s["greedy"] == pytest.approx(1 / 3)
    assert s["by_subject"]["Algebra"] == {"questions": 2, "mean@2": 0.75, "maj@2": 1.0, "pass@2": 1.0, "greedy": 0.5}
    assert s["by_level"]["2"]["mean@2"] == pytest.approx(0.25) and s["by_level"]["2"]["pass@2"] == 0.5
    assert "by_category" not in s


def test_groups_are_sorted_and_a_key_only_some_rows_carry_makes_no_group():
    rows = [{"id": "g", "problem": "p", "answer": "1", "subject": "Geometry", "level": 2},
            {"id": "a", "problem": "p", "answer": "1", "subject": "Algebra"}]  # no level
    s = ev.summarize(rows, [[True], [False]], [["1"], ["2"]])
    assert list(s["by_subject"]) == ["Algebra", "Geometry"] and "by_level" not in s


def test_summarize_records_counts_only_questions_whose_n_samples_are_all_there():
    rows = [{"id": i, "problem": "p", "answer": "5"} for i in "abc"]
    rec = lambda i, kind, correct: dict(id=i, kind=kind, answer="5" if correct else "4", correct=correct)
    records = [rec("a", "sampled", True), rec("a", "sampled", False), rec("a", "greedy", True),
               rec("b", "sampled", True)]  # b: one of its two samples, as after an interrupt
    s = ev.summarize_records(rows, records, n=2)
    assert s["questions"] == 1 and s["mean@2"] == 0.5 and s["greedy"] == 1.0
    # c done too but without its greedy completion: no greedy column rather than one over a part
    s = ev.summarize_records(rows, records + [rec("c", "sampled", True)] * 2, n=2)
    assert s["questions"] == 2 and s["mean@2"] == 0.75 and "greedy" not in s
    assert ev.summarize_records(rows, records[3:], n=2) is None


def test_print_table_prints_the_overall_line_then_one_a_group(capsys):
    ev.print_table({"questions": 3, "mean@2": 0.5, "greedy": 1 / 3,
                    "by_level": {"1": {"questions": 2, "mean@2": 0.25, "greedy": 0.5}}})
    assert capsys.readouterr().out.splitlines() == [
        "group                               questions     mean@2     greedy",
        "all                                         3     0.5000     0.3333",
        "level=1                                     2     0.2500     0.5000"]


def test_cli_end_to_end_on_the_tiny_model(tmp_path):
    data = write_jsonl(tmp_path / "two.jsonl", [
        json.dumps({"id": "a", "problem": "What is 2 + 3?", "answer": "5", "subject": "add"}),
        json.dumps({"id": "b", "problem": "Pick.", "choices": ["x", "y"], "answer": "A", "subject": "mc"}),
        json.dumps({"id": "c", "problem": "What is 1 + 1?", "answer": "2", "subject": "add"})])
    summary = ev.main(["--model", "tiny", "--data", str(data), "--limit", "2", "--n", "3", "--max-new-tokens", "4",
                       "--batch-size", "1", "--greedy", "--device", "cpu", "--out-dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "two-tiny.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "out" / "two-tiny.samples.jsonl").read_text().splitlines()]
    assert results["questions"] == 2 and results["mean@3"] == summary["mean@3"] and "greedy" in results
    assert set(results["by_subject"]) == {"add", "mc"}
    assert len(samples) == 2 * 3 + 2 and {s["id"] for s in samples} == {"a", "b"}
    assert all(set(s) == {"id", "kind", "index", "text", "finished", "answer", "correct"} for s in samples)


def test_evaluate_reproduces_with_a_seed_and_restores_train_mode():
    model, tokenizer = load_model("tiny")
    rows = ev.load_benchmark("arith", n=3)
    model.train()
    runs = [ev.evaluate(model, tokenizer, rows, n=2, max_new_tokens=5, batch_size=2, seed=s) for s in (7, 7, 8)]
    assert model.training
    texts = [[r["text"] for r in records] for _, records in runs]
    assert texts[0] == texts[1] != texts[2] and len(texts[0]) == 3 * 2
    assert [r["id"] for r in runs[0][1]] == [rows[0]["id"]] * 2 + [rows[1]["id"]] * 2 + [rows[2]["id"]] * 2


def test_evaluate_hands_its_settings_to_the_sampler_and_grades_what_comes_back(monkeypatch):
    model, tokenizer = load_model("tiny")
    rows = ev.load_benchmark("arith", n=3)
    gold = {tuple(prompts.prompt_ids(tokenizer, *prompts.solver_messages(r))): int(r["answer"]) for r in rows}
    eos, calls = tokenizer.eos_token_id, []

    def fake(model, prompts, max_new_tokens, *, n, generator, progress, **kw):  # sample j: gold, gold + 1, gold cut off
        assert isinstance(generator, torch.Generator)
        calls.append(dict(kw, n=n, prompts=len(prompts), max_new_tokens=max_new_tokens, training=model.training))
        texts = [(f"{gold[tuple(p)] + (j == 1)}", j < 2) for p in prompts for j in range(n)]
        return [tokenizer.encode(text, add_special_tokens=False) + [eos] * stop for text, stop in texts]

    monkeypatch.setattr(engine, "generate", fake)  # engine="fast": the fast engine samples, not the reference loop
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("the reference loop sampled"))
    model.train()
    summary, records = ev.evaluate(model, tokenizer, rows, n=3, temperature=0.7, top_p=0.9, max_new_tokens=9,
                                   batch_size=2, greedy=True, engine="fast", max_rows=5)
    common = dict(top_p=0.9, stop_ids=[eos], max_rows=5, max_new_tokens=9, training=False)
    assert calls == [dict(common, n=3, temperature=0.7, prompts=2), dict(common, n=3, temperature=0.7, prompts=1),
                     dict(common, n=1, temperature=0.0, prompts=2), dict(common, n=1, temperature=0.0, prompts=1)]
    assert model.training  # put back after
    sampled = [r for r in records if r["kind"] == "sampled"]
    assert [r["index"] for r in sampled] == [0, 1, 2] * 3 and [r["id"] for r in sampled[::3]] == [r["id"] for r in rows]
    g = int(rows[0]["answer"])
    assert [(r["text"], r["finished"], r["answer"], r["correct"]) for r in sampled[:3]] == [
        (str(g), True, str(g), True), (str(g + 1), True, str(g + 1), False), (str(g), False, None, False)]
    assert summary["mean@3"] == pytest.approx(1 / 3) and summary["pass@3"] == 1.0 and summary["greedy"] == 1.0


def test_the_cli_hands_each_option_to_evaluate(tmp_path, monkeypatch):
    seen = []

    def spy(model, tokenizer, rows, **kw):
        seen.append(dict(kw, questions=len(rows), device=model.device.type))
        return {"questions": len(rows), "mean@2": 0.5}, []

    monkeypatch.setattr(ev, "evaluate", spy)
    argv = ["--model", "tiny", "--data", "arith", "--arith-n", "4", "--limit", "3", "--device", "cpu",
            "--out-dir", str(tmp_path)]
    ev.main(argv + ["--n", "2", "--temperature", "0.5", "--top-p", "0.9", "--max-new-tokens", "7", "--batch-size",
                    "3", "--seed", "4", "--greedy", "--engine", "fast", "--max-rows", "6", "--thinking-block"])
    ev.main(argv)
    for kw in seen:
        assert callable(kw.pop("on_records"))
    assert seen[0] == dict(n=2, temperature=0.5, top_p=0.9, max_new_tokens=7, batch_size=3, seed=4, greedy=True,
                           engine="fast", max_rows=6, thinking_block=True, grader="normal", questions=3, device="cpu")
    assert seen[1] == dict(n=16, temperature=0.8, top_p=0.95, max_new_tokens=3072, batch_size=8, seed=0, greedy=False,
                           engine="eager", max_rows=None, thinking_block=False, grader="normal", questions=3,
                           device="cpu")


def test_cli_on_arith(tmp_path):
    ev.main(["--model", "tiny", "--data", "arith", "--arith-n", "2", "--n", "2", "--max-new-tokens", "3",
             "--device", "cpu", "--out-dir", str(tmp_path)])
    assert (tmp_path / "arith-tiny.json").is_file() and (tmp_path / "arith-tiny.samples.jsonl").is_file()


def test_arith_asks_for_the_bare_number_and_reads_the_last_one():
    row = ev.load_benchmark("arith", n=1, seed=0)[0]
    system, user = prompts.solver_messages(row)
    assert system == "Answer with just the number." and user == row["problem"]
    value = int(row["answer"])
    assert ev.is_correct(f"{value - 1}? No: {value}", row)
    assert not ev.is_correct(f"{value}, or maybe {value + 1}.", row)
    assert ev.is_correct(f"\\boxed{{{value}}} though 99 is near", row)  # a box still wins
    assert answer_of("no digits here", row) is None
    # a completion cut off by max_new_tokens names no bare number (it is most often the question's own)
    assert answer_of(f"To add {value} and", row, finished=False) is None
    assert not ev.is_correct(f"so {value}", row, finished=False)
    assert ev.is_correct(f"\\boxed{{{value}}} and then", row, finished=False)  # a box is an answer anyway
    # benchmarks without answer_format keep the strict rule: no box, no answer
    math_row = {"id": "m", "problem": "1 + 1?", "answer": "2"}
    assert answer_of("it is 2", math_row) is None and prompts.solver_messages(math_row)[0] == prompts.SOLVER_SYSTEM


def test_ctrl_c_keeps_the_questions_done_and_says_so_in_one_line(tmp_path, monkeypatch):
    real, calls = sample.generate, []

    def interrupted_on_the_third_call(*args, **kwargs):  # calls: the lines on disk when each call starts
        calls.append(len((tmp_path / "arith-tiny.samples.jsonl").read_text().splitlines()))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", interrupted_on_the_third_call)
    argv = ["--model", "tiny", "--data", "arith", "--arith-n", "4", "--n", "2", "--max-new-tokens", "3",
            "--batch-size", "1", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"^interrupted: 2 of 4 questions done, their metrics in .*arith-tiny.json"):
        ev.main(argv)
    results = json.loads((tmp_path / "arith-tiny.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "arith-tiny.samples.jsonl").read_text().splitlines()]
    assert results["interrupted"] and results["questions"] == 2 and len(samples) == 2 * 2
    assert calls == [0, 2, 4]  # each batch's completions written (and flushed) once it is graded
    # the two questions done are what a whole run of those two gives
    monkeypatch.setattr(sample, "generate", real)
    whole = ev.main(argv[:5] + ["2"] + argv[6:] + ["--out-dir", str(tmp_path / "whole")])
    assert (tmp_path / "whole" / "arith-tiny.samples.jsonl").read_text().splitlines() == [json.dumps(s) for s in samples]
    assert whole["mean@2"] == results["mean@2"]


def test_a_rerun_interrupted_before_any_question_leaves_no_stale_metrics(tmp_path, monkeypatch):
    argv = ["--model", "tiny", "--data", "arith", "--arith-n", "2", "--n", "2", "--max-new-tokens", "3",
            "--out-dir", str(tmp_path)]
    ev.main(argv)  # an earlier whole run: its metrics and samples

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", interrupted)
    with pytest.raises(SystemExit, match="interrupted before any question was done; .* 0 completions, and no metrics"):
        ev.main(argv)
    # the samples file is the new run's (empty): the old run's metrics must not sit beside it
    assert (tmp_path / "arith-tiny.samples.jsonl").read_text() == ""
    assert not (tmp_path / "arith-tiny.json").exists()


def test_results_are_named_by_the_whole_model_id_and_never_overwrite_another_models(tmp_path):
    assert ev.results_name("math500", "Qwen/Qwen3-1.7B-Base") == "math500-Qwen_Qwen3-1.7B-Base"
    assert ev.results_name("x/my.jsonl", "/home/me/runs/a/ckpt/") == "my-home_me_runs_a_ckpt"
    assert ev.results_name("arith", "runs/a/ckpt") != ev.results_name("arith", "runs/b/ckpt")
    (tmp_path / "arith-a_b.json").write_text(json.dumps({"args": {"model": "a_b"}}))
    with pytest.raises(SystemExit, match="holds the results of model 'a_b'"):
        ev.main(["--model", "a/b", "--data", "arith", "--out-dir", str(tmp_path)])


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


def test_a_damaged_results_file_counts_as_none_and_results_are_written_whole(tmp_path, monkeypatch):
    # a run killed while writing its results left half a file (results were written in place): a later run is not
    # stopped by it, and now writes beside, then renames
    argv = ["--model", "tiny", "--data", "arith", "--arith-n", "2", "--n", "2", "--max-new-tokens", "3",
            "--out-dir", str(tmp_path)]
    (tmp_path / "arith-tiny.json").write_text('{"args": {"model": "ti')
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((Path(src).name, Path(dst).name)) or
                        real_replace(src, dst))
    summary = ev.main(argv)
    assert json.loads((tmp_path / "arith-tiny.json").read_text())["mean@2"] == summary["mean@2"]
    assert renames == [("arith-tiny.json.tmp", "arith-tiny.json")] and not (tmp_path / "arith-tiny.json.tmp").exists()


def graded_cli(tmp_path, monkeypatch, grader, texts):
    """eval.py's CLI on a two-question file, the sampler answering `texts` (two completions a question)."""
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "root", "problem": "1/sqrt(3)?", "answer": "\\frac{1}{\\sqrt3}"},
        {"id": "half", "problem": "1/2?", "answer": "\\frac12"})))
    tok = ev.load_model("tiny")[1]
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, n=1, **k: [
        tok.encode(t) + [tok.eos_token_id] for t in texts[: len(prompts) * n]])
    ev.main(["--model", "tiny", "--data", str(data), "--n", "2", "--device", "cpu", "--grader", grader,
             "--out-dir", str(tmp_path / "out")])
    return json.loads((tmp_path / "out" / "two-tiny.json").read_text())


def test_grader_math_verify_compares_values_where_the_normal_form_compares_strings(tmp_path, monkeypatch, capsys):
    pytest.importorskip("math_verify", reason="math-verify is optional: pip install math-verify")
    row = {"id": "q", "problem": "p", "answer": "\\frac{1}{\\sqrt3}"}
    text = "so \\boxed{\\frac{\\sqrt{3}}{3}}"  # the same value, rationalised: no string rule joins them
    right = lambda text, row: ev.math_verify_right(text, row, answer_of(text, row))
    assert right(text, row) and not ev.is_correct(text, row)
    assert not right("\\boxed{\\sqrt3}", row) and not right("no box", row)
    choice = {"id": "c", "problem": "p", "choices": ["x", "y"], "answer": "B"}
    assert right("\\boxed{B}", choice) and not right("\\boxed{A}", choice)
    arith = {"id": "s", "problem": "2 + 3?", "answer": "5", "answer_format": "number"}
    assert right("so 2 + 3 = 5", arith) and not right("so 2 + 3 = 6", arith)  # the bare number, no box
    texts = ["\\boxed{\\frac{\\sqrt{3}}{3}}", "\\boxed{2}", "\\boxed{0.5}", "\\boxed{1/2}"]
    out = graded_cli(tmp_path, monkeypatch, "math-verify", texts)
    assert out["grader"] == "math-verify" and out["mean@2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    out = graded_cli(tmp_path, monkeypatch, "both", texts)
    # the normal form writes 0.5 and 1/2 alike, \frac12; the rationalised root it keeps apart from the gold
    assert out["grader"] == "both" and out["mean@2"] == pytest.approx((0 + 1) / 2)
    assert out["math_verify"]["mean@2"] == pytest.approx(3 / 4) and out["graders_disagree"] == 1
    printed = capsys.readouterr().out
    assert "mean@2 mv" in printed and "the two graders decide 1 of 4 completions differently" in printed
    records = [json.loads(line) for line in open(tmp_path / "out" / "two-tiny.samples.jsonl")]
    assert [(r["correct"], r["correct_math_verify"]) for r in records] == [
        (False, True), (False, False), (True, True), (True, True)]


def test_grader_math_verify_without_the_package_is_one_line(tmp_path, monkeypatch):
    real = ev.importlib.util.find_spec
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else
                        real(name, *a))
    for grader in ("math-verify", "both"):
        with pytest.raises(SystemExit, match=f"--grader {grader} needs the package math-verify: pip install"):
            ev.main(["--model", "tiny", "--data", "arith", "--grader", grader, "--out-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before the model loads or a file is written
