"""
Evaluation: how often the model's boxed answer matches a benchmark's gold answer.

Every question is rendered with the solver prompt (prompts.py, the same one the training loop uses; for
GPQA and MMLU-Pro the release's letter-only system turn), sampled k times, and each completion is graded
by the project's one normal form (answers.answer_of), so a vote while training and a grade here agree.
--grader math-verify grades instead with the math-verify package (pip install math-verify), which parses
the answer and the gold and compares values, with some algebra, as peer evaluations often do (74x slower
on its own test cases); --grader both shows the two side by side and counts the completions they decide
differently. Votes and rewards keep the normal form.
Ground-truth answers are used only here (and by the `gt` selector), never to train.

Metrics over Q questions with k samples each, c_qj = 1 if sample j of question q is right:
    mean@k = 1/Q sum_q 1/k sum_j c_qj          (the paper's headline number, k = 16, T = 0.8, top-p 0.95)
    maj@k  = 1/Q sum_q c_q(v_q),  v_q = majority_vote(a_q1..a_qk)   (a = normalised answer, c_q(v) the grade
             of a sample that answered v; None never wins; a tie goes to the smallest string: option A first)
    pass@k = 1/Q sum_q max_j c_qj              (any of the k samples right)
    greedy = accuracy of one temperature-0 completion a question
They are reported overall and per group (MATH500: subject and level; MMLU-Pro: category; GPQA: domain).

Departures: pass@k is the plain "any of the k drawn samples", not the unbiased estimator of
Chen et al. (2021) for k < n. The paper's GPQA row implies 197 questions; this loads the public 198.
MMLU-Pro defaults to the 70-question validation split the paper's numbers imply (`mmlu_pro_test`
is the 12032-question test split). `arith` is this project's own generated task for the CPU demo;
its rows ask for the bare number and, where a finished completion has no box, its last number
is the answer (SmolLM2-135M rarely writes \\boxed{}); a completion cut off by the token limit
has no bare-number answer, and every other benchmark needs the box.

Run it:
    python eval.py --model smollm2 --data arith --n 8 --max-new-tokens 64
    python eval.py --model Qwen/Qwen3-1.7B-Base --data math500 --data-dir ../shared/data --n 16 --greedy
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports load or the model does: stop at once, with the
    for sig in (signal.SIGINT, signal.SIGTERM):  # shell's status (130, 143); main keeps what was done after that
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))

import argparse
import importlib.util
import json
import os
import random
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import engine as fast  # the fast engine; `engine` names evaluate's choice of sampler
import sample
import scale
from answers import answer_of, extract_answer, gold_answer
from hms import majority_vote
from models import cache_dir, load_model
from prompts import LETTERS, prompt_ids, solver_messages
from run import DefaultsHelp, log_line, number

# -----------------------------------------------------------------------------
# Benchmarks

GRADERS = ("normal", "math-verify", "both")
FILES = {  # benchmark name -> file in the data folder (schema: shared/data/README.md)
    "math500": "math500.jsonl", "gsm8k": "gsm8k.jsonl", "aime24": "aime24.jsonl", "amc": "amc.jsonl",
    "gpqa": "gpqa_diamond.jsonl", "mmlu_pro": "mmlu_pro_validation.jsonl", "mmlu_pro_test": "mmlu_pro_test.jsonl",
}
CACHE = cache_dir() / "data"  # downloaded benchmarks


def _split_options(text):
    """The harness stores the question then exactly 10 lines 'A. x' .. 'J. y': (question, [x, .., y])."""
    lines = text.split("\n")
    return "\n".join(lines[:-10]), [line[3:] for line in lines[-10:]]


# Public JSON Lines sources for machines that are online, each with its conversion to the schema.
# AMC, GPQA and the MMLU-Pro test split have no plain JSON source (parquet, CSV, zip): pass a folder.
SOURCES = {
    "math500": ("https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl",
                lambda r, i: dict(id=r["unique_id"], problem=r["problem"], answer=r["answer"], source="math500",
                                  subject=r["subject"], level=int(r["level"]))),
    "gsm8k": ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
              lambda r, i: dict(id=f"gsm8k-test-{i:04d}", problem=r["question"], source="gsm8k",
                                answer=r["answer"].split("####")[-1].strip().replace(",", ""))),
    "aime24": ("https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/aime24/test.jsonl",
               lambda r, i: dict(id=f"aime24-{i:02d}", problem=r["problem"], answer=str(int(r["answer"])),
                                 source="aime24")),
    "mmlu_pro": ("https://raw.githubusercontent.com/Zhuofeng-Li/math-evaluation-harness/main/data/mmlu_pro/test.jsonl",
                 lambda r, i: dict(id=f"mmlu-pro-val-{i}", problem=_split_options(r["question"])[0],
                                   choices=_split_options(r["question"])[1], answer=r["answer"], source="mmlu_pro")),
}


def check_row(row, where):
    """Raise a one-line ValueError naming `where` (file:line) unless row follows the schema."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object")
    for key in ("id", "problem", "answer"):
        if key not in row or not isinstance(row[key], (str, int, float)):
            raise ValueError(f"{where}: missing or non-scalar {key!r}")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise ValueError(f"{where}: 'problem' must be a non-empty string")
    if "choices" in row:
        if not isinstance(row["choices"], list) or not row["choices"]:
            raise ValueError(f"{where}: 'choices' must be a non-empty list")
        if str(row["answer"]) not in LETTERS[: len(row["choices"])]:
            raise ValueError(f"{where}: answer {row['answer']!r} is not a letter A-{LETTERS[len(row['choices']) - 1]}")


def read_jsonl(path):
    """Rows of a JSON Lines file in the schema; blank lines are skipped, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows, seen = [], set()
    # split on "\n" only: str.splitlines would also cut at the U+2028 that some problems contain
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        check_row(row, where)
        row["id"], row["answer"] = str(row["id"]), str(row["answer"])  # ids and answers are compared as strings
        if row["id"] in seen:
            raise ValueError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no questions in the file")
    return rows


def download(name):
    """Fetch a benchmark's public source once into the cache, converted to the schema; its path."""
    path = CACHE / FILES[name]
    if path.is_file():
        return path
    if name not in SOURCES:
        raise FileNotFoundError(f"{name}: no JSON source to download; pass --data-dir DIR or set SELFHARMONY_DATA")
    url, convert = SOURCES[name]
    try:
        with urllib.request.urlopen(url, timeout=30) as f:
            lines = [json.loads(line) for line in f.read().decode("utf-8").split("\n") if line.strip()]
    except OSError as e:  # URLError and timeouts are OSErrors
        raise FileNotFoundError(f"cannot download {name} ({e}); offline? pass --data-dir DIR or set SELFHARMONY_DATA") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(convert(r, i)) + "\n" for i, r in enumerate(lines)), encoding="utf-8")
    os.replace(tmp, path)  # atomic: an interrupted download leaves no half file in the cache
    return path


def load_benchmark(name, data_dir=None, *, n=16, seed=0, level=1):
    """
    Rows {id, problem, answer, source, [choices], ...} of a benchmark (a name in FILES), of any
    schema file (a path ending in .jsonl), or of the generated `arith` task (n, seed, level).
    The folder is data_dir, else $SELFHARMONY_DATA, else the public source is downloaded.
    """
    if str(name).endswith(".jsonl"):
        return read_jsonl(name)
    if name == "arith":
        return make_arith(n, seed, level)
    if name not in FILES:
        raise ValueError(f"unknown benchmark {name!r}: use one of {', '.join([*FILES, 'arith'])} or a .jsonl path")
    data_dir = data_dir or os.environ.get("SELFHARMONY_DATA")
    return read_jsonl(Path(data_dir) / FILES[name] if data_dir else download(name))


# -----------------------------------------------------------------------------
# arith: arithmetic questions made here, each with a second wording (the `--reframe given` view)

NAMES = ["Tom", "Ana", "Omar", "Mia", "Kai", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells"]
STORIES = {  # ops -> the same computation told as a story, numbers in the order of `numbers`
    ("+",): "{name} has {0} {item} and is given {1} more. How many {item} does {name} have now?",
    ("-",): "{name} has {0} {item} and gives {1} of them away. How many {item} does {name} have left?",
    ("+", "-"): "{name} has {0} {item}, finds {1} more, then loses {2}. How many {item} does {name} have at the end?",
}


def arith_size(level):
    """How many distinct questions make_arith has at a level: a + b of one digit each; a + b or a - b with
    a >= b of two digits; a + b - c of two digits each, c up to a + b."""
    if level == 1:
        return 9 * 9
    if level == 2:
        return 2 * (90 * 91 // 2)
    return sum(min(99, a + b) - 9 for a in range(10, 100) for b in range(10, 100))


def make_arith(n=16, seed=0, level=1):
    """
    n distinct questions "What is a + b?" (level 1: one-digit sums), "What is a - b?" or
    "What is a + b?" (level 2: two-digit, no negative results) or "What is a + b - c?" (level 3:
    two-digit, two steps). `reframed` tells the same numbers as a story about a person and things.
    The same (n, seed, level) gives the same rows; a smaller n gives a prefix of them.
    """
    if level not in (1, 2, 3):
        raise ValueError(f"arith level must be 1, 2 or 3, got {level}")
    if n > arith_size(level):
        raise ValueError(f"arith level {level} has only {arith_size(level)} distinct questions, asked for {n}")
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        if level == 1:
            ops, nums = ("+",), [rng.randint(1, 9), rng.randint(1, 9)]
        elif level == 2:
            ops, nums = (rng.choice("+-"),), sorted([rng.randint(10, 99), rng.randint(10, 99)], reverse=True)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            ops, nums = ("+", "-"), [a, b, rng.randint(10, min(99, a + b))]
        name, item = rng.choice(NAMES), rng.choice(ITEMS)  # drawn even for repeats: keeps the prefix property simple
        if (ops, tuple(nums)) in seen:
            continue
        seen.add((ops, tuple(nums)))
        value = nums[0] + sum(x if op == "+" else -x for op, x in zip(ops, nums[1:]))
        expr = " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])
        rows.append(dict(id=f"arith-L{level}-s{seed}-{len(rows):03d}", problem=f"What is {expr}?",
                         answer=str(value), source="arith", answer_format="number", level=level,
                         numbers=nums, ops=list(ops),
                         reframed=STORIES[ops].format(*nums, name=name, item=item)))
    return rows


# -----------------------------------------------------------------------------
# Grading and metrics (pure: lists in, numbers out)


def is_correct(text, row, finished=True):
    """1[answer of the completion = gold]; a completion without an answer is wrong."""
    return is_right(answer_of(text, row, finished), row)


def is_right(answer, row):
    """1[answer = the row's gold answer], for an answer already read (answer_of); None is wrong."""
    return answer is not None and answer == gold_answer(row)


def math_verify_right(text, row, answer):
    """math-verify's verdict (pip install math-verify) on a completion's answer as written, the content of
    its last box, against the row's gold answer: it parses both and compares them as values, with some
    algebra, where the normal form compares strings (74x slower). answer: the normal form's reading
    (answer_of), which stands where there is no box (an arith row's bare number); a multiple-choice
    letter has nothing for math-verify to add: the normal grade."""
    from math_verify import parse, verify
    if row.get("choices"):
        return is_right(answer, row)
    written = extract_answer(text)
    written = answer if written is None else written
    return written is not None and bool(verify(parse(f"${row['answer']}$"), parse(f"${written}$")))


def mean_at_k(correct):
    """correct: one list of k bools a question -> the mean over questions of each one's accuracy."""
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def maj_at_k(answers, correct):
    """answers: one list of k normalised answers (or None) a question, correct: the grader's verdict on each
    -> the share of questions whose majority vote is right (the verdict on a sample that gave it)."""
    votes = [majority_vote(a) for a in answers]
    return sum(any(c for a, c in zip(ans, cor) if a == v) for ans, cor, v in zip(answers, correct, votes)) / len(votes)


def pass_at_k(correct):
    """Share of questions with at least one right sample among its k."""
    return sum(any(c) for c in correct) / len(correct)


def metrics(correct, answers, greedy=None):
    """The metric table of one group of questions; greedy: one bool a question, or None."""
    k = len(correct[0])
    out = {"questions": len(correct), f"mean@{k}": mean_at_k(correct), f"maj@{k}": maj_at_k(answers, correct),
           f"pass@{k}": pass_at_k(correct)}
    if greedy is not None:
        out["greedy"] = sum(greedy) / len(greedy)
    return out


GROUP_KEYS = ("subject", "level", "category", "domain")


def summarize(rows, correct, answers, greedy=None):
    """metrics() over all questions, plus by_<key> for each of GROUP_KEYS the rows carry."""
    summary = metrics(correct, answers, greedy)
    for key in (k for k in GROUP_KEYS if all(k in r for r in rows)):
        groups = defaultdict(list)
        for i, r in enumerate(rows):
            groups[str(r[key])].append(i)
        summary[f"by_{key}"] = {g: metrics([correct[i] for i in idx], [answers[i] for i in idx],
                                           None if greedy is None else [greedy[i] for i in idx])
                                for g, idx in sorted(groups.items())}
    return summary


# -----------------------------------------------------------------------------
# Evaluation loop


def evaluate(model, tokenizer, rows, *, n=16, temperature=0.8, top_p=0.95, max_new_tokens=3072,
             batch_size=8, seed=0, greedy=False, engine="eager", max_rows=None, thinking_block=False,
             on_records=None, grader="normal"):
    """
    Sample n completions a question with the solver prompt, plus one greedy completion if
    greedy, and grade them. Returns (summary from summarize(), records: one dict a completion
    {id, kind, index, text, finished, answer, correct}, `correct` the grader's verdict: "normal", the normal
    form's; "math-verify", math_verify_right's; "both", the normal form's, and math-verify's in
    `correct_math_verify`). batch_size counts questions a generate call;
    engine: "fast" samples with engine.generate, else sample.generate (the reference loop), with at most
    max_rows rows in flight; thinking_block: the chat template's (prompts.render_prompt).
    on_records: called with each generate call's records as soon as they are graded (to save them).
    """
    if not rows:
        raise ValueError("no questions to evaluate")
    prompts = [prompt_ids(tokenizer, *solver_messages(r), thinking_block) for r in rows]
    stops, generator = sample.stop_ids(model, tokenizer), torch.Generator(model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    records = []
    modes = [("sampled", n, temperature)] + ([("greedy", 1, 0.0)] if greedy else [])
    quiet = not scale.ranks()[1]  # the loop's other ranks
    total = len(rows) * sum(k for _, k, _ in modes)
    generate = fast.generate if engine == "fast" else sample.generate  # the caller's choice
    with tqdm(total=total, desc="eval", unit="completion", disable=quiet) as bar:
        for kind, k, temp in modes:
            for start in range(0, len(rows), batch_size):
                outs = generate(model, prompts[start : start + batch_size], max_new_tokens, n=k, temperature=temp,
                                top_p=top_p, stop_ids=stops, generator=generator, max_rows=max_rows,
                                progress=bar.update)
                graded = []
                for j, ids in enumerate(outs):  # prompt-major: the k samples of a question are adjacent
                    row, text = rows[start + j // k], tokenizer.decode(ids, skip_special_tokens=True)
                    done = sample.finished(ids, stops)
                    answer = answer_of(text, row, done)  # read once, for the record and its grade
                    verdicts = {"correct": is_right(answer, row)}
                    if grader != "normal":
                        name = "correct" if grader == "math-verify" else "correct_math_verify"
                        verdicts[name] = math_verify_right(text, row, answer)
                    graded.append(dict(id=row["id"], kind=kind, index=j % k, text=text, finished=done,
                                       answer=answer, **verdicts))
                records += graded
                if on_records:
                    on_records(graded)
    model.train(was_training)
    return summarize_records(rows, records, n), records


def summarize_records(rows, records, n, verdict="correct"):
    """summarize() over the questions whose n sampled records are all there (all of them after a whole
    evaluation, the finished ones after an interrupted one); greedy where every one of those has it.
    verdict: the records' field that says right or wrong (correct_math_verify: math-verify's, --grader both)."""
    sampled, greedy = defaultdict(list), {}
    for r in records:
        if r["kind"] == "greedy":
            greedy[r["id"]] = r
        else:
            sampled[r["id"]].append(r)
    done = [row for row in rows if len(sampled[row["id"]]) == n]
    if not done:
        return None
    has_greedy = bool(greedy) and all(row["id"] in greedy for row in done)
    return summarize(done, [[s[verdict] for s in sampled[row["id"]]] for row in done],
                     [[s["answer"] for s in sampled[row["id"]]] for row in done],
                     [greedy[row["id"]][verdict] for row in done] if has_greedy else None)


def evaluate_at_step(step, sampler, tokenizer, questions, args, rank, world, log_path):
    """The training loop's evaluation at its start, every --eval-every steps and its end: mean@k / maj@k /
    pass@k on the run's own questions (the paper's protocol: temperature 0.8, top-p 0.95), each of
    torchrun's ranks sampling its share, rank 0 logging them all to log_path."""
    if args.no_eval:
        return
    max_new = args.eval_max_new_tokens or args.max_new_tokens
    _, records = evaluate(sampler, tokenizer, questions[rank::world], n=args.eval_n, temperature=0.8,
                          top_p=0.95, max_new_tokens=max_new, batch_size=args.batch_size, seed=args.seed,
                          engine=args.engine, thinking_block=args.thinking_block,
                          max_rows=scale.max_rows(sampler, args.max_prompt_tokens + max_new, args, None))
    grades = [{k: r[k] for k in ("id", "kind", "answer", "correct")} for r in records]  # not the texts
    everyone = [r for part in scale.gather(grades, world) for r in part]
    if rank == 0:
        summary = summarize_records(questions, everyone, args.eval_n)
        log_line(log_path, {"step": step, "eval": {k: v for k, v in summary.items() if not k.startswith("by_")}})
        print(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float)))


def results_name(data, model):
    """<data>-<model> as a file name, from the model's whole id or path: two models never share one
    (Qwen/Qwen3-1.7B-Base -> math500-Qwen_Qwen3-1.7B-Base)."""
    return re.sub(r"[^\w.-]+", "_", f"{Path(data).stem}-{str(model).strip('/')}").strip("_")


def print_table(summary, beside=None):
    """The overall metrics, then one line a group; beside (--grader both: math-verify's metrics), each of its
    metrics next to the same one of summary, headed '<metric> mv'."""
    cols = [c for c in summary if not c.startswith("by_")]
    heads = [(c, s) for c in cols for s in ((0,) if beside is None or c == "questions" else (0, 1))]
    print(f"{'group':<34}" + "".join(f"{c + ' mv' * s:>11}" for c, s in heads))
    groups = lambda m: [("all", m)] + [(f"{key[3:]}={g}", x) for key in m if key.startswith("by_")
                                       for g, x in m[key].items()]
    for (name, m), (_, mv) in zip(groups(summary), groups(beside or summary)):
        print(f"{name[:33]:<34}" + "".join(f"{(m, mv)[s][c]:>11}" if c == "questions" else f"{(m, mv)[s][c]:>11.4f}"
                                           for c, s in heads))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model on a benchmark: mean@k, maj@k, pass@k, greedy.",
                                formatter_class=DefaultsHelp, allow_abbrev=False)
    # model
    p.add_argument("--model", default="smollm2", help="hub id, local folder, .gguf file, 'smollm2' or 'tiny'")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    # data
    p.add_argument("--data", default="math500", help=f"one of {', '.join([*FILES, 'arith'])}, or a .jsonl path")
    p.add_argument("--data-dir", default=None, help="folder of the benchmark files (default: $SELFHARMONY_DATA)")
    p.add_argument("--limit", type=number(int, 1), default=None,
                   help="evaluate only the first N questions (default: all)")
    p.add_argument("--arith-n", type=number(int, 1), default=16, help="arith: number of questions")
    p.add_argument("--arith-seed", type=int, default=0, help="arith: seed of the generated questions")
    p.add_argument("--arith-level", type=number(int, 1, 3), default=1, help="arith: 1 one-digit sums, 2 two-digit +/-, 3 two steps")
    # sampling
    p.add_argument("--n", type=number(int, 1), default=16, help="samples a question (the k of mean@k)")
    p.add_argument("--temperature", type=number(float, 0), default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=0.95, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=3072,
                   help="longest completion (the release's, and the training loop's evaluation's by default)")
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="questions a generate call (each sampled n times)")
    p.add_argument("--engine", default=None, choices=("eager", "fast"),
                   help="sampler (default: fast on cuda, eager on cpu)")
    p.add_argument("--max-rows", type=number(int, 1), default=None, help="rows in flight at most (default: a call's all)")
    p.add_argument("--thinking-block", action="store_true", help="enable_thinking=False in the chat template")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--greedy", action="store_true", help="also report greedy (temperature 0) accuracy")
    p.add_argument("--grader", default="normal", choices=GRADERS,
                   help="normal: the normal form's string match (which votes and rewards use); math-verify: its "
                        "parse and verify (pip install math-verify); both: the two side by side")
    # output
    p.add_argument("--out-dir", default="out/eval",
                   help="folder for <data>-<model>.json and .samples.jsonl (Ctrl-C keeps what was done)")
    args = p.parse_args(argv)
    print(vars(args))
    if args.grader != "normal" and importlib.util.find_spec("math_verify") is None:
        raise SystemExit(f"--grader {args.grader} needs the package math-verify: pip install math-verify")

    try:
        rows = load_benchmark(args.data, args.data_dir, n=args.arith_n, seed=args.arith_seed, level=args.arith_level)
    except (OSError, ValueError) as e:
        raise SystemExit(f"data: {e}")
    rows = rows[: args.limit] if args.limit else rows
    out = Path(args.out_dir)
    json_path = out / f"{results_name(args.data, args.model)}.json"
    samples_path = json_path.with_suffix(".samples.jsonl")
    if json_path.exists():  # the same name from another model (a_b and a/b): never overwrite its results
        try:
            previous = json.loads(json_path.read_text()).get("args", {}).get("model")
        except (ValueError, AttributeError):  # damaged (a write cut short before writes were atomic): no one's
            previous = None
        if previous not in (None, args.model):
            raise SystemExit(f"{json_path} holds the results of model {previous!r}: pass another --out-dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    engine = args.engine or ("fast" if device.startswith("cuda") else "eager")
    out.mkdir(parents=True, exist_ok=True)
    # the samples file is emptied below: an earlier run's metrics beside it would describe another run
    json_path.unlink(missing_ok=True)

    def write(summary, **extra):  # beside, then renamed in: a run killed while writing leaves the file whole
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps({"args": vars(args), **extra, **summary}, indent=2) + "\n")
        os.replace(tmp, json_path)

    # each completion is written as soon as its batch is graded: an interrupted run keeps them (from here
    # Ctrl-C is a KeyboardInterrupt again, which the evaluation answers below)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(samples_path, "w") as f:
        graded = []

        def save(batch):
            graded.extend(batch)
            f.writelines(json.dumps(rec) + "\n" for rec in batch)
            f.flush()
        try:
            summary, _ = evaluate(model, tokenizer, rows, n=args.n, temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                  greedy=args.greedy, engine=engine, max_rows=args.max_rows,
                                  thinking_block=args.thinking_block, on_records=save, grader=args.grader)
        except KeyboardInterrupt:
            partial = summarize_records(rows, graded, args.n)
            if partial is None:
                raise SystemExit(f"interrupted before any question was done; {samples_path} holds "
                                 f"{len(graded)} completions, and no metrics were written")
            write(graded_by(args.grader, partial, graded, rows, args.n), interrupted=True)
            raise SystemExit(f"interrupted: {partial['questions']} of {len(rows)} questions done, their metrics "
                             f"in {json_path} (marked interrupted)")
    results = graded_by(args.grader, summary, graded, rows, args.n)
    print_table(summary, results.get("math_verify"))  # --grader both: math-verify's metrics beside
    if args.grader == "both":
        print(f"the two graders decide {results['graders_disagree']} of {len(graded)} completions differently")
    write(results)
    print(f"wrote {json_path} and {samples_path}")
    return summary


def graded_by(grader, summary, records, rows, n):
    """The results to write: the grader's name and summary, and under --grader both math-verify's summary
    beside it and how many completions the two graders decide differently."""
    if grader != "both":
        return {"grader": grader, **summary}
    return {"grader": grader, **summary, "math_verify": summarize_records(rows, records, n, "correct_math_verify"),
            "graders_disagree": sum(r["correct"] != r["correct_math_verify"] for r in records)}


if __name__ == "__main__":
    main()
