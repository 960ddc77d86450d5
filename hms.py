"""
Harmonic Mean Selection (HMS): how Self-Harmony picks a pseudo-label without ground truth.
Each question is answered G times in its original wording (view 0) and G times after the model
reframed it (view 1). The label is the answer both views agree on, scored by the harmonic mean
of its two frequencies, so an answer that only one wording produces cannot win.

    p0(a) = #{i : a_i = a} / G0        p1(a) = #{i : a'_i = a} / G1
    y*    = argmax_a  2 p0(a) p1(a) / (p0(a) + p1(a))   over answers seen in both views
            = argmax_a  2 c0 c1 / (c0 G1 + c1 G0)         (the same, in counts, computed exactly)
    ties: larger p0 + p1, then the lexicographically smallest answer; no common answer: None.
A response with no answer (None) counts in G, as in the paper's p = count / G, but never wins.
The answers a_i, a'_i come in their normal form (answers.py), so equal answers written differently
vote together.

Baselines on the same rollouts: `mv` (each view labelled by its own vote: the release's `self`
strategy), `mv0` (view 0's vote labels both views: TTRL, which has only view 0), `mv2` (one vote
over both views pooled), `cross` (Co-Reward: each view labelled by the other view's vote), `gt`
(gold).

Run `python hms.py` for a simulation of the echo chamber: majority voting locks onto a wrong
answer as G grows, HMS recovers the right one when the view-invariance assumption holds, and
does not when both views share the same mistake.
"""
from collections import Counter
from fractions import Fraction

import numpy as np

from answers import normalize_answer

SELECTORS = ("hms", "mv", "mv0", "mv2", "cross", "gt")


def _counts(answers):
    return Counter(a for a in answers if a is not None)


def hms_scores(answers0, answers1):
    """{a: 2 p0(a) p1(a) / (p0(a) + p1(a))} for every answer seen in both views.
    None answers count in G0 and G1 (a response with no answer dilutes the others) but score nothing."""
    return {a: float(s) for a, (s, _) in _hm_table(answers0, answers1).items()}


def _hm_table(answers0, answers1):
    """{a: (HM, p0 + p1)} as exact fractions, so that ties are real ties, not rounding."""
    c0, c1, g0, g1 = _counts(answers0), _counts(answers1), len(answers0), len(answers1)
    return {a: (Fraction(2 * c0[a] * c1[a], c0[a] * g1 + c1[a] * g0),  # = 2 p0 p1 / (p0 + p1)
                Fraction(c0[a], g0) + Fraction(c1[a], g1))
            for a in c0.keys() & c1.keys()}


def harmonic_mean_select(answers0, answers1):
    """y* = argmax over answers in both views of the harmonic mean of p0 and p1; ties go to the
    larger p0 + p1, then to the smallest string. None when the views share no answer."""
    table = _hm_table(answers0, answers1)
    if not table:
        return None
    return min(table, key=lambda a: (-table[a][0], -table[a][1], a))


def majority_vote(answers):
    """TTRL's label: argmax_a #{i : a_i = a}; ties go to the smallest string; None never wins."""
    counts = _counts(answers)
    return min(counts, key=lambda a: (-counts[a], a)) if counts else None


def pooled_majority_vote(answers0, answers1):
    """The paper's "dual-perspective MV" ablation: one vote over the 2G answers of both views."""
    return majority_vote(list(answers0) + list(answers1))


def cross_select(answers0, answers1):
    """Co-Reward: (label for view 0, label for view 1) = (vote of view 1, vote of view 0)."""
    return majority_vote(answers1), majority_vote(answers0)


def select_labels(selector, answers0, answers1, gold=None):
    """(label for view 0, label for view 1) under the named selector, one of SELECTORS."""
    if selector == "hms":
        y = harmonic_mean_select(answers0, answers1)
    elif selector == "mv":  # the release's `self`: each view its own vote
        return majority_vote(answers0), majority_vote(answers1)
    elif selector == "mv0":  # TTRL's single view: view 0's vote for both
        y = majority_vote(answers0)
    elif selector == "mv2":
        y = pooled_majority_vote(answers0, answers1)
    elif selector == "cross":
        return cross_select(answers0, answers1)
    elif selector == "gt":
        if gold is None:
            raise ValueError("selector 'gt' needs the gold answer")
        y = normalize_answer(gold)
    else:
        raise ValueError(f"unknown selector {selector!r}; valid: {', '.join(SELECTORS)}")
    return y, y

# -----------------------------------------------------------------------------
# simulation: the echo chamber, and where HMS does not help


def _simulate(rng, G, n_questions, shared_mistake, n_spread=8):
    """Label accuracy of (MV, pooled MV, HMS) and HMS's no-label rate over simulated questions.
    Answer 0 is correct with the same p_c in both views (view invariance). View v puts a share
    `focus` of its wrong mass on its own favourite wrong answer (1 + v; answer 1 in both views
    when `shared_mistake`) and spreads the rest over the other wrong answers."""
    n_answers = 3 + n_spread
    p_c = rng.uniform(0.10, 0.35, size=4 * n_questions)
    focus = rng.uniform(0.5, 0.9, size=4 * n_questions)
    keep = (1 - p_c) * focus > p_c  # the echo-chamber regime: p(wrong) > p(correct) in view 0
    p_c, focus = p_c[keep][:n_questions], focus[keep][:n_questions]
    hits, no_label = np.zeros(3), 0
    for pc, f in zip(p_c, focus):
        views = []
        for v in (0, 1):
            fav = 1 if shared_mistake else 1 + v
            probs = np.full(n_answers, (1 - pc) * (1 - f) / (n_answers - 2))
            probs[0], probs[fav] = pc, (1 - pc) * f
            views.append([str(a) for a in rng.choice(n_answers, size=G, p=probs / probs.sum())])
        labels = (majority_vote(views[0]), pooled_majority_vote(*views), harmonic_mean_select(*views))
        hits += [y == "0" for y in labels]
        no_label += labels[2] is None
    return hits / len(p_c), no_label / len(p_c)


def _print_table(title, shared_mistake, n_questions=1000):
    rng = np.random.default_rng(0)
    print(f"\n{title}\n{'G':>4} {'MV':>7} {'pooled MV':>10} {'HMS':>7} {'HMS none':>9}")
    for G in (4, 8, 16, 32, 64):
        acc, none = _simulate(rng, G, n_questions, shared_mistake)
        print(f"{G:>4} {acc[0]:>7.3f} {acc[1]:>10.3f} {acc[2]:>7.3f} {none:>9.3f}")


if __name__ == "__main__":
    print("Pseudo-label accuracy (share of questions whose label is the correct answer).")
    print("Assumptions: p(correct) ~ U(0.10, 0.35) and the SAME in both views (view invariance);")
    print("each view puts 50-90% of its wrong mass on one favourite wrong answer, the rest spread")
    print("over 9 others; only questions with p(favourite wrong) > p(correct) are kept.")
    print("1000 questions per row; a question left without a label (HMS none) counts as wrong.")
    _print_table("1) each wording has its OWN favourite wrong answer (the reframing is independent):", False)
    _print_table("2) both wordings share the SAME favourite wrong answer (HMS cannot help):", True)
    print("\nMajority voting converges to the favourite wrong answer as G grows (the echo chamber).")
    print("HMS recovers the correct answer only when the mistake depends on the wording.")
