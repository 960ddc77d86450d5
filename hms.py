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
import textwrap
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
# one question's labels, as a teacher draws them on the board (the loop's --explain, and the simulation)


def explain(answers0, answers1, labels, gold=None, finished0=None, finished1=None):
    """The table of one question: every distinct answer of either view with its count in each view (n0,
    n1), p0, p1, its harmonic mean (hms_scores; None for an answer only one view gives) and the marks of
    the selectors whose label it is (labels: {selector: (label of view 0, label of view 1)}, as
    select_labels gives them; "mv:0" where only view 0's label is it), then the rollouts with no answer,
    finished or cut off (finished*: whether each rollout ended with a stop token; None: all did), and a
    line saying why HMS and the vote (view 0's majority, mv0) differ where they do."""
    n0, n1, hm = _counts(answers0), _counts(answers1), hms_scores(answers0, answers1)
    rows = []
    for a in sorted(n0.keys() | n1.keys(), key=lambda a: (-hm.get(a, -1), -n0[a] - n1[a], a)):
        marks = [s if y0 == y1 else f"{s}:{0 if y0 == a else 1}"  # mv:0: view 0's label only
                 for s, (y0, y1) in labels.items() if a in (y0, y1)]
        rows.append(dict(answer=a, n0=n0[a], n1=n1[a], p0=n0[a] / len(answers0), p1=n1[a] / len(answers1),
                         hm=hm.get(a), labels=marks + (["gold"] if a == gold else [])))

    def unanswered(answers, finished, cut):  # the rollouts with no answer that were cut off (or not)
        return sum(a is None and done != cut for a, done in zip(answers, finished or [True] * len(answers)))
    return dict(candidates=rows, none=[unanswered(answers0, finished0, False), unanswered(answers1, finished1, False)],
                cut_off=[unanswered(answers0, finished0, True), unanswered(answers1, finished1, True)],
                why=why_they_differ(rows, labels["hms"][0], labels["mv0"][0]))


def why_they_differ(rows, y_hms, y_vote):
    """One line: why HMS's label is not the vote's, from explain's rows; None where they agree."""
    if y_hms == y_vote:
        return None
    row = {r["answer"]: r for r in rows}
    if y_hms is None:
        return f"the views share no answer: HMS gives no label, where the vote takes {y_vote}"
    h = row[y_hms]
    if y_vote is None:
        return f"view 0 gave no answer to vote for; HMS takes {y_hms}, given in both views (HM {h['hm']:.2f})"
    v = row[y_vote]
    if v["n0"] == h["n0"]:  # the vote broke a tie by the smaller string
        why = f"view 0 gives {y_vote} and {y_hms} as often (p0 {v['p0']:.2f}): the vote takes the smaller, {y_vote}; "
        return why + (f"view 1 never gives it, and HMS takes {y_hms} (p1 {h['p1']:.2f})" if v["n1"] == 0 else
                      f"HMS takes {y_hms}, more frequent in view 1 (p1 {h['p1']:.2f} against {v['p1']:.2f})")
    if v["n1"] == 0:
        return (f"the vote's answer {y_vote} is frequent in view 0 only (p0 {v['p0']:.2f}, p1 0): HMS takes "
                f"{y_hms}, which both views give (p0 {h['p0']:.2f}, p1 {h['p1']:.2f}, HM {h['hm']:.2f})")
    why = (f"the vote's answer {y_vote} is more frequent in view 0 (p0 {v['p0']:.2f} against {h['p0']:.2f}) "
           f"but rarer in view 1 ({v['p1']:.2f} against {h['p1']:.2f}): its harmonic mean {v['hm']:.2f} ")
    if v["hm"] == h["hm"]:
        return why + f"ties {y_hms}'s, and a tie goes to the larger p0 + p1, then to the smaller answer"
    return why + f"is below {y_hms}'s {h['hm']:.2f}"


def explanation_lines(e, width=16):
    """explain's table as aligned text lines; with what the loop adds to it (e: the question, its gold
    answer, the label that trained, each view's rewards and advantages, the fused view's format scores
    and P_div), those too."""
    cut = lambda x: str(x) if len(str(x)) <= width else str(x)[: width - 3] + "..."
    lines = []
    if "question" in e:
        question = " ".join(e["question"].split())
        lines.append(f"step {e['step']}, {e['id']}: {question[:70] + ('...' if len(question) > 70 else '')}")
        lines.append(f"  gold {e['gold']}" + ("" if e["selector"] == "gt" else " (not used to train)"))
    lines.append(f"  {'answer':<{width}} {'n0':>3} {'n1':>3} {'p0':>5} {'p1':>5} {'HM':>5}  labels")
    for r in e["candidates"]:
        hm = "-" if r["hm"] is None else f"{r['hm']:.2f}"
        lines.append(f"  {cut(r['answer']):<{width}} {r['n0']:>3} {r['n1']:>3} {r['p0']:>5.2f} {r['p1']:>5.2f} "
                     f"{hm:>5}  {' '.join(r['labels'])}")
    for name in ("none", "cut_off"):
        if any(e[name]):
            lines.append(f"  {name.replace('_', ' '):<{width}} {e[name][0]:>3} {e[name][1]:>3}")
    if "label" in e:
        y0, y1 = e["label"]
        label = f"{y0}" if y0 == y1 else f"view 0 {y0}, view 1 {y1}"
        lines.append(f"  trains ({e['selector']}): " + ("no label: every reward 0" if label == "None" else label))
        row = lambda head, name, xs: f"  {head:<16}{name:<10}" + "".join(f"{x:>6.2f}" for x in xs)
        for v, view in enumerate(e["views"]):  # under --reframe none view 1 has no rollouts
            if e["rewards"][v]:
                lines += [row(f"view {v} ({view})", "reward", e["rewards"][v]),
                          row("", "advantage", e["advantages"][v])]
        if e.get("format") is not None:
            lines.append(row("", "format", e["format"]) + f"   P_div {e['p_div']:.2f}")
    if e["why"]:
        lines += textwrap.wrap(e["why"], 100, initial_indent="  why: ", subsequent_indent=" " * 7)
    return [line.rstrip() for line in lines]

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
        views = _views(rng, G, pc, f, shared_mistake, n_answers)
        labels = (majority_vote(views[0]), pooled_majority_vote(*views), harmonic_mean_select(*views))
        hits += [y == "0" for y in labels]
        no_label += labels[2] is None
    return hits / len(p_c), no_label / len(p_c)


def _views(rng, G, pc, f, shared_mistake, n_answers):
    """One simulated question's G answers in each view (see _simulate): answer 0 with chance pc, the view's
    favourite wrong answer with (1 - pc) f, the others share the rest."""
    views = []
    for v in (0, 1):
        fav = 1 if shared_mistake else 1 + v
        probs = np.full(n_answers, (1 - pc) * (1 - f) / (n_answers - 2))
        probs[0], probs[fav] = pc, (1 - pc) * f
        views.append([str(a) for a in rng.choice(n_answers, size=G, p=probs / probs.sum())])
    return views


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
    print("\nOne simulated question of each case, G = 16, drawn as the loop's --explain draws a real one (gold 0):")
    rng = np.random.default_rng(1)
    for shared_mistake, case in ((False, "1)"), (True, "2)")):
        print(f"case {case}")
        answers0, answers1 = _views(rng, 16, 0.3, 0.8, shared_mistake, 11)
        labels = {s: select_labels(s, answers0, answers1, gold="0") for s in SELECTORS}
        print("\n".join(explanation_lines(explain(answers0, answers1, labels, gold="0"))) + "\n")
