"""prompts.py: the solver prompt as the release renders it, multiple choice, the reframer's layout, and
each view's prompt under each reframing."""
import re
import warnings

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import prompts
import rewards
from eval import load_benchmark
from models import byte_tokenizer


# A trimmed Qwen3 chat template: the parts that render system/user turns and the generation prompt.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def word_tokenizer(chat_template=None):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = chat_template
    return tok


def test_solver_prompt_with_a_qwen3_template_as_the_release_renders_it_and_with_the_think_block():
    row = {"id": "q", "problem": "What is 2 + 3?", "answer": "5"}
    tok = word_tokenizer(QWEN3_TEMPLATE)
    release = (
        "<|im_start|>system\nLet's think step by step and output the final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompts.render_prompt(tok, *prompts.solver_messages(row)) == release  # no enable_thinking flag: no block
    assert prompts.render_prompt(tok, *prompts.solver_messages(row), thinking_block=True) == release + "<think>\n\n</think>\n\n"


def test_multiple_choice_is_asked_as_the_release_asks_it():
    # preprocess_mmlu_pro.py: system turn = the letter-only instruction, user turn = question, newline, options
    row = {"id": "q", "problem": " Which is a prime? ", "choices": ["4", " 7 ", "9"], "answer": "B"}
    assert prompts.format_question(row) == "Which is a prime?\nA. 4\nB. 7\nC. 9"
    assert prompts.solver_messages(row) == (
        "Choose the single correct option. Your final answer should be only the letter of the correct option, "
        "enclosed in a \\boxed{} block.", "Which is a prime?\nA. 4\nB. 7\nC. 9")
    assert prompts.solver_messages({"id": "m", "problem": "1+1?", "answer": "2"})[0] == prompts.SOLVER_SYSTEM
    tok = byte_tokenizer()
    _, fused = prompts.first_prompts(tok, [row], "fused")  # the reframer is told the letter-only rule too
    assert tok.decode(fused[0]).count(prompts.CHOICE_SYSTEM) == 1


def test_plain_fallback_without_a_chat_template_warns_once():
    prompts._warn_no_template.cache_clear()
    tok = word_tokenizer(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = prompts.render_prompt(tok, "Be brief.", "What is 2 + 3?")
        prompts.render_prompt(tok, "Be brief.", "What is 1 + 1?")
    assert first == "System: Be brief.\n\nUser: What is 2 + 3?\n\nAssistant:"
    assert len([w for w in caught if "chat template" in str(w.message)]) == 1


def test_the_reframers_layout_is_the_one_rewards_reads():
    # each prompt's layout with its placeholders filled in: a full format score, and its rewritten problem
    fill = iter(["make it concrete", "Ann has 3 apples and gets 4 more. How many now?", "3 + 4 = \\boxed{7}"] * 2)
    for system, score in ((prompts.FUSED_SYSTEM, 1.0), (prompts.REWRITE_SYSTEM, 2 / 3)):
        layout = re.sub(r"<[^<>]*>", lambda _: next(fill), system.split("layout:\n")[1])
        assert rewards.format_score(layout) == pytest.approx(score)  # the rewrite asks for no SOLUTION
        assert rewards.rewritten_problem(layout) == "Ann has 3 apples and gets 4 more. How many now?"


def test_each_reframing_asks_its_own_view_1_prompt():
    prompt_ids, solver_messages = prompts.prompt_ids, prompts.solver_messages
    tokenizer, row = byte_tokenizer(), load_benchmark("arith", n=1)[0]
    solver = prompt_ids(tokenizer, *solver_messages(row))
    view1 = {"given": prompt_ids(tokenizer, *solver_messages({**row, "problem": row["reframed"]})),  # solve the story
             "fused": prompt_ids(tokenizer, prompts.FUSED_SYSTEM, row["problem"]),  # rewrite, then solve
             "separate": prompt_ids(tokenizer, prompts.REWRITE_SYSTEM, row["problem"])}  # rewrite only
    for reframe, prompt in view1.items():
        assert prompts.first_prompts(tokenizer, [row], reframe) == ([solver], [prompt])


def test_the_reframer_is_offered_the_release_s_eight_strategies_and_its_copying_rule():
    assert len(prompts.REFRAME_STRATEGIES) == 8
    for system in (prompts.FUSED_SYSTEM, prompts.REWRITE_SYSTEM):
        assert all(s in system for s in prompts.REFRAME_STRATEGIES)
        assert "do not copy five or more consecutive words of the original" in system
