"""hms.py: the pseudo-label selectors on examples worked out by hand, and the echo-chamber simulation."""
import time

import numpy as np
import pytest

from hms import (SELECTORS, _simulate, cross_select, explain, explanation_lines, harmonic_mean_select, hms_scores,
                 majority_vote, pooled_majority_vote, select_labels)


VIEW0 = ["9"] * 5 + ["7"] * 3


VIEW1 = ["8"] * 5 + ["7"] * 2 + ["9"]


def test_hms_picks_the_answer_both_views_share_where_mv_fails():
    # HM(7) = 2 (3/8)(2/8) / (5/8) = 3/10;  HM(9) = 2 (5/8)(1/8) / (6/8) = 5/24;  8 is absent from view 0
    assert hms_scores(VIEW0, VIEW1) == pytest.approx({"7": 3 / 10, "9": 5 / 24})
    assert harmonic_mean_select(VIEW0, VIEW1) == "7"
    assert majority_vote(VIEW0) == "9"
    assert pooled_majority_vote(VIEW0, VIEW1) == "9"  # 9: 6 votes, 8: 5, 7: 5
    assert cross_select(VIEW0, VIEW1) == ("8", "9")


def test_hms_scores_with_unequal_group_sizes():
    # a: p0 = 2/3, p1 = 1/6 -> 4/15;  b: p0 = 1/3, p1 = 5/6 -> 10/21
    assert hms_scores(["a", "a", "b"], ["a", "b", "b", "b", "b", "b"]) == pytest.approx({"a": 4 / 15, "b": 10 / 21})


def test_none_counts_in_the_denominator_but_never_wins():
    # p0(5) = 1/4, p1(5) = 2/4 -> HM = 2 (1/8) / (3/4) = 1/3
    assert hms_scores(["5", None, None, None], ["5", "5", "6", "6"]) == pytest.approx({"5": 1 / 3})
    assert majority_vote([None, None, "3"]) == "3"


def test_hms_ties():
    # b: (c0, c1) = (3, 6), a: (4, 4) with G = 16: both HM = 1/4; b has the larger p0 + p1 (9/16 > 8/16)
    a0 = ["b"] * 3 + ["a"] * 4 + [None] * 9
    a1 = ["b"] * 6 + ["a"] * 4 + [None] * 6
    assert hms_scores(a0, a1) == {"a": 0.25, "b": 0.25}
    assert harmonic_mean_select(a0, a1) == "b"
    assert harmonic_mean_select(["y", "x"], ["x", "y"]) == "x"  # a full tie: the smaller string
    assert harmonic_mean_select(["21", "12"], ["12", "21"]) == "12"  # compared from the first character
    assert majority_vote(["b", "a", "b", "a"]) == "a"
    assert majority_vote(["21", "12"]) == "12"


def test_no_overlap_and_all_none():
    assert harmonic_mean_select(["1", "1"], ["2", "2"]) is None
    assert hms_scores(["1", "1"], ["2", "2"]) == {}
    none = [None] * 4
    assert harmonic_mean_select(none, none) is None
    assert majority_vote(none) is None and pooled_majority_vote(none, none) is None
    assert cross_select(none, none) == (None, None)
    assert [select_labels(s, none, none, gold="1") for s in SELECTORS] == [(None, None)] * 5 + [("1", "1")]


def test_select_labels():
    assert SELECTORS == ("hms", "mv", "mv0", "mv2", "cross", "gt")
    assert select_labels("hms", VIEW0, VIEW1) == ("7", "7")
    assert select_labels("mv", VIEW0, VIEW1) == ("9", "8")  # the two views vote differently
    assert select_labels("mv0", VIEW0, VIEW1) == ("9", "9")
    assert select_labels("mv2", ["1", "1", "2"], ["2", "2", "3"]) == ("2", "2")
    assert select_labels("cross", VIEW0, VIEW1) == ("8", "9")
    assert select_labels("gt", VIEW0, VIEW1, gold=r"\dfrac12") == ("1/2", "1/2")
    with pytest.raises(ValueError, match="needs the gold"):
        select_labels("gt", VIEW0, VIEW1)
    with pytest.raises(ValueError, match="hms, mv, mv0, mv2, cross, gt"):
        select_labels("vote", VIEW0, VIEW1)


def test_simulation_shows_the_echo_chamber_and_its_limit():
    acc, _ = _simulate(np.random.default_rng(0), G=32, n_questions=200, shared_mistake=False)
    assert acc[0] < 0.2 and acc[2] > 0.8  # MV locks onto the wrong answer; HMS recovers
    acc, _ = _simulate(np.random.default_rng(0), G=32, n_questions=200, shared_mistake=True)
    assert acc[2] < 0.2  # the same mistake in both views: HMS cannot help


def test_5000_distinct_answers_a_view_are_selected_fast():
    answers0, answers1 = [str(i) for i in range(5000)], [str(i) for i in range(4999, 9999)]
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        labels = [select_labels(s, answers0, answers1, gold="7") for s in SELECTORS]
        best = min(best, time.perf_counter() - start)
    assert labels[0] == ("4999", "4999") and best < 0.05 * len(SELECTORS)


def test_explain_draws_the_table_of_one_question_by_hand():
    # view 0 votes 5, view 1 gives 3 most often; only 3 is in both views, so HMS takes it; the gold is 7
    answers0, answers1 = ["5", "5", None, "3"], ["3", "3", None, "7"]
    labels = {s: select_labels(s, answers0, answers1, gold="7") for s in SELECTORS}
    table = explain(answers0, answers1, labels, gold="7", finished1=[True, True, False, True])
    rows = [(r["answer"], r["n0"], r["n1"], r["p0"], r["p1"], r["hm"], r["labels"]) for r in table["candidates"]]
    assert rows == [("3", 1, 2, 0.25, 0.5, pytest.approx(1 / 3), ["hms", "mv:1", "mv2", "cross:0"]),  # 2/4 1/2 / 3/4
                    ("5", 2, 0, 0.5, 0.0, None, ["mv:0", "mv0", "cross:1"]),
                    ("7", 0, 1, 0.0, 0.25, None, ["gt", "gold"])]
    assert table["none"] == [1, 0] and table["cut_off"] == [0, 1]  # view 0's unanswered one finished
    assert table["why"] == ("the vote's answer 5 is frequent in view 0 only (p0 0.50, p1 0): HMS takes 3, which "
                            "both views give (p0 0.25, p1 0.50, HM 0.33)")
    lines = explanation_lines(table)
    assert lines[1].split() == ["3", "1", "2", "0.25", "0.50", "0.33", "hms", "mv:1", "mv2", "cross:0"]
    assert lines[2].split() == ["5", "2", "0", "0.50", "0.00", "-", "mv:0", "mv0", "cross:1"]
    assert lines[4].split() == ["none", "1", "0"] and lines[5].split() == ["cut", "off", "0", "1"]
    # the vote's answer in both views, but rarer in view 1: HM(5) = 2 (1/2)(1/4) / (3/4) = 1/3 < HM(3) = 3/8
    answers0, answers1 = ["5", "5", "3", "7"], ["5", "3", "3", "3"]
    labels = {s: select_labels(s, answers0, answers1) for s in ("hms", "mv0")}
    assert explain(answers0, answers1, labels)["why"] == (
        "the vote's answer 5 is more frequent in view 0 (p0 0.50 against 0.25) but rarer in view 1 (0.25 against "
        "0.75): its harmonic mean 0.33 is below 3's 0.38")
    # a tie in view 0, which the vote breaks by the smaller string
    answers0, answers1 = ["2", "8", "5", "6"], ["8", "9", "9", "7"]
    labels = {s: select_labels(s, answers0, answers1) for s in ("hms", "mv0")}
    assert explain(answers0, answers1, labels)["why"] == (
        "view 0 gives 2 and 8 as often (p0 0.25): the vote takes the smaller, 2; view 1 never gives it, and HMS "
        "takes 8 (p1 0.25)")
    # a tie of harmonic means, 3/8 each: HMS takes the smaller answer
    answers0, answers1 = ["5", "5", "5", "3"], ["5", "3", "3", "3"]
    labels = {s: select_labels(s, answers0, answers1) for s in ("hms", "mv0")}
    assert explain(answers0, answers1, labels)["why"].endswith("ties 3's, and a tie goes to the larger p0 + p1, "
                                                               "then to the smaller answer")
