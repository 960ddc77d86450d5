"""
Rewards for the two kinds of rollouts, given the pseudo-label y* that hms.py picked.
A solver rollout is rewarded for agreeing with y*. A fused reframe-and-solve rollout is rewarded
for agreeing with y* too, and that reward is scaled down when its layout is incomplete
(P_format) or when the two views answered in the same way (P_div).

    R_solve(y_i)   = 1[a_i = y*]
    R_fused(y'_i)  = (1 - w_f P_format(y'_i)) (1 - w_d P_div) 1[a'_i = y*]       (gated, default)
                   = 1[a'_i = y*] + w_f (1 - P_format(y'_i)) + w_d (1 - P_div)   (additive ablation)
    P_format(y')   = 1 - (# of STRATEGY / REWRITTEN PROBLEM / SOLUTION sections with content) / 3
                     (SOLUTION's content holds the boxed answer that the layout asks for)
    P_div          = clip(1 - JSD(p0, p1) / ln 2, 0, 1)

Gated, correctness is the gate: a well-formatted reframing with a wrong answer earns 0.
P_div is one number per question, shared by all G fused rollouts. GRPO normalises each group as
(r - mean) / (std + eps), so a common factor (1 - w_d P_div) cancels in the gated reward (up to
the eps = 1e-6 beside the std), and a common shift w_d (1 - P_div) cancels exactly in the
additive one. P_div acts only where advantages are not divided by the std (and, for the
additive shift, not even there). The tests show both.
P_format, one number a rollout, does not cancel, and it is not a small signal: the weight
w_f = 0.1 sets no size once the group is divided by its std. In a fused group where all 16
rollouts reach y* and one lacks its STRATEGY line, that one gets the advantage -3.75 and the
other 15 +0.25, whatever w_f > 0 is (a test works it by hand): the strongest push in the step,
where without the penalty the group is flat.
The release defines these penalties but never applies them (its fused reward is the plain gate);
this project applies them as the paper describes; w_format=0 or w_div=0 turns each off.

Run `python rewards.py` to score a few hand-written responses.
"""
import math
import re
from collections import Counter

from answers import extract_answer
from prompts import SECTIONS  # the fused layout the reframer is asked for: one source for both sides

MODES = ("gated", "additive")
EPS = 1e-12
# a section header at the start of a line, markdown allowed: "**STRATEGY:**", "## Solution:"
# (bounded repeats, so a line of a million "*" cannot make the regex backtrack through it)
_NAMES = "|".join(name.replace(" ", r"[ \t]+") for name in SECTIONS)  # "REWRITTEN  problem" too
_HEADER = re.compile(r"^[ \t>#*_]{0,12}(%s)[ \t*_]{0,6}:[ \t*_]*" % _NAMES, re.I | re.M)
_PLACEHOLDER = re.compile(r"\[[^\[\]]*\]|<[^<>]*>|\{[^{}]*\}")  # "[...]", "<rewritten problem>"


def _sections(text):
    """{'STRATEGY' | 'REWRITTEN PROBLEM' | 'SOLUTION': text up to the next header}, first of each."""
    headers = list(_HEADER.finditer(text))
    sections = {}
    for h, following in zip(headers, headers[1:] + [None]):
        name = " ".join(h.group(1).upper().split())
        sections.setdefault(name, text[h.end():following.start() if following else len(text)])
    return sections


def _has_content(section):
    """Not missing, not blank or markdown only, not a bracketed placeholder (also in bold, in backticks or
    with a period after it: the prompt's own "<the problem, rewritten>." copied back)."""
    if section is None:
        return False
    section = section.strip().strip("*_#`").strip()
    return re.search(r"[^\W_]", section) is not None and not _PLACEHOLDER.fullmatch(section.rstrip(".").rstrip())


def format_score(text):
    """(# of the three sections present with real content) / 3; the SOLUTION must hold a box.
    P_format = 1 - format_score."""
    strategy, problem, solution = map(_sections(text).get, SECTIONS)
    return (_has_content(strategy) + _has_content(problem)
            + (_has_content(solution) and extract_answer(solution) is not None)) / 3


def rewritten_problem(text):
    """The REWRITTEN PROBLEM section (x'), stripped; None if missing, empty or a placeholder."""
    section = _sections(text).get(SECTIONS[1])
    return section.strip() if _has_content(section) else None


def jsd(p, q):
    """JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in nats, over the union of
    answers; EPS keeps the logs finite. 0 for identical distributions, ln 2 for disjoint ones. Summed in
    sorted order: a set's order changes with each process's string hashing, and with it the last bits of
    the sum, of P_div and of the fused reward, so that a run and its resumed twin would drift apart."""
    total = 0.0
    for a in sorted(p.keys() | q.keys()):
        pa, qa = p.get(a, 0.0), q.get(a, 0.0)
        m = (pa + qa) / 2
        total += 0.5 * pa * math.log((pa + EPS) / (m + EPS)) + 0.5 * qa * math.log((qa + EPS) / (m + EPS))
    return max(total, 0.0)


def _distribution(answers):
    """{answer: its share of the answers given}, None left out; linear in the number of answers."""
    counts = Counter(a for a in answers if a is not None)
    given = sum(counts.values())
    return {a: c / given for a, c in counts.items()}


def div_penalty(answers0, answers1):
    """P_div = clip(1 - JSD(p0, p1) / ln 2, 0, 1), p0 and p1 the answer distributions of the two
    views. None answers are dropped first: P_div asks whether the views reach the same answers,
    not whether they fail to box them equally often. If a view gave no answer at all there is no
    evidence that the reframing copied the original, so P_div = 0 (no penalty). Gated, this only
    matters when view 0 is empty: an empty view 1 earns 0 anyway."""
    p0, p1 = _distribution(answers0), _distribution(answers1)
    if not p0 or not p1:
        return 0.0
    return min(max(1.0 - jsd(p0, p1) / math.log(2), 0.0), 1.0)


def solve_rewards(answers, y_star):
    """R_solve(y_i) = 1[a_i = y*]; no label (y* = None) rewards nothing."""
    return [float(y_star is not None and a == y_star) for a in answers]


def fused_rewards(texts1, answers1, answers0, y_star, w_format=0.1, w_div=0.1, mode="gated"):
    """R_fused for each fused rollout y'_i (text texts1[i], normalised answer answers1[i]):
    gated:    (1 - w_f P_format(y'_i)) (1 - w_d P_div) 1[a'_i = y*]
    additive: 1[a'_i = y*] + w_f (1 - P_format(y'_i)) + w_d (1 - P_div)
    No label (y* = None) means all zeros in both modes: the question gives no gradient."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if len(texts1) != len(answers1):
        raise ValueError(f"{len(texts1)} texts but {len(answers1)} answers")
    if y_star is None:
        return [0.0] * len(answers1)
    p_div = div_penalty(answers0, answers1)
    rewards = []
    for text, hit in zip(texts1, solve_rewards(answers1, y_star)):
        p_format = 1.0 - format_score(text)
        if mode == "gated":
            rewards.append((1 - w_format * p_format) * (1 - w_div * p_div) * hit)
        else:
            rewards.append(hit + w_format * (1 - p_format) + w_div * (1 - p_div))
    return rewards


if __name__ == "__main__":
    import numpy as np

    from answers import normalize_answer

    texts1 = [
        "**STRATEGY:** make it concrete\n**REWRITTEN PROBLEM:** Ann has 3 apples and gets 4 more. "
        "How many now?\n**SOLUTION:** 3 + 4 = 7, so \\boxed{7}.",
        "STRATEGY: work backward\nREWRITTEN PROBLEM: [rewritten problem]\nSOLUTION: \\boxed{7}",
        "Just solving it: 3 + 4 = \\boxed{7}",
        "STRATEGY: shift domain\nREWRITTEN PROBLEM: A train has 3 cars and adds 4. How many cars?\n"
        "SOLUTION: 3 * 4 = \\boxed{12}",
    ]
    answers1 = [normalize_answer(a) for a in map(extract_answer, texts1)]
    answers0 = ["7", "7", "12", None]
    print(f"view 0 answers {answers0}, view 1 answers {answers1}, y* = '7'")
    print(f"P_div = {div_penalty(answers0, answers1):.3f}  (one number for the whole question)")
    gated = fused_rewards(texts1, answers1, answers0, "7")
    additive = fused_rewards(texts1, answers1, answers0, "7", mode="additive")
    for text, g, a in zip(texts1, gated, additive):
        print(f"format {format_score(text):.2f}  gated {g:.3f}  additive {a:.3f}  | {text[:50]!r}")
    no_div = np.array(fused_rewards(texts1, answers1, answers0, "7", w_div=0.0))
    with_div = np.array(gated)
    print("(r - mean) / std, w_div = 0 vs 0.1:", np.round((no_div - no_div.mean()) / no_div.std(), 4),
          np.round((with_div - with_div.mean()) / with_div.std(), 4), "(identical: P_div cancels)")
