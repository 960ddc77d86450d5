"""answers.py: answer extraction and the normal form, on real benchmark answers and adversarial text."""
import json
import re
import time
from pathlib import Path

import pytest

from answers import MAX_DEPTH, answer_of, extract_answer, extract_choice, gold_answer, normalize_answer
from hms import harmonic_mean_select, majority_vote


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_jsonl(name):
    path = DATA / name
    assert path.is_file(), f"missing data file {path}: tests read ../shared/data next to the repo"
    return [json.loads(line) for line in path.read_text().splitlines()]


# (gold answer as it appears in the data, an equivalent way to write it)
EQUAL = [
    # MATH500
    (r"\frac{1}{2}", "0.5"), (r"\frac{1}{2}", "1/2"), (r"\frac{1}{2}", r"\dfrac12"),
    (r"\frac{1}{2}", r"\tfrac{1}{2}"), (r"\dfrac{17}{50}", "0.34"), (r"\dfrac{33}{100}", r"\frac{33}{100}"),
    (r"\frac 34", "0.75"), (r"\frac 59", r"\frac{5}{9}"), (r"\frac14", ".25"), (r"\frac43", "4/3"),
    (r"\frac9{19}", r"\dfrac{9}{19}"), (r"\frac{3840}{289}", r"\tfrac{3840}{289}"), (r"\frac65", "1.2"),
    (r"-\frac{24}{25}", "-0.96"), (r"-\frac{3}{8}", r"\frac{-3}{8}"), (r"-\frac{35}{9}", "-35/9"),
    (r"10,\!080", "10080"), (r"11,\! 111,\! 111,\! 100", "11111111100"), ("58,500", "58500"),
    (r"\$32,\!348", "32348"), (r"\$32,\!348", "$32,348"), (r"\$18.90", "18.9"), (r"\$36", "36"),
    (r"106^\circ", "106"), (r"120^\circ", r"120^{\circ}"), (r"90^\circ", r"90\text{ degrees}"),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"), (r"15\mbox{ cm}^2", "15"),
    (r"864 \mbox{ inches}^2", "864"), (r"5.4 \text{ cents}", "5.4"), (r"5.4 \text{ cents}", r"\frac{27}{5}"),
    (r"5.4 \text{ cents}", r"5.4 \text{ cents}."), ("18", r"18 \text{ km/h}"), ("18", r"18 \text{ people's}"),
    ("x=5", "5"), ("x=5", "x = 5"), ("(-2,1)", "(a,b) = (-2,1)"), ("(6,31,-1)", "(p, q, r) = (6, 31, -1)"), (r"x \in [-2,7]", "[-2, 7]"), ("y = -2x", "-2x"), ("y = 2x + 3", "2x+3"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"\left( \frac{3}{2}, -13 \right)", "(1.5,-13)"),
    (r"\left(\frac{3}{5},\frac{8}{3}\right]", r"(0.6, \frac83]"), (r"(-\infty, 0]", r"\left(-\infty,0\right]"),
    (r"\text{east}", "East"), (r"\text{even}", r"\textbf{Even}"), (r"\text{Evelyn}", "evelyn"),
    (r"\text{(B)}", "B"), (r"\text{(C)}", "(C)"), (r"\text{(C)}", r"\text{(C) } 12"), (r"\text{(E)}", r"(E)\ \frac{1}{2}"), (r"\text{Evelyn}", "Evelyn"), (r"\text{east}", "east"),
    (r"11\sqrt2", r"11\sqrt{2}"), (r"137 \frac{1}{2}", "137.5"), (r"1\frac{4}{5}", "1.8"),
    ("4210_{5}", "4210_5"), ("2516_8", "2516_{8}"), (".35625", "0.35625"), (".0000672", r"\frac{42}{625000}"),
    ("0.15", r"\frac{3}{20}"), ("1.25", r"\frac54"), ("3.21", "3.210"), ("4.5", r"\frac92"),
    ("326.5", r"\frac{653}{2}"), ("3, 5, 7", "3,5,7"), ("3, 5, 7", "7, 3, 5"), ("1,-2", "-2, 1"),
    ("-2,1", "x = 1, -2"), (r"-\frac{\pi}{6}", r"-\pi/6"), (r"\frac{3\sqrt{3}}{4}", r"3\sqrt3/4"),
    (r"\frac{\sqrt{3}}{3}", r"\sqrt{3}/3"), (r"1 \pm \sqrt{19}", r"1-\sqrt{19}, 1+\sqrt{19}"),
    (r"3 \pm 2 \sqrt{2}", r"x = 3 + 2\sqrt2, 3 - 2\sqrt2"), ("-2 + 7i", "-2+7i"),
    (r"3 \pm 2 \sqrt{2}", r"3\pm2\sqrt{2}"), (r"\frac{\sqrt{3}}{3}", r"\dfrac{\sqrt{3}}{3}"), (r"12\pi", r"12 \pi"),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", r"\begin{pmatrix}\frac15\\-\frac{18}{5}\end{pmatrix}"),
    ("10", "10.0"), ("0", "-0"), (r"\pi", r"\pi."),
    # GSM8K: the clean answer and the raw one with thousands commas
    ("2125", "2,125"), ("114200", "114,200"), ("1450000", "1,450,000"), ("18", "$18"), ("18", "18.00"),
    ("18", "18 dollars"), ("2125", r"\text{2125 square feet}"), ("18", "x = 18 cm^2"),
    ("18", "18 dollars per day"), ("18", "18 Dollars"), ("18", "18 USD"),
    # AIME 2024 (leading zeros) and AMC (float strings)
    ("25", "025"), ("73", "073"), ("80", "080"), ("809", "809."), ("142", "142.0"), ("-4", "-4.0"), ("0", "0.0"),
    # a set in braces is its solutions in any order, as a bare list; each solution may name the variable
    (r"\{1\pm\sqrt{5},-2\}", r"1+\sqrt{5},1-\sqrt{5},-2"),
    (r"\{1\pm\sqrt{5},-2\}", r"\left\{-2, 1 \pm \sqrt5\right\}"),
    ("1,-2", "x = 1, x = -2"), ("1,-2", r"x \in \{-2, 1\}"),
    # a fraction's sign before it or on its top; a whole number over a symbol written with a slash
    (r"-\frac{\pi}{6}", r"\frac{-\pi}{6}"), (r"\frac{20000}{\pi}", r"20000/\pi"),
    # a \text wrapper with braces inside, or around the whole answer with its unit; a name before a \text answer
    (r"\frac{14}{3}", r"\mathbf{\frac{14}{3}}"), ("4210_{5}", r"\text{4210_{5}}"),
    (r"15\mbox{ cm}^2", r"\mathbf{15\mbox{ cm}^2}"),
    (r"\text{Evelyn}", r"x = \text{Evelyn}"), (r"\text{(C)}", r"\textbf{\text{(C)}}"),
    # an interval's end written +\infty
    (r"(2,\infty)", r"(2, +\infty)"), (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,+\infty)"),
]


# (gold answer as it appears in the data, a different answer that must stay different)
DIFFERENT = [
    (r"\sqrt{51}", "51"), (r"11\sqrt2", "11"), (r"11\sqrt2", "112"), (r"2\sqrt{5}", "2"),
    ("(-1,6)", "(6,-1)"), ("(2,4)", "(4,2)"), ("-5", "5"), ("-2", "2"), ("(3,4]", "(3,4)"),
    (r"(-\infty, 0]", r"(-\infty, 0)"), (r"(2,\infty)", r"[2,\infty)"), ("(a+5)(b+2)", "(a+5)(b-2)"),
    (r"\frac{1}{2}", r"\frac{2}{1}"), (r"\frac{1}{2}", "2"), ("0.15", "0.015"), ("3.21", "321"),
    (r"\frac{3}{56}", r"\frac{56}{3}"), (r"-\frac{\pi}{6}", r"\frac{\pi}{6}"), (r"12\pi", "12"),
    ("2k", "2k+2"), ("x^3+3x-6", "x^3+3x+6"), (r"\text{(B)}", r"\text{(C)}"), (r"\text{even}", "odd"),
    ("204_5", "204"), ("4210_{5}", "4210_6"), (r"90^\circ", "9"), ("1 - 12i", "1 + 12i"), ("6 - 5i", "6 - 5"),
    (r"\$18.90", "18.09"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix} -1 & 0 \\ 0 & 1 \end{pmatrix}"),
    ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z - 4 = 0"), ("3R^2", "3R"), (r"8 \pi", "8"),
    (r"\frac{20000}{\pi}", "20000"), (r"\{1\pm\sqrt{5},-2\}", r"\{1\pm\sqrt{5},2\}"),
    (r"137 \frac{1}{2}", r"\frac{137}{2}"), (r"1\frac{4}{5}", r"\frac{4}{5}"),
    ("18", "81"), ("2125", "212.5"), ("25", "0.25"), ("-4", "4"), ("58,500", "58.5"), ("1,-2", "1-2"),
    (r"-\frac{\pi}{6}", r"\pi/6"), (r"\frac{3\sqrt{3}}{4}", r"3\sqrt3/5"), ("1,-2", "(1,-2)"),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}"), ("18", "18 and 19"), ("18", "18 k"), (r"\text{(B)}", "(B),(C)"),
    (r"\text{(B)}", "(B)(C)"),
    ("1,-2", "a = 1, b = -2"),  # two variables named: not the set {1, -2}
]


def test_pair_tables_use_real_answers():
    known = set()
    for name in ("math500.jsonl", "gsm8k.jsonl", "aime24.jsonl", "amc.jsonl"):
        for row in read_jsonl(name):
            known.update({row["answer"], row.get("answer_raw", row["answer"])})
    assert len(EQUAL) + len(DIFFERENT) >= 60
    assert [gold for gold, _ in EQUAL + DIFFERENT if gold not in known] == []


@pytest.mark.parametrize("gold, other", EQUAL)
def test_equivalent_answers_normalise_equal(gold, other):
    assert normalize_answer(gold) == normalize_answer(other)


@pytest.mark.parametrize("gold, other", DIFFERENT)
def test_different_answers_stay_different(gold, other):
    assert normalize_answer(gold) != normalize_answer(other)


def test_canonical_numeric_form():
    # integers as integers, other rationals as reduced p/q with the sign in front
    assert [normalize_answer(s) for s in ["025", "5.0", "-0.50", r"\frac{6}{4}", r"-\dfrac{3}{8}", "1,000"]] == \
        ["25", "5", "-1/2", "3/2", "-3/8", "1000"]
    assert normalize_answer("(1,2)") == "(1,2)" and normalize_answer("1, 2") == "1,2"  # commas of a tuple stay
    # no number over 0, and no mixed number whose fraction is 1 or more: left as written
    assert [normalize_answer(s) for s in ["1/0", r"\frac{1}{0}", r"2\frac{3}{3}", r"2\frac{3}{2}", r"1\frac{1}{2}"]] == \
        ["1/0", r"\frac{1}{0}", r"2\frac{3}{3}", r"2\frac{3}{2}", "3/2"]
    # a mixed number written with a space is one too, not the whole number run into the fraction's top
    assert [normalize_answer(s) for s in ["2 1/2", "-137 1/2", "1 1/2 cups", "(1 1/2, 3)", "2 3/2"]] == \
        ["5/2", "-275/2", "3/2", "(3/2,3)", r"2\frac{3}{2}"]
    assert normalize_answer("2 1/2") != normalize_answer("21/2")
    # a bare list is a set of solutions: one order; inside brackets the order stays
    assert normalize_answer("2, 1/2, -1") == "-1,1/2,2" and normalize_answer("(2, 1), 0") == "(2,1),0"
    assert normalize_answer("[3,1)") == "[3,1)"
    # a set in braces is one (\{2, 1\}: 1 and 2); a union of two is not
    assert normalize_answer(r"\{2, 1\}") == "1,2" and normalize_answer(r"\{(2, 1), 0\}") == "(2,1),0"
    assert normalize_answer(r"\{2\} \cup \{1\}") == r"\{2\}\cup\{1\}"
    # the empty set is an answer, not nothing, under any of its names
    assert normalize_answer(r"\{\}") == normalize_answer(r"\{ \}") == normalize_answer(r"\varnothing") == r"\emptyset"
    assert normalize_answer("1+\\infty") != normalize_answer("1\\infty")  # a sum keeps its plus
    assert normalize_answer("3 PM") != normalize_answer("3 AM")  # two capitals are no unit word
    # a word's case goes, a segment's or a triangle's name keeps it: AB is not ab, nor ABC abc
    assert [normalize_answer(s) for s in ["Evelyn", r"\text{East}", "AB", "ABC", "Ab"]] == \
        ["evelyn", "east", "AB", "ABC", "Ab"]
    # a sign leaves a fraction's top of one term only; a slash binds a number to the symbol after it, not 2x
    assert normalize_answer(r"\frac{-x-1}{y}") != normalize_answer(r"-\frac{x-1}{y}")
    assert normalize_answer("1/2x") != normalize_answer(r"\frac{1}{2x}")
    # \pm with nothing before it: the value and its negative; the variable named again goes, another stays
    assert normalize_answer(r"\pm\sqrt{3}") == normalize_answer(r"x = \sqrt3, -\sqrt3") \
        == r"-\sqrt{3},\sqrt{3}"
    assert normalize_answer("x_1 = 3, x_1 = 4") == "3,4" and normalize_answer("x_1 = 3, x_2 = 4") == "x_1=3,x_2=4"


# answers that the normal form merged, the dangerous way (a wrong answer rewarded, two candidates' votes
# pooled), each with the other it was merged with
KEPT_APART = [
    ("7\n2/3", "23/3"),  # a whole number and a fraction on lines of their own are no mixed number
    ("7\n2/3", "72/3"),
    ("0,250", "250"),  # a leading 0, is no thousands separator
    ("(a+b)+3", "(a+b)3"),  # a plus after a closing bracket is a sum, not a sign
    (r"\sin^2(x)+1", r"\sin^2(x)1"),
    ("[1,2]+3", "[1,2]3"),
]
# equal answers that it split, a case of each way a model writes them
BROUGHT_TOGETHER = [
    ("g(t) = t^2 - 1", "t^2 - 1"), ("f(2) = 5", "5"), ("h(x, y) = x + y", "x+y"),  # a function's name
    ("|PQ| = 7", "7"), ("P:Q = 3:4", "3:4"),  # a length's or a ratio's name
    ("1; 2", "1, 2"), ("-3; 4; 5", "5, -3, 4"),  # semicolons separate a list
    ("1, 1, 2", "1, 2"), ("x = 3, x = 3", "3"),  # a solution written twice is one
    ("5,", "5"), ("$1, 2,$", "1, 2"),  # a trailing comma inside the math
    ("(2/5)", "2/5"), (r"(\frac{1}{2})", "0.5"), ("(x+1)", "x+1"),  # one value in parentheses
    (r"\\frac{1}{2}", "1/2"), (r"2\\sqrt{3}", r"2\sqrt3"), (r"\\pi", r"\pi"),  # a backslash doubled by escaping
    (r"\\left(\\frac{1}{5},\\frac{1}{6}\\right)", "(1/5, 1/6)"),
    ("4or6", "4, 6"), (r"4\text{or}6", "4 or 6"),  # "or" with no spaces
    ("12days", "12"), ("5cm", "5 cm"), ("3hours.", "3"),  # a unit glued to the number
    ("x = 1, y = 2", "y = 2, x = 1"), ("a = 1, b = 2, c = 3", "c = 3, a = 1, b = 2"),  # names that differ stay
]


@pytest.mark.parametrize("a, b", KEPT_APART)
def test_answers_the_normal_form_merged_stay_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


@pytest.mark.parametrize("a, b", BROUGHT_TOGETHER)
def test_equal_answers_the_normal_form_split_are_one(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_what_the_new_rules_leave_alone():
    # a matrix's rows and an interval keep their commas and brackets; 2pi, 3x and ab are no units; a tuple of
    # names is not a list of named entries; a single value in brackets of another kind keeps them
    assert normalize_answer(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}") == r"\begin{pmatrix}1\\2\end{pmatrix}"
    # a row break before a command is no doubled backslash: the row stays a row
    assert normalize_answer(r"\begin{pmatrix}1\\\frac12\end{pmatrix}") == r"\begin{pmatrix}1\\1/2\end{pmatrix}"
    assert [normalize_answer(s) for s in ("(1, 2)", "[3, 4)", "2pi", "3x", "5ab", "[5]")] == \
        ["(1,2)", "[3,4)", "2pi", "3x", "5ab", "[5]"]
    assert normalize_answer("(a, b) = (1, 2)") == "(1,2)" and normalize_answer("1,000") == "1000"
    assert normalize_answer("(a)(b)") == "(a)(b)" and normalize_answer("(2/5), 1") == "(2/5),1"


def test_thousands_braces_and_matrix_environments():
    # MATH writes 10{,}080; models write 10080, 10,080 or bmatrix for the same vector
    assert normalize_answer("10{,}080") == normalize_answer("10080") == normalize_answer("10,080") == "10080"
    assert normalize_answer("1{,}000{,}000") == "1000000"
    assert normalize_answer("(10{,}080, 5)") == "(10080,5)"  # inside a tuple too
    assert normalize_answer("(1{,}2)") != normalize_answer("12")  # not three digits: no separator
    column = r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"
    for env in ("bmatrix", "matrix"):
        assert normalize_answer(column.replace("pmatrix", env)) == normalize_answer(column)
    assert normalize_answer(column.replace("pmatrix", "vmatrix")) != normalize_answer(column)  # a determinant
    # a normal form, not algebra: equal values written differently stay apart
    for a, b in [("a+b", "b+a"), (r"\sqrt8", r"2\sqrt2"), (r"\frac{\sqrt3}{3}", r"\frac{1}{\sqrt3}")]:
        assert normalize_answer(a) != normalize_answer(b)


def test_unbraced_arguments_and_braces_around_the_whole():
    # an argument may be a command (\frac\pi2), taken whole: \frac\pi{2} is not \frac{\p}{i}{2}
    same = [(r"\frac{\pi}{2}", r"\frac\pi2", r"\dfrac\pi{2}", r"\frac \pi 2", r"\frac{\pi}2"),
            (r"2\frac{1}{\pi}", r"2\frac1\pi"), (r"\frac{\alpha}{\beta}", r"\frac\alpha\beta"),
            (r"\sqrt{\pi}", r"\sqrt\pi"), (r"2\sqrt[3]{4}", r"2\sqrt[3]4", r"2 \sqrt[3] 4"),
            (r"\sqrt[n]{x}", r"\sqrt[n]x"),
            ("18", "{18}", "{{ 18 }}"), ("1/2", r"{\frac12}"), ("3,5,7", "{7, 3, 5}")]
    for forms in same:
        assert {normalize_answer(s) for s in forms} == {normalize_answer(forms[0])}, forms
    assert normalize_answer(r"\frac\pi{2}") != normalize_answer(r"\frac{\p}{i}{2}")
    assert normalize_answer(r"\sqrt[3]{4}") != normalize_answer(r"\sqrt{4}")  # the index stays
    # a command that takes arguments is no argument; {1}{2} is two groups, not one
    assert normalize_answer(r"\sqrt\frac12") == r"\sqrt\frac{1}{2}"
    assert normalize_answer("{1}{2}") == "{1}{2}" and normalize_answer("{}") == ""


def test_unicode_symbols_and_lists_joined_by_and_or_or():
    same = [("-5", "\u22125"), (r"2\pi", "2\u03c0"), (r"\frac{\pi}{2}", "\u03c0/2"), (r"\sqrt{3}", "\u221a3"),
            (r"(-\infty, 0]", "(-\u221e, 0]"), (r"2\times10^3", "2\u00d710^3"), (r"a\cdot b", "a\u00b7b"),
            ("3, 5, 7", "3, 5, and 7", "7, 3 and 5", r"3, 5 \text{ and } 7"), ("2, 3", "x = 2 and x = 3"),
            ("4, 6", "4 or 6", r"x = 6 \text{ or } x = 4", r"x=4 \quad\text{or}\quad x=6"), ("3, 5, 7", "3, 5, or 7")]
    for forms in same:
        assert {normalize_answer(s) for s in forms} == {normalize_answer(forms[0])}, forms
    # "and" / "or" joins entries as a word between them, or glued between numbers (4or6: BROUGHT_TOGETHER)
    for a, b in [("18", "18 and 19"), ("2,3", r"2\land3"), ("3", "and 3"), ("b,3", "band 3"), ("18", "18 or 19"),
                 ("2,3", r"2\lor3")]:
        assert normalize_answer(a) != normalize_answer(b)


def test_every_math500_answer_round_trips_through_a_box():
    rows = read_jsonl("math500.jsonl")
    assert len(rows) == 500
    for row in rows:
        ans = row["answer"]
        extracted = extract_answer("... so the answer is \\boxed{" + ans + "}")
        assert extracted == ans
        assert normalize_answer(extracted) == normalize_answer(ans) != ""
        assert normalize_answer(normalize_answer(ans)) == normalize_answer(ans)  # a label re-normalises to itself


# ways a model writes the same answer as the gold's: (name, rewrite), rewrite giving None where it does not apply
REWRITES = [
    ("in dollar signs", lambda a: f"${a}$"),
    ("a period after", lambda a: a + "."),
    ("spaces around", lambda a: f"  {a} "),
    ("braces around", lambda a: "{" + a + "}"),
    ("bold", lambda a: r"\textbf{" + a + "}"),
    ("displaystyle", lambda a: r"\displaystyle " + a),
    ("\\dfrac", lambda a: a.replace(r"\frac", r"\dfrac")),
    ("\\left( \\right)", lambda a: re.sub(r"([(\[])", r"\\left\1", re.sub(r"([)\]])", r"\\right\1", a))),
    ("named", lambda a: None if "=" in a else "x = " + a),
    ("Unicode minus and pi", lambda a: a.replace("-", "\u2212").replace(r"\pi", "\u03c0")),
    ("+\\infty", lambda a: re.sub(r"(?<![-\w])\\infty", r"+\\infty", a)),
    # whole numbers: thin spaces between thousands, a unit, a decimal point
    ("thin spaces", lambda a: re.sub(r"\B(?=(\d{3})+$)", r"\\,", a) if re.fullmatch(r"\d{4,}", a) else None),
    ("a unit", lambda a: a + r"\text{ units}" if re.fullmatch(r"-?\d+", a) else None),
    ("point zero", lambda a: a + ".0" if re.fullmatch(r"-?\d+", a) else None),
]


@pytest.mark.parametrize("name", ["math500.jsonl", "gsm8k.jsonl", "aime24.jsonl", "amc.jsonl"])
def test_gold_answers_rewritten_as_a_model_might_keep_their_normal_form(name):
    rows, changed = read_jsonl(name), 0
    for row in rows:
        gold = gold_answer(row)
        for how, rewrite in REWRITES:
            other = rewrite(row["answer"])
            if other is not None and other != row["answer"]:
                changed += 1
                assert normalize_answer(other) == gold, (how, row["answer"], other)
    assert changed >= 3 * len(rows)  # the rewrites did rewrite


def test_extract_answer_cases():
    assert extract_answer(r"first \boxed{3}, then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces do not close the box
    assert extract_answer(r"so \boxed 5$.") == "5"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed{\boxed{5}}") == "5"
    assert extract_answer(r"\boxed{4} (I was told to use \boxed{})") == "4"  # an empty box is not an answer
    assert extract_answer(r"\boxed{4} but then \boxed{\frac{1}{2") is None  # cut off inside the last box
    assert extract_answer("the answer is 4") is None
    assert extract_answer("") is None


def test_a_box_that_normalises_to_nothing_holds_no_answer():
    # the auditor's case: 6 empty-looking boxes a view beat 5 sevens in both views, and were rewarded
    row = {"answer": "7"}
    view0 = [r"so \boxed{\text{}}"] * 6 + [r"\boxed{7}"] * 5 + ["no box"] * 5
    view1 = [r"\boxed{$ $}"] * 3 + [r"\boxed{.}"] * 2 + [r"\boxed{\,}"] + [r"\boxed{7}"] * 5 + ["no box"] * 5
    answers0, answers1 = ([answer_of(t, row) for t in view] for view in (view0, view1))
    assert answers0 == [None] * 6 + ["7"] * 5 + [None] * 5
    assert answers1 == [None] * 6 + ["7"] * 5 + [None] * 5
    assert harmonic_mean_select(answers0, answers1) == "7" and majority_vote(answers0) == "7"
    assert answer_of(r"\boxed{0}", row) == "0"  # a zero is an answer


def test_extract_choice():
    assert extract_choice(r"\boxed{B}", 4) == "B"
    assert extract_choice(r"\boxed{(C)}", 4) == "C"
    assert extract_choice(r"\boxed{\text{D}}", 4) == "D"
    assert extract_choice(r"\boxed{B. 42}", 4) == "B"
    assert extract_choice(r"A is wrong because of B. So \boxed{C}", 4) == "C"
    assert extract_choice(r"\boxed{\text{I think C}}", 4) == "C"  # "I" is not one of A..D
    assert extract_choice(r"\boxed{E}", 4) is None
    assert extract_choice(r"\boxed{E}", 10) == "E"
    assert extract_choice(r"\boxed{42}", 4) is None
    # a letter with a digit, slash or degree sign beside it is part of something else: no option
    assert extract_choice(r"\boxed{C12H12O2}", 4) is None and extract_choice(r"\boxed{N/A}", 4) is None
    # a formula's letters, subscripted or with a degree sign, are no option either
    formulas = (r"C_6H_{12}O_6", "H_2O", r"C^\circ", "x^A", r"25^{\circ}C", r"-40^\circ\text{F}", r"25\degree C")
    assert [extract_choice(rf"\boxed{{{f}}}", 10) for f in formulas] == [None] * 7
    assert extract_choice(r"\boxed{(D) 25^\circ C}", 4) == "D" and extract_choice(r"\boxed{B. 90^\circ}", 4) == "B"
    assert extract_choice(r"\boxed{25 °C}", 4) is None and extract_choice(r"\boxed{B)}", 4) == "B"
    assert extract_choice("The answer is C", 4) is None


ADVERSARIAL = {
    "no box": "no box here, just words " * 1000,
    "unbalanced": r"\boxed{" + "{" * 5000 + "}" * 10,
    "nested": r"\boxed{" * 5000 + "5" + "}" * 5000,
    "1 MB": "The answer is {x} so \\frac{1}{2} " * 30_000 + r"\boxed{42}",
    "10,000 {": "{" * 10_000,
    "10,000 empty boxes": r"\boxed{}" * 10_000,
    # under the box's length cap: each nesting level cost the normal form a pass over the text (seconds)
    "4,990 nested braces": r"\boxed{" + "{" * 4990 + "5" + "}" * 4990 + "}",
    "1,400 nested text": r"\boxed{" + r"\text{" * 1400 + "5" + "}" * 1400 + "}",
    "5,000 entries": r"\boxed{\{" + ",".join("1" for _ in range(4900)) + r"\}}",
    "1,600 mixed numbers": r"\boxed{" + ",".join(f"{i} 1/{i + 2}" for i in range(1600)) + "}",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("fn", [extract_answer, normalize_answer, lambda s: extract_choice(s, 4),
                                lambda s: answer_of(s, {"answer": "5"})], ids=["extract", "normalize", "choice",
                                                                               "answer_of"])
def test_adversarial_text_is_fast_and_never_raises(fn, name):
    text = ADVERSARIAL[name]
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05


def test_adversarial_answers():
    assert extract_answer(ADVERSARIAL["nested"]) == "5"
    assert extract_answer(ADVERSARIAL["1 MB"]) == "42"
    for name in ("no box", "unbalanced", "10,000 {", "10,000 empty boxes"):
        assert extract_answer(ADVERSARIAL[name]) is None
    # brackets nested deeper than MAX_DEPTH hold no answer; up to it, the wrappers go as ever
    row = {"answer": "5"}
    assert [answer_of(ADVERSARIAL[name], row) for name in ("4,990 nested braces", "1,400 nested text")] == [None] * 2
    nested = lambda depth: r"\boxed{" + "{" * depth + "5" + "}" * depth + "}"
    assert answer_of(nested(MAX_DEPTH), row) == "5" and answer_of(nested(MAX_DEPTH + 1), row) is None
    assert normalize_answer("{" * 40 + "5" + "}" * 40) == "{" * 40 + "5" + "}" * 40  # left as it is
