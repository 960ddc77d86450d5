"""
Prompts: what the model is shown, in each of its two roles.

Solver (view 0, and evaluation): the release's system turn, "Let's think step by step and output the
final answer within \\boxed{}.", and the question as the user turn, rendered by the model's chat
template with no enable_thinking flag, as the release renders it: Qwen3's template (which its base
checkpoints ship too) then writes no think block; --thinking-block passes enable_thinking=False, with
which it writes an empty <think></think>. A multiple-choice question (GPQA, MMLU-Pro) is asked as the
release asks it: its system turn asks for the letter of the option alone, in a box (CHOICE_SYSTEM, the
release's words, from its preprocess_mmlu_pro.py), and the user turn is the question, then its options as
'A. ...' lines. An `arith` row asks for the bare number instead (NUMBER_SYSTEM): a 135M model rarely
writes \\boxed{}.

Reframer (view 1, this project's wording of the release's facts: its eight strategies, its rule against
copying five or more consecutive words, its layout): --reframe fused asks the model to rewrite the problem
with one strategy, keeping its logic, numbers and answer, then solve its rewrite, in three sections
(SECTIONS, which rewards.py reads for the format score); --reframe separate asks for the rewrite only,
then solves it with the solver prompt (rewrite_prompts); --reframe given solves the paraphrase the data
row carries; --reframe none has no view 1 (TTRL). A multiple-choice question's reframer prompts carry
CHOICE_SYSTEM after the question. A prompt over --max-prompt-tokens is an error, not a silent cut.

    python prompts.py       # one question's three prompts, rendered as a ChatML model sees them
"""

import functools
import warnings
from string import ascii_uppercase as LETTERS

SOLVER_SYSTEM = "Let's think step by step and output the final answer within \\boxed{}."  # the release's words
NUMBER_SYSTEM = "Answer with just the number."  # rows with answer_format "number" (arith)
CHOICE_SYSTEM = ("Choose the single correct option. Your final answer should be only the letter of the correct "
                 "option, enclosed in a \\boxed{} block.")  # the release's words, for multiple choice

SECTIONS = ("STRATEGY", "REWRITTEN PROBLEM", "SOLUTION")  # the fused layout, in order (rewards.py reads it)
STRATEGY, REWRITTEN, SOLUTION = SECTIONS
REFRAME_STRATEGIES = (  # the release's eight, in its order (its names in the comments), in this project's words
    "make it concrete with a small story",  # Concretize
    "generalise it into a formula or a procedure",  # Generalize
    "move it to another domain such as code or a game",  # Domain Shift
    "add details that do not matter",  # Add Noise
    "work backward from what is asked",  # Reverse
    "solve a small warm-up version first and then the full one",  # Incremental Complexity
    "pose it as a puzzle about its constraints",  # Focus on Constraints
    "tell it from inside the problem",  # POV Shift
)
STRATEGY_LIST = ", ".join(REFRAME_STRATEGIES[:-1]) + f", or {REFRAME_STRATEGIES[-1]}"
FUSED_SYSTEM = (
    "First rewrite the problem in a different way, then solve your rewritten problem.\n"
    f"Choose one strategy: {STRATEGY_LIST}. Keep the logic, every number and the answer exactly the "
    "same, and do not copy five or more consecutive words of the original.\n"
    "Reply in exactly this layout:\n"
    f"{STRATEGY}: <the strategy you chose, one line>\n"
    f"{REWRITTEN}: <the problem, rewritten>\n"
    f"{SOLUTION}: <step-by-step solution of the rewritten problem, ending with the final answer "
    "in \\boxed{}>"
)
REWRITE_SYSTEM = (
    "Rewrite the problem in a different way. Do not solve it.\n"
    f"Choose one strategy: {STRATEGY_LIST}. Keep the logic, every number and the answer exactly the "
    "same, and do not copy five or more consecutive words of the original.\n"
    "Reply in exactly this layout:\n"
    f"{STRATEGY}: <the strategy you chose, one line>\n"
    f"{REWRITTEN}: <the problem, rewritten>"
)


def format_question(row):
    """The user turn: the problem, then for multiple choice its options as 'A. ...' lines (the release's layout)."""
    if not row.get("choices"):
        return row["problem"].strip()
    options = "\n".join(f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(row["choices"]))
    return f"{row['problem'].strip()}\n{options}"


def solver_messages(row):
    """The solver's (system, user) turns: render_prompt(tokenizer, *solver_messages(row))."""
    system = (CHOICE_SYSTEM if row.get("choices") else NUMBER_SYSTEM if row.get("answer_format") == "number"
              else SOLVER_SYSTEM)
    return system, format_question(row)


@functools.cache
def _warn_no_template():
    warnings.warn("tokenizer has no chat template: using the plain 'System: / User: / Assistant:' layout")


def render_prompt(tokenizer, system, user, thinking_block=False):
    """A system and a user turn as the prompt text that the assistant's reply continues. The chat
    template gets no enable_thinking flag unless thinking_block (then enable_thinking=False: Qwen3's
    empty <think></think>); templates that do not know the flag ignore it either way."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        flag = {"enable_thinking": False} if thinking_block else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **flag)
    _warn_no_template()  # a bare base tokenizer (e.g. GPT-2): a plain transcript it can continue
    return f"System: {system}\n\nUser: {user}\n\nAssistant:"


def prompt_ids(tokenizer, system, user, thinking_block=False):
    """Token ids of render_prompt's text. The chat template already writes any BOS the model wants:
    the tokenizer adds no second one."""
    text = render_prompt(tokenizer, system, user, thinking_block=thinking_block)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, system, user, question, thinking_block, max_tokens):
    """prompt_ids, or one line naming the question when the prompt is over max_tokens."""
    ids = prompt_ids(tokenizer, system, user, thinking_block)
    if len(ids) > max_tokens:
        raise SystemExit(f"question {question}: prompt of {len(ids)} tokens is over --max-prompt-tokens {max_tokens}")
    return ids


def first_prompts(tokenizer, rows, reframe, thinking_block=False, max_tokens=float("inf")):
    """The prompts a step starts from, a row each: view 0's (the solver's), and view 1's (fused: rewrite
    and solve; given: the solver's on the row's paraphrase; separate: the request for a rewrite; none: no
    view 1, an empty list). The loop's start-up builds them for every question the run will draw, so that
    a prompt over --max-prompt-tokens stops the run there, not hours in."""
    solver = lambda r, problem: encode(tokenizer, *solver_messages({**r, "problem": problem}), r["id"],
                                       thinking_block, max_tokens)
    prompts0 = [solver(r, r["problem"]) for r in rows]
    if reframe in ("given", "none"):
        return prompts0, [solver(r, r["reframed"]) for r in rows] if reframe == "given" else []
    system = FUSED_SYSTEM if reframe == "fused" else REWRITE_SYSTEM
    question = lambda r: format_question(r) + (f"\n\n{CHOICE_SYSTEM}" if r.get("choices") else "")
    return prompts0, [encode(tokenizer, system, question(r), r["id"], thinking_block, max_tokens) for r in rows]


def rewrite_prompts(tokenizer, rows, rewrites, prompts0, thinking_block=False, max_tokens=float("inf")):
    """--reframe separate: view 1's prompts, the solver prompt of each question's rewrite x'. A rewrite that
    missed the layout (None), or ran on so long that its prompt is over max_tokens, falls back to the
    question's own prompt (prompts0) and is None in the rewrites returned: (rewrites, prompts1)."""
    rewrites, prompts1 = list(rewrites), []
    for i, (r, x) in enumerate(zip(rows, rewrites)):
        ids = x and prompt_ids(tokenizer, *solver_messages({**r, "problem": x}), thinking_block)
        if not ids or len(ids) > max_tokens:
            rewrites[i], ids = None, prompts0[i]
        prompts1.append(ids)
    return rewrites, prompts1


if __name__ == "__main__":
    from models import byte_tokenizer
    tokenizer = byte_tokenizer()  # its chat template is ChatML, as SmolLM2's and Qwen3's
    row = {"id": "demo", "problem": "What is 4 + 7?", "answer": "11",
           "reframed": "Mia has 4 marbles and is given 7 more. How many marbles does Mia have now?"}
    for reframe in ("fused", "given", "separate"):
        p0, p1 = first_prompts(tokenizer, [row], reframe)
        if reframe == "fused":
            print(f"--- view 0, the solver\n{tokenizer.decode(p0[0])}")
        print(f"--- view 1, --reframe {reframe}\n{tokenizer.decode(p1[0])}")
