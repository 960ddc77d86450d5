"""Tests for rewards.py: the format score, the JSD diversity penalty and the fused reward, on
values worked out by hand; and the fact that P_div cancels under group normalisation."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import grpo
from rewards import div_penalty, format_score, fused_rewards, jsd, rewritten_problem, solve_rewards


FULL = ("STRATEGY: make it concrete\nREWRITTEN PROBLEM: Ann has 3 apples and gets 4 more. How many?\n"
        "SOLUTION: 3 + 4 = 7, so \\boxed{7}.")


MARKDOWN = ("**STRATEGY:** work backward\n\n## Rewritten Problem:\nA train has 3 cars and adds 4.\n\n"
            "**solution**: 3 + 4 = \\boxed{7}")


ROOT = Path(__file__).resolve().parents[1]


PLACEHOLDERS = "STRATEGY: [...]\nREWRITTEN PROBLEM: <rewritten problem>\nSOLUTION: 3 + 4 = \\boxed{7}"


WRONG = "STRATEGY: shift domain\nREWRITTEN PROBLEM: Ann has 3 apples and gets 4 more.\nSOLUTION: \\boxed{12}"


def test_format_score():
    assert format_score(FULL) == 1.0
    assert format_score(MARKDOWN) == 1.0
    assert format_score(PLACEHOLDERS) == pytest.approx(1 / 3)
    assert format_score(FULL.replace("\\boxed{7}", "7")) == pytest.approx(2 / 3)  # no box in the solution
    assert format_score("STRATEGY:\nREWRITTEN PROBLEM: x + 1 = 2?\nSOLUTION: \\boxed{1}") == pytest.approx(2 / 3)
    assert format_score("3 + 4 = \\boxed{7}") == 0.0
    assert format_score("") == 0.0
    # a header written twice: its first section counts (a model that echoes "SOLUTION:" at its end keeps its score)
    assert format_score(FULL + "\nSOLUTION:") == 1.0
    # a header with its words apart by several spaces or a tab is that header; a placeholder in bold is still one
    assert format_score("STRATEGY: a\nREWRITTEN \t PROBLEM: b?\nSOLUTION: \\boxed{1}") == 1.0
    bold = "STRATEGY: a\nREWRITTEN PROBLEM: **[rewritten problem]**\nSOLUTION: \\boxed{1}"
    assert format_score(bold) == pytest.approx(2 / 3) and rewritten_problem(bold) is None
    # the prompt's layout copied back with a period after each placeholder, or in backticks: placeholders still
    copied = ("STRATEGY: <the strategy you chose, one line>.\nREWRITTEN PROBLEM: <the problem, rewritten>.\n"
              "SOLUTION: <step-by-step solution> \\boxed{1}")
    assert format_score(copied) == pytest.approx(1 / 3)  # the solution holds a box: it counts
    assert rewritten_problem("REWRITTEN PROBLEM: `[the problem]`\nSOLUTION: 1") is None
    assert rewritten_problem("REWRITTEN PROBLEM: Is [0, 1] closed.\nSOLUTION: 1") == "Is [0, 1] closed."


def test_rewritten_problem():
    assert rewritten_problem(FULL) == "Ann has 3 apples and gets 4 more. How many?"
    assert rewritten_problem(MARKDOWN) == "A train has 3 cars and adds 4."
    assert rewritten_problem(PLACEHOLDERS) is None
    assert rewritten_problem("no sections at all") is None
    assert rewritten_problem(FULL + "\nREWRITTEN PROBLEM: another") == "Ann has 3 apples and gets 4 more. How many?"


def test_jsd():
    p = {"a": 0.25, "b": 0.75}
    assert jsd(p, dict(p)) == pytest.approx(0.0, abs=1e-12)
    assert jsd({"a": 1.0}, {"b": 1.0}) == pytest.approx(math.log(2), abs=1e-9)
    # p = {a: 1}, q = {a: 1/2, b: 1/2}, m = {a: 3/4, b: 1/4}:
    # KL(p||m) = ln(4/3), KL(q||m) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3) -> JSD = 3/4 ln(4/3)
    expected = 0.75 * math.log(4 / 3)
    assert jsd({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(expected, abs=1e-9)
    assert jsd({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(expected, abs=1e-9)
    # two distributions equal but for their last bits: the sum's rounding (-5.9e-17 here) is no negative divergence
    p, q = {"a": 0.531615293907025, "b": 0.468384706092975}, {"a": 0.5316152939070256, "b": 0.46838470609297456}
    assert jsd(p, q) == 0.0


def test_div_penalty():
    assert div_penalty(["7", "7", "12", "12"], ["12", "7", "12", "7"]) == pytest.approx(1.0)
    assert div_penalty(["7", "7"], ["12", "3"]) == pytest.approx(0.0, abs=1e-9)
    # the middle case of test_jsd: 1 - (3/4) log2(4/3) = 0.688722...
    assert div_penalty(["a", "a"], ["a", "b"]) == pytest.approx(1 - 0.75 * math.log2(4 / 3))
    assert div_penalty(["a", None, None], ["a", "a"]) == pytest.approx(1.0)  # None answers are dropped
    assert div_penalty([None, None], ["a", "a"]) == 0.0  # an empty view: no evidence of copying
    rng = np.random.default_rng(0)
    for _ in range(200):
        a0 = [str(x) for x in rng.integers(0, 4, size=rng.integers(1, 9))]
        a1 = [str(x) for x in rng.integers(0, 4, size=rng.integers(1, 9))]
        assert 0.0 <= div_penalty(a0, a1) <= 1.0


def test_solve_rewards():
    assert solve_rewards(["7", "8", None, "7"], "7") == [1.0, 0.0, 0.0, 1.0]
    assert solve_rewards(["7", None], None) == [0.0, 0.0]


# P_format: FULL 0, WRONG 0 (wrong answer), PLACEHOLDERS 2/3, bare answer 1
TEXTS1 = [FULL, WRONG, PLACEHOLDERS, "3 + 4 = \\boxed{7}"]


ANSWERS1 = ["7", "12", "7", "7"]


SAME0 = ["7", "12", "7", "7"]  # the same distribution as view 1: P_div = 1


def test_fused_rewards_gated():
    # (1 - 0.1 P_format) (1 - 0.1 * 1) 1[a' = y*]
    expected = [0.9, 0.0, (1 - 0.1 * 2 / 3) * 0.9, 0.9 * 0.9]
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, "7") == pytest.approx(expected)
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, "7", w_format=0, w_div=0) == [1.0, 0.0, 1.0, 1.0]
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, "12") == pytest.approx([0.0, 0.9, 0.0, 0.0])


def test_fused_rewards_additive():
    # 1[a' = y*] + 0.1 (1 - P_format) + 0.1 (1 - 1)
    expected = [1.1, 0.1, 1 + 0.1 / 3, 1.0]
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, "7", mode="additive") == pytest.approx(expected)


def test_fused_rewards_without_label_or_with_bad_arguments():
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, None) == [0.0] * 4
    assert fused_rewards(TEXTS1, ANSWERS1, SAME0, None, mode="additive") == [0.0] * 4
    with pytest.raises(ValueError, match="gated, additive"):
        fused_rewards(TEXTS1, ANSWERS1, SAME0, "7", mode="multiplicative")
    with pytest.raises(ValueError):
        fused_rewards(TEXTS1[:2], ANSWERS1, SAME0, "7")


def test_div_penalty_cancels_under_group_normalisation():
    view0 = ["7", "7", "12", "12"]  # p0 = (1/2, 1/2) vs p1 = (3/4, 1/4): 0 < P_div < 1
    p_div = div_penalty(view0, ANSWERS1)
    assert 0.0 < p_div < 1.0
    gated_off, gated_on = (np.array(fused_rewards(TEXTS1, ANSWERS1, view0, "7", w_div=w)) for w in (0.0, 0.1))
    np.testing.assert_allclose(gated_on, (1 - 0.1 * p_div) * gated_off)
    centred = [r - r.mean() for r in (gated_off, gated_on)]
    np.testing.assert_allclose(centred[0] / centred[0].std(), centred[1] / centred[1].std())  # cancels
    assert not np.allclose(centred[0], centred[1])  # acts only without the std
    add_off, add_on = (np.array(fused_rewards(TEXTS1, ANSWERS1, view0, "7", w_div=w, mode="additive"))
                       for w in (0.0, 0.1))
    np.testing.assert_allclose(add_on - add_off, 0.1 * (1 - p_div))  # a shift...
    np.testing.assert_allclose(add_on - add_on.mean(), add_off - add_off.mean(), atol=1e-12)  # ...the mean removes



def test_one_missing_section_in_an_otherwise_flat_group_is_the_step_s_strongest_signal():
    # 16 fused rollouts all reach the label; one lacks its STRATEGY line (P_format = 1/3). Rewards: 15 at c,
    # one at c (1 - w_f / 3). Centred: +d/16 and -15 d/16 (d = c w_f / 3); unbiased std = d / 4, so the
    # advantages are +0.25 and -3.75 whatever w_f > 0 is. Without the penalty (the release) the group is flat.
    full = "STRATEGY: a story\nREWRITTEN PROBLEM: Ann has 3 and 4.\nSOLUTION: 3 + 4 = \\boxed{7}"
    texts = [full] * 15 + [full.split("\n", 1)[1]]
    assert format_score(texts[-1]) == pytest.approx(2 / 3)
    view0 = ["7"] * 12 + ["5"] * 4
    for w_format in (0.1, 0.01):
        r = fused_rewards(texts, ["7"] * 16, view0, "7", w_format=w_format)
        A = grpo.group_advantages(r, 16).tolist()
        # (up to the eps beside the std, ~1e-3 of it at w_f = 0.01, where the std is ~8e-4)
        assert A[:15] == pytest.approx([0.25] * 15, rel=2e-3) and A[15] == pytest.approx(-3.75, rel=2e-3)
    flat = fused_rewards(texts, ["7"] * 16, view0, "7", w_format=0.0)
    assert grpo.group_advantages(flat, 16).tolist() == [0.0] * 16

ADVERSARIAL = {
    "no box": "SOLUTION: no box here, just words " * 1000,
    "unbalanced": "STRATEGY: x\nSOLUTION: \\boxed{" + "{" * 5000,
    "nested": "SOLUTION: " + r"\boxed{" * 5000 + "5" + "}" * 5000,
    "1 MB": "STRATEGY: a {b} c\nREWRITTEN PROBLEM: " + "a {b} \\frac{1}{2} " * 60_000 + "\nSOLUTION: \\boxed{1}",
    "10,000 {": "{" * 10_000,
    "1 MB of stars": "*" * 1_000_000,
    "4,990 nested braces": "STRATEGY: x\nSOLUTION: \\boxed{" + "{" * 4990 + "5" + "}" * 4990 + "}",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_format_score_on_adversarial_text_is_fast(name):
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        score = format_score(ADVERSARIAL[name])
        best = min(best, time.perf_counter() - start)
    assert 0.0 <= score <= 1.0 and best < 0.05


def test_p_div_is_the_same_number_in_every_process():
    # views whose JSD terms, summed in a set's order, ended in other last bits under other string hashings
    a0, a1 = ["8", "36", "4", "16", "7", "31", "28", "30"], ["24", "13", "6", "31", "1", "24", "27", "38"]
    code = f"import rewards; print(repr(rewards.div_penalty({a0!r}, {a1!r})))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT)}).stdout
            for seed in range(6)}
    assert len(outs) == 1 and float(outs.pop()) == pytest.approx(div_penalty(a0, a1), abs=0)


def test_p_div_of_5000_distinct_answers_is_fast():
    # each view's distribution by one count of its answers (a list's count of each answer took 1.3 s here)
    answers0, answers1 = [str(i) for i in range(5000)], [str(i) for i in range(2500, 7500)]
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        p_div = div_penalty(answers0, answers1)
        rewards = fused_rewards(["SOLUTION: \\boxed{1}"] * 5000, answers1, answers0, "2600")
        best = min(best, time.perf_counter() - start)
    # half of each view's mass on answers the other never gives: JSD = ln 2 / 2, P_div = 1/2
    assert p_div == pytest.approx(0.5) and sum(rewards) > 0 and best < 0.05 * 2  # two calls
