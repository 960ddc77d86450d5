"""
Answers: what a completion answers, in one canonical form that votes, rewards and grades all compare.

A completion's answer is the content of its LAST \\boxed{...} (braces balanced; \\fbox and "\\boxed 5" too),
or for a multiple-choice question the option letter inside that box, or for an `arith` row (which asks for
the bare number) the last number of a finished completion without a box; a completion with none of these
has no answer (None). The answer is then put in its normal form (normalize_answer), so that equal answers
written differently count as one: the release votes on raw strings and grades with a looser check, which
splits the votes of equal answers (METHOD.md "Answers"). Canonical numbers: an exact rational is written as
an integer ("25") or a reduced fraction "p/q" ("-3/8"); so 0.5, 1/2, \\frac12 and \\dfrac{1}{2} all become
"1/2"; 5.0, 025, 5\\text{ cm} and x = 5 become "5"; 1\\frac{4}{5} and 1 4/5 are read as the mixed number 9/5.
It is a normal form, not an algebra system: equal values written differently stay apart (`a+b` vs `b+a`).
Every function here is bounded on any text (well under 50 ms a completion): a box's content is read up to
MAX_BOX_CHARS, and an answer longer than that, or with brackets nested deeper than MAX_DEPTH, is no answer
(normalize_answer leaves such a string as it is), so adversarial text cannot stall a step.

    python answers.py "so the answer is \\boxed{\\dfrac{1}{2}}."     # the answer, then its normal form
"""
import re
import sys
from fractions import Fraction
from itertools import accumulate
from string import ascii_uppercase

MAX_BOX_CHARS = 10_000  # no real answer is this long; bounds the brace scan on adversarial text
MAX_DEPTH = 32  # nor nests its brackets deeper: each level costs the normal form a pass over the text

# -----------------------------------------------------------------------------
# reading an answer out of a response

# the last \boxed or \fbox followed by a non-empty {...} or by " 5"; the greedy .* makes the
# regex engine find the LAST one in a single backward pass (an empty "\boxed{}" is skipped)
_LAST_BOX = re.compile(r".*\\(?:boxed|fbox)(?![A-Za-z])(?=\s*\{(?!\s*\})|\s+[-+.]?[0-9A-Za-z])", re.S)
_OPEN = re.compile(r"\s*\{")
_BARE = re.compile(r"\s+([-+.]?[0-9A-Za-z][^\s${}]*)")  # \boxed 5
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)  # \{ and \} are literal braces, not grouping


def extract_answer(text):
    """The content of the last non-empty \\boxed{...} (or \\fbox{...}, or \\boxed 5), braces balanced.
    A response cut off inside its last box has no answer (None): we do not fall back to an
    earlier box, which keeps the work linear in the text."""
    box = _LAST_BOX.match(text)
    if box is None:
        return None
    opening = _OPEN.match(text, box.end())
    if opening is None:
        return _BARE.match(text, box.end()).group(1)
    content = _braced_group(text, opening.end())
    return None if content is None else content.strip()


def _braced_group(text, start):
    """text[start:j] where text[j] is the } closing the { just before start; None if it does
    not close within MAX_BOX_CHARS."""
    depth = 1
    for tok in _BRACE_TOKEN.finditer(text, start, start + MAX_BOX_CHARS):
        if tok.group(0) == "{":
            depth += 1
        elif tok.group(0) == "}":
            depth -= 1
            if depth == 0:
                return text[start:tok.start()]
    return None


_DEGREE = r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°"  # 90^\circ, 90^{\circ}, 90°


def extract_choice(text, n_options):
    """Multiple choice: the first standalone letter among the first n_options (A, B, ...) inside
    the last box, e.g. \\boxed{B}, \\boxed{(C)}, \\boxed{\\text{D}}, \\boxed{B. 42}; else None."""
    box = extract_answer(text)
    if box is None or n_options < 1:
        return None
    letters = ascii_uppercase[:n_options]
    box = re.sub(_DEGREE, "°", box)
    box = re.sub(r"\\[A-Za-z]+", " ", box)  # \text{D}: the command name must not hide the letter
    box = re.sub(r"°[\s{}]*[A-Za-z]", " ", box)  # 25^{\circ}C, -40^\circ\text{F}: a temperature's unit
    # standalone: no letter, digit, slash, sub- or superscript or degree sign beside it (C12H12O2, N/A,
    # C_6H_{12}O_6, C^\circ)
    m = re.search(rf"(?<![A-Za-z0-9/°_^])([{letters}])(?![A-Za-z0-9/°_^])", box)
    return m.group(1) if m else None


# a benchmark row's answers: rows with answer_format "number" (arith) ask for the bare number, and the last
# number of a FINISHED completion without a box is its answer. A completion cut off by max_new_tokens has
# none: it stopped mid-sentence, and its last number is most often one of the question's own (measured on
# SmolLM2-135M: "To add 4 and 1, we ..." -> 1)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_of(text, row, finished=True):
    """A completion's answer to a benchmark row (eval.py's schema), in normal form (a letter for multiple
    choice); None if none. finished: the completion ended with a stop token (False: cut off by
    max_new_tokens). A box whose content normalises to nothing (\\boxed{\\text{}}, \\boxed{.}) holds no
    answer: "" would count as one in the votes, and a model that learned to write empty boxes be rewarded."""
    if row.get("choices"):
        return extract_choice(text, len(row["choices"]))
    boxed = extract_answer(text)
    if boxed is None and finished and row.get("answer_format") == "number":
        numbers = _NUMBER.findall(text)
        boxed = numbers[-1] if numbers else None
    if boxed is None or max(_depths(boxed)) > MAX_DEPTH:
        return None
    return normalize_answer(boxed) or None


def gold_answer(row):
    """A row's gold answer in the normal form the completions' answers are compared in."""
    return row["answer"] if row.get("choices") else normalize_answer(row["answer"])

# -----------------------------------------------------------------------------
# one canonical form for answers

_UNICODE = str.maketrans({"\u2212": "-", "\u03c0": r"\pi", "\u221a": r"\sqrt", "\u221e": r"\infty",
                          "\u00d7": r"\times", "\u00b7": r"\cdot"})  # − π √ ∞ × · as LaTeX writes them
_NOISE = [  # (pattern, replacement), applied in order
    (re.compile(r"\\(?:left|right)(?![A-Za-z])\.?"), ""),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(_DEGREE), ""),
    (re.compile(r"(?<!\\)\\!\s*"), ""),  # 10,\!080: a negative space inside a number
    (re.compile(r"(?<=\d)\{,\}(?=\d{3}(?!\d))"), ""),  # 10{,}080: MATH's thousands separator
    (re.compile(r"\\(begin|end)\{[bp]?matrix\}"), r"\\\1{pmatrix}"),  # one name for the same entries
    (re.compile(r"(?<!\\)\\[,;: >]|~|\\q?quad|\\displaystyle"), " "),  # (?<!\\): keep matrix rows \\
    (re.compile(r"(?<!\\);"), ","),  # 1; 2: a list, as 1, 2
    (re.compile(r"\\?\$|\\?%"), ""),
    (re.compile(r"\\(?:mbox|textrm|textbf|textnormal|mathrm|mathbf)\{"), r"\\text{"),
    (re.compile(r"(?<![^\s,(\[])\+(?=\s*\\infty)"), ""),  # [2, +\infty): an interval's end, no sum
    (re.compile(r"\\varnothing(?![A-Za-z])|\\\{\s*\\\}"), r"\\emptyset"),  # one name for the empty set
]
_UNIT = re.compile(r"\\text\{\s*[A-Za-z][A-Za-z .'/]*\}(?:\^\{?\d\}?)?\.?\s*$")  # km/h, people's; a period after
# 5 cm, 12 square feet, 18 Dollars, 18 USD, 18 dollars per day (not 3 PM: 3 AM is another answer)
_BARE_UNIT = re.compile(r"(?<=[\d}])\s+(?:(?:[A-Za-z][a-z]+|[A-Z]{3})\s*){1,3}(?:\^\{?\d\}?)?\.?\s*$")
_TEXT = re.compile(r"\\text\{")
_WRAP = re.compile(r"(?:\\text)?\{")  # around the whole answer
_AND_OR = re.compile(r"(?:\s*,)?\s+(?:and|or)\s+")  # 3, 5, and 7; x = 4 or x = 6
_GLUED_OR = re.compile(r"(?<=[\d}])(?:and|or)(?=[-+\d\\(])")  # 4or6, from 4\text{or}6
_LINES = re.compile(r"(?<=\d)[ \t]*\n\s*(?=[-+\d])")  # numbers on lines of their own: 7, then 2/3 is not 72/3
_GLUED_UNIT = re.compile(r"(?<=\d)(?:[a-z]{3,}|cm|km|mm|kg|ft)\.?\s*$")  # 12days, 5cm (not 2pi, 3x)
_DOUBLED = re.compile(r"(?<!\\)\\\\(?=(?:[dt]?frac|sqrt|pi|text|cdot|times|infty|pm|circ|le|ge|neq|sin|cos|tan"
                      r"|log|ln|theta|alpha|beta|left|right|cup|cap)(?![A-Za-z]))")  # \\frac, as an escaping left
# it (not a matrix's row break before a command: 1\\\frac12)
_LEADING_NAME = re.compile(r"^(?P<name>(?:[A-Za-z]|\\[A-Za-z]+|\((?:\s*[A-Za-z]\s*,)+\s*[A-Za-z]\s*\))"
                           r"(?:_\{?\w+\}?)?(?:\([\w\s,]{1,12}\))?"  # x =, \theta =, (a, b) =, f(x) =, g(t, s) =
                           r"|\|[A-Za-z]{1,3}\||[A-Z](?::[A-Z])+)"  # |PQ| =, P:Q =
                           r"\s*(?:=|\\in(?![A-Za-z]))\s*(?=\S)")  # x \in
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # not 0,250
_MIXED = re.compile(r"(?<![\w.])(\d+)[ \t]+(\d+)/(\d+)(?![\w./])")  # 2 1/2: a whole number, a space, a fraction
# an unbraced argument: one character, or a command that takes none (\frac\pi2; \sqrt\frac12 is not \sqrt{\frac})
_ARG = r"([0-9A-Za-z]|\\(?!frac|sqrt|binom)[A-Za-z]+(?![A-Za-z]))"
_BRACE_ARGS = [  # \frac12 -> \frac{1}{2}, \frac\pi2 -> \frac{\pi}{2}, \sqrt2 -> \sqrt{2}, x^{2} -> x^2
    (re.compile(rf"\\frac{_ARG}{_ARG}"), r"\\frac{\1}{\2}"),
    (re.compile(rf"\\frac{_ARG}\{{"), r"\\frac{\1}{"),
    (re.compile(rf"\\frac(\{{[^{{}}]*\}}){_ARG}"), r"\\frac\1{\2}"),
    (re.compile(rf"\\sqrt(\[\w+\])?{_ARG}"), r"\\sqrt\1{\2}"),  # \sqrt2, \sqrt[3]2 -> \sqrt{2}, \sqrt[3]{2}
    (re.compile(r"([_^])\{(\w)\}"), r"\1\2"),
]
_PIECES = re.compile(r"(,|\(|\)|\[|\]|\\\{|\\\}|\\\\|&|\\begin\{\w*\}|\\end\{\w*\}|\\cup)")
_SYMBOL = r"(?:\\[A-Za-z]+(?:\{\w+\})?|[A-Za-z])"  # \pi, \sqrt{3}, x
_SLASHES = [re.compile(rf"(?P<sign>-?)(?P<p>\d*{_SYMBOL})/(?P<q>\d+)"),  # \pi/2, 3\sqrt{3}/4
            re.compile(rf"(?P<sign>-?)(?P<p>\d+)/(?P<q>{_SYMBOL})")]  # 20000/\pi, 2/\sqrt{3}; not 1/2x
# \frac{-\pi}{6}: a top of one term (\frac{-x-1}{y} is not -\frac{x-1}{y})
_NEGATIVE_TOP = re.compile(r"\\frac\{-(?P<p>[^{}+-]+)\}\{(?P<q>[^{}]+)\}")
_INTEGER = re.compile(r"[+-]?\d{1,60}")
_WORD = re.compile(r"[A-Z]?[a-z]{2,}")
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RATIONAL = [
    re.compile(rf"(?P<sign>[+-]?)(?P<p>{_NUM})"),
    re.compile(rf"(?P<sign>[+-]?)(?P<p>{_NUM})/(?P<q>{_NUM})"),
    re.compile(rf"(?P<sign>[+-]?)\\frac\{{(?P<p>{_NUM})\}}\{{(?P<q>{_NUM})\}}"),
    re.compile(r"(?P<sign>[+-]?)(?P<w>\d+)\\frac\{(?P<p>\d+)\}\{(?P<q>\d+)\}"),  # mixed: 1\frac{4}{5}
]


def normalize_answer(s):
    """The canonical form of an answer string: LaTeX spacing, \\left/\\right, $, %, degrees,
    \\text{} wrappers (braces inside them too) and trailing units (in \\text, or bare words after a
    number: "18 dollars", "12days"), a leading name (`x =`, `(a, b) =`, `f(x) =`, `|PQ| =`, `P:Q =`),
    braces or parentheses around the whole answer ({18}, \\textbf{18}, (2/5)), thousands separators
    (`{,}` anywhere, commas in a lone number only: 0,250 is no thousand), a trailing period or comma and
    a backslash doubled by escaping (\\\\frac) go; an option letter boxed with its text ("(C) 12") is the
    letter; \\dfrac/\\tfrac -> \\frac with braced arguments (\\frac\\pi2 is \\frac{\\pi}{2}), and a symbol
    over a whole number or a whole number over a symbol too (\\pi/2, 3\\sqrt{3}/4, 20000/\\pi), with the
    minus of a top of one term in front (\\frac{-\\pi}{6}); bmatrix and plain matrix -> pmatrix; every
    number that stands alone (the whole answer, or one entry of a tuple, interval or matrix) becomes an
    integer or a reduced "p/q" (2 1/2 is the mixed number 5/2, on one line only), and every word that
    stands alone is in lower case (East, east; not AB or ABC). Unicode's − π √ ∞ × · are read as their
    LaTeX. A bare list (commas or semicolons outside any bracket, entries joined by "and" or "or", or
    numbers on lines of their own: the solutions of an equation, "1, -2", "1 and -2") is a set: its
    entries are sorted and each kept once, with "a \\pm b" as its two entries; so is a set in braces
    (\\{-2, 1\\}); its entries lose a name they all share (x = 1, x = -2) and keep names that differ
    (x = 1, y = 2, in either order); tuples, intervals and matrices keep their order. Signs, brackets and
    radicals are kept: it is a normal form, not an algebra system, so equal values written differently
    stay apart (`a+b` vs `b+a`, `\\sqrt8` vs `2\\sqrt2`, `\\frac{\\sqrt3}{3}` vs `\\frac{1}{\\sqrt3}`)."""
    s = s.strip()
    if len(s) > MAX_BOX_CHARS or max(_depths(s)) > MAX_DEPTH:  # not an answer: left verbatim, in bounded time
        return s
    s, name = _unwrapped(s)
    return _as_set(_compact(s), name)


def _unwrapped(s):
    """normalize_answer's first pass, on the text as written: what is not the answer goes (LaTeX noise,
    wrappers, units, a leading name), lists are marked by commas. Returns (s, the leading name or None)."""
    s = _DOUBLED.sub(r"\\", s.translate(_UNICODE))
    for pattern, repl in _NOISE:
        s = pattern.sub(repl, s)
    while (wrap := _WRAP.match(s)) and _braced_group(s, wrap.end()) == s[wrap.end():-1]:  # {18}, \text{18}
        s = s[wrap.end():-1].strip()
    unit = _UNIT.search(s)
    before = s[:unit.start()].strip() if unit else ""
    if before and not before.endswith("="):  # "5\text{ cm}" -> "5", but "\text{Evelyn}", "x = \text{Evelyn}" stay
        s = s[:unit.start()]
    while (text := _TEXT.search(s)) and (inside := _braced_group(s, text.end())) is not None:
        s = s[:text.start()] + inside + s[text.end() + len(inside) + 1:]  # \text{\frac{14}{3}}: braces inside too
    for pattern in (_AND_OR, _GLUED_OR, _LINES):  # "2 and 3", "3, 5, and 7", "4 or 6", "4or6", 7 / 2: lists
        s = pattern.sub(",", s)
    s = _GLUED_UNIT.sub("", _BARE_UNIT.sub("", s))  # unit words with no \\text: "18 dollars", "12days" -> "18", "12"
    named = _LEADING_NAME.match(s.strip())  # x in "x = 1, x = -2": each entry's name goes in _as_set
    s = _LEADING_NAME.sub("", s.strip()).strip().rstrip(".,").strip()
    if _THOUSANDS.fullmatch(s):  # only a lone number: "(1,2)" and "1, 2" keep their commas
        s = s.replace(",", "")
    s = _MIXED.sub(r"\1\\frac{\2}{\3}", s)  # read as 2\frac{1}{2} below: 5/2, not the 21/2 the spaces' removal makes
    return s, named and re.sub(r"\s+", "", named["name"])


def _compact(s):
    """normalize_answer's second pass: no spaces, arguments braced, an option letter alone, and a single
    value in parentheses without them ((2/5) is 2/5; (1,2), (a)(b) and intervals keep theirs)."""
    s = re.sub(r"\s+", "", s)
    for pattern, repl in _BRACE_ARGS:
        s = pattern.sub(repl, s)
    if re.fullmatch(r"\([A-Z]\)", s):  # "(B)" -> "B": a lone option letter, not an interval
        return s[1]
    if re.fullmatch(r"\([A-E]\)[^(),]+", s):  # "(C) 12": the option letter with its text (MATH's choices)
        return s[1]
    depth = _depths(s)
    if s[:1] == "(" and s[-1:] == ")" and min(depth[1:-1], default=0) > 0 and "," not in s:
        return s[1:-1]
    return s


def _as_set(s, name):
    """normalize_answer's last pass: the answer as its entries (one, or a bare list's, a set), each in its
    canonical form, sorted, each once."""
    entries = [_unnamed(entry, name) for entry in _top_level_split(_set_entries(s))]  # a set \{a, b\} too
    if name and any(_LEADING_NAME.match(entry) for entry in entries):  # x = 1, y = 2: every name stays
        entries[0] = f"{name}={entries[0]}"
    return ",".join(sorted({_canonical_entry(value) for entry in entries for value in _plus_minus(entry)}))


def _canonical_entry(entry):
    """An entry, piece by piece (_PIECES: brackets, commas, matrix rows cut it): a plus right after a
    closing bracket is a sum, not a sign, and stays ((a+b)+3 is not (a+b)3)."""
    out = []
    for piece in _PIECES.split(entry):
        plus = piece.startswith("+") and out and out[-1] in (")", "]", r"\}")
        out.append("+" + _canonical_piece(piece[1:]) if plus else _canonical_piece(piece))
    return "".join(out)


def _plus_minus(entry):
    """The values of an entry: with one \\pm outside brackets, its two, a+b and a-b (models write both
    ways); else the entry itself."""
    if r"\pm" not in entry:
        return [entry]
    depth = _depths(entry)
    cut = [m.start() for m in re.finditer(r"\\pm(?![A-Za-z])", entry) if depth[m.start()] == 0]
    if len(cut) != 1:
        return [entry]
    a, b = entry[: cut[0]], entry[cut[0] + 3 :]
    return [f"{a}+{b}" if a else b, f"{a}-{b}"]  # \pm\sqrt3: \sqrt3 and -\sqrt3, as models write them


def _set_entries(s):
    """The entries of an answer that is one set, \\{a, b\\}, as the bare list "a, b" (both are the
    solutions, in no order); s itself otherwise (\\{1\\}\\cup\\{2\\} is not one set)."""
    inner = s[2:-2]
    depth = _depths(inner)  # never below 0 and back to 0 at the end: the outer braces are one pair
    whole = s.startswith(r"\{") and s.endswith(r"\}") and inner and min(depth) == 0 == depth[-1]
    return inner if whole else s


def _unnamed(entry, name):
    """A list's entry without a leading `name =` (name: the variable the answer's first entry named, which
    normalize_answer dropped): "x = 1, x = -2" is the solutions 1 and -2. An entry that names another
    variable keeps its name (a = 1, b = 2 is not the set {1, 2})."""
    m = _LEADING_NAME.match(entry)
    return entry[m.end():] if m and name and m["name"] == name else entry


def _depths(s):
    """How many brackets ((, [, {) are open at each character of s."""
    return list(accumulate(((c in "([{") - (c in ")]}") for c in s), initial=0))


def _top_level_split(s):
    """s cut at its commas outside (), [] and {} (\\{ \\} included)."""
    depth = _depths(s)
    cuts = [i for i, c in enumerate(s) if c == "," and depth[i] == 0]
    return [s[i + 1 : j] for i, j in zip([-1] + cuts, cuts + [len(s)])]


def _canonical_piece(piece):
    """One entry of an answer: a symbol over a whole number, or a whole number over a symbol, as a \\frac
    (models write \\pi/2 and \\frac{\\pi}{2} alike), the sign of a fraction's top in front of it
    (\\frac{-\\pi}{6} is -\\frac{\\pi}{6}), a number in its canonical form, a word in lower case (East is
    east: a word of three letters or more, capitalised or not; AB and ABC stay), anything else unchanged."""
    if _INTEGER.fullmatch(piece):  # the commonest piece, read without a Fraction (as _canonical_number would)
        return str(int(piece))
    if _WORD.fullmatch(piece):
        return piece.lower()
    m = _NEGATIVE_TOP.fullmatch(piece)
    piece = rf"-\frac{{{m['p']}}}{{{m['q']}}}" if m else piece
    for pattern in _SLASHES:
        if m := pattern.fullmatch(piece):
            return rf"{m['sign']}\frac{{{m['p']}}}{{{m['q']}}}"
    return _canonical_number(piece)


def _fraction(number):
    """Fraction(number) of a number's text, a whole number read as an int (several times faster)."""
    return Fraction(int(number)) if _INTEGER.fullmatch(number) else Fraction(number)


def _canonical_number(piece):
    """An exact rational as "n" or "p/q" in lowest terms; anything else unchanged."""
    if len(piece) > 60:  # int() of huge digit strings is slow (and capped by Python)
        return piece
    for pattern in _RATIONAL:
        m = pattern.fullmatch(piece)
        if m is None:
            continue
        q = _fraction(m.group("q")) if "q" in m.groupdict() else Fraction(1)
        if q == 0:
            return piece
        x = _fraction(m.group("p")) / q
        if "w" in m.groupdict():
            if x >= 1:  # 2\frac{3}{2} is not a mixed number; leave it alone
                return piece
            x += int(m.group("w"))
        x = -x if m.group("sign") == "-" else x
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return piece


if __name__ == "__main__":
    for text in sys.argv[1:] or [r"so \boxed{\dfrac{1}{2}}.", r"\boxed{x = 1,\! 000}", r"\boxed{(C) 12}"]:
        boxed = extract_answer(text)
        print(f"{text!r}: boxed {boxed!r}, normal form {None if boxed is None else normalize_answer(boxed)!r}")
