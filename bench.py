"""
Benchmark: sample.generate against Hugging Face model.generate on the same prompts, in one run.

Both sample at temperature 1.0 with no top-k / top-p truncation. Each case prints tokens per
second for each (new tokens up to and including the stop token) and the ratio ours / HF.
Cases:
  equal-B       B rows, one short prompt each, forced to the same length (no stop tokens);
  prefix 4x16   4 prompts of ~400 tokens, 16 samples each, 64 new tokens, forced length;
  ragged 8x16   8 arithmetic questions, 16 samples each, real stop ids, up to 256 new tokens.

    python bench.py                       # CPU: SmolLM2-135M-Instruct, float32
    python bench.py --device cuda         # GPU: random weights of Qwen3-1.7B's shapes, bf16
On the random-weight model no row would ever sample EOS, so the ragged case stops on a random
0.5% of the vocabulary instead (rows then end after ~200 tokens, geometrically spread).
"""

import argparse
import time

import torch

from sample import generate, load_model, stop_ids

STORY = ("The lighthouse keeper counted the ships that passed each night and wrote their names in a "
         "ledger that his grandmother had started. ")


def qwen3_1p7b_random(device):
    """Random weights in the shapes of Qwen3-1.7B (no download), bf16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40960, rope_theta=1000000.0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def hf_generate(model, prompts, max_new, n, stops, pad_id, generator_seed):
    """model.generate on a left-padded batch; returns the new tokens of each row cut after its stop."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(generator_seed)
    forced = {} if stops else {"min_new_tokens": max_new}
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=max_new, num_return_sequences=n,
                         eos_token_id=list(stops) or None, pad_token_id=pad_id, **forced)
    rows = out[:, T:].tolist()
    return [r[: next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return sum(len(r) for r in rows) / (time.perf_counter() - t0), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="model to load (default: smollm2 on cpu, random Qwen3-1.7B shapes on cuda)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes for the equal-length case (default 1,8,32; 1,8,32,64 on cuda)")
    parser.add_argument("--cases", default="equal,prefix,ragged", help="which cases to run")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()

    gpu = args.device == "cuda"
    if args.model is None and gpu:
        model, tok = qwen3_1p7b_random(args.device), None
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        encode = lambda text, k: torch.randint(0, vocab, (k,), generator=g).tolist()
        stops = torch.randperm(vocab, generator=g)[: vocab // 200].tolist()
        pad_id = 0
    else:
        model, tok = load_model(args.model or "smollm2", args.device)
        chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
        encode = lambda text, k: tok.encode(chat(text), add_special_tokens=False)
        stops = stop_ids(model, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    batches = [int(b) for b in (args.batches or ("1,8,32,64" if gpu else "1,8,32")).split(",")]
    question = lambda i: f"What is {i % 9 + 1} + {(3 * i) % 9 + 1}? Think step by step, then give the number."
    cases = []
    if "equal" in args.cases:
        for b in batches:
            cases.append((f"equal-{b}", [encode(question(i), 40) for i in range(b)], 1, 64, ()))
    if "prefix" in args.cases:
        long = [encode(f"Story {i}: " + STORY * 14 + " What did he count?", 400) for i in range(4)]
        cases.append(("prefix 4x16", long, 16, 64, ()))
    if "ragged" in args.cases:
        cases.append(("ragged 8x16", [encode(question(i), 40) for i in range(8)], 16, 256, tuple(stops)))

    generate(model, [encode("warm up", 8)], 4)  # first calls pay one-off set-up costs
    hf_generate(model, [encode("warm up", 8)], 4, 1, (), pad_id, 0)
    print(f"device {args.device}, model {args.model or ('random Qwen3-1.7B shapes, bf16' if gpu else 'smollm2, float32')}, "
          f"torch {torch.__version__}")
    print(f"{'case':<14}{'rows':>6}{'prompt':>8}{'new tok':>9}{'HF tok/s':>11}{'ours tok/s':>12}{'ratio':>8}")
    for name, prompts, n, max_new, case_stops in cases:
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        hf_rate, hf_rows = timed(lambda: hf_generate(model, prompts, max_new, n, case_stops, pad_id, args.seed), args.device)
        our_rate, our_rows = timed(lambda: generate(model, prompts, max_new, n=n, stop_ids=case_stops, generator=g), args.device)
        mean_len = sum(len(r) for r in our_rows) / len(our_rows)
        print(f"{name:<14}{len(our_rows):>6}{max(map(len, prompts)):>8}{mean_len:>9.1f}"
              f"{hf_rate:>11.1f}{our_rate:>12.1f}{our_rate / hf_rate:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
