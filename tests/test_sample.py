"""The sampler against HF generate (greedy, token for token) and against the softmax it claims to sample."""

import numpy as np
import pytest
import torch

import engine as fast
from models import tiny_model
from sample import finished, generate, inverse_cdf, sample_next


PROMPTS = ["What is 2 + 3?", "hi", "Tom has 4 apples and buys 7 more. How many now?", "x"]


def hf_greedy(model, tok, texts, max_new, eos=None):
    """HF generate on a left-padded batch, completions cut after the first eos (HF pads after it)."""
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)
    rows = out[:, batch.input_ids.shape[1]:].tolist()
    if eos is not None:
        rows = [r[: next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]
    return rows


def test_greedy_equals_hf_generate_on_padded_batch(model, tok):
    ids = [tok.encode(t) for t in PROMPTS]
    ours = generate(model, ids, 24, temperature=0)
    assert ours == hf_greedy(model, tok, PROMPTS, 24)
    assert all(len(r) == 24 for r in ours)


def test_padded_batch_equals_one_by_one(model, tok):
    ids = [tok.encode(t) for t in PROMPTS]
    batched = generate(model, ids, 24, temperature=0, n=2)
    single = [generate(model, [p], 24, temperature=0)[0] for p in ids]
    assert batched == [s for s in single for _ in range(2)]


def test_rows_leaving_the_batch_do_not_disturb_the_others(model, tok):
    # pick stop ids from the greedy outputs themselves, so rows finish at different steps
    ids = [tok.encode(t) for t in PROMPTS]
    free = generate(model, ids, 24, temperature=0)
    stops = [free[0][5], free[2][11]]
    ours = generate(model, ids, 24, temperature=0, stop_ids=stops)
    assert ours == hf_greedy(model, tok, PROMPTS, 24, eos=stops)
    assert len({len(r) for r in ours}) > 1  # the test only means something if lengths differ


def test_stop_ids_and_max_new_tokens(tok):
    model = tiny_model("qwen3")
    stops = list(range(0, 259, 3))  # a third of the vocabulary: most rows stop early
    ended = []  # the progress hook: how many rows ended at each step that ended any
    out = generate(model, [tok.encode("abc"), tok.encode("hello world")], 12, n=16, stop_ids=stops,
                   generator=torch.Generator().manual_seed(0), progress=ended.append)
    assert len(out) == 32 and sum(ended) == 32
    # each step's stopped rows at once, in order of length, then the rows cut off at 12
    stopped, cut = [len(r) for r in out if r[-1] in stops], sum(r[-1] not in stops for r in out)
    assert ended == [stopped.count(k) for k in sorted(set(stopped))] + [cut]
    for row in out:
        assert 1 <= len(row) <= 12
        first_stop = next((i for i, t in enumerate(row) if t in stops), None)
        if first_stop is None:
            assert len(row) == 12
        else:
            assert first_stop == len(row) - 1  # ends with its first stop token, included
    assert any(len(r) < 12 for r in out) and any(r[-1] in stops for r in out)


def test_each_sample_draws_its_own_first_token(tok):
    # regression (nanochat): prefill logits sampled once and broadcast gave all n samples one first token
    model = tiny_model("qwen3")
    out = generate(model, [tok.encode("The answer is")], 1, n=16, generator=torch.Generator().manual_seed(0))
    assert len({r[0] for r in out}) > 4


def test_seed_reproduces_and_temperature_zero_ignores_it(tok):
    model = tiny_model("llama")
    ids = [tok.encode("one"), tok.encode("two three")]
    run = lambda seed, **kw: generate(model, ids, 10, n=3, generator=torch.Generator().manual_seed(seed), **kw)
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1, temperature=0) == run(2, temperature=0)


def reference_probs(logits, temperature, top_k, top_p):
    """Float64 numpy: softmax(logits / T), keep the top-k (and the tokens tied with the k-th: no more than
    k - 1 tokens above), then the smallest top set with mass >= top_p."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    mass = 0.0
    for i in order:
        if (top_k and (p > p[i]).sum() >= top_k) or mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 4, 1.0), (0.8, 5, 0.6)])
def test_sampled_distribution_matches_softmax(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    n = 40_000
    tokens = sample_next(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    freq = np.bincount(tokens.numpy(), minlength=10) / n
    p = reference_probs(logits.numpy(), temperature, top_k, top_p)
    assert np.all(freq[p == 0] == 0)
    sigma = np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.max(np.abs(freq - p) / np.where(p > 0, sigma, 1)) < 5  # every token within 5 sigma


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    # top-1 of [1, 1, 0]: both ones, half and half (HF's TopKLogitsWarper keeps ties too); top-2 of [2, 1, 1, 0]
    n = 20_000
    for logits, top_k in (([1.0, 1.0, 0.0], 1), ([2.0, 1.0, 1.0, 0.0], 2)):
        tokens = sample_next(torch.tensor(logits).expand(n, -1), 1.0, top_k, 1.0, torch.Generator().manual_seed(0))
        freq = np.bincount(tokens.numpy(), minlength=len(logits)) / n
        p = reference_probs(logits, 1.0, top_k, 1.0)
        assert np.all(freq[p == 0] == 0) and np.count_nonzero(p) == top_k + 1
        assert np.abs(freq - p).max() < 5 * np.sqrt(0.25 / n)


def test_top_p_keeps_the_smallest_set_that_reaches_it_exactly():
    # 4 equal tokens (probabilities exactly 1/4): top-p 0.5 is reached by 2 of them, and a third is dropped,
    # as HF's TopPLogitsWarper drops it (the mass of the tokens above it already holds top-p)
    tokens = sample_next(torch.zeros(2000, 4), 1.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert len(tokens.unique()) == 2


@pytest.mark.parametrize("V,block", [(1000, 64), (1030, 64), (300, 1024)])
def test_inverse_cdf_in_blocks_draws_the_token_of_one_running_sum(V, block):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, V, generator=g) * 3
    logits[:, ::7] = float("-inf")  # tokens of probability 0, the last one among them at V = 1030
    logits[:, 64:192] = float("-inf")  # and whole blocks of them
    probs = logits.softmax(-1)
    for _ in range(20):
        u = torch.rand(16, generator=g, dtype=torch.float64)
        cdf = probs.double().cumsum(-1)  # the reference: one running sum over the whole vocabulary
        expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)
        assert torch.equal(inverse_cdf(probs, u, block), expected)
    # the ends: u = 0 draws the first token of positive probability, the largest u below 1 the last one
    kept = (probs[0] > 0).nonzero().squeeze(-1)
    ends = inverse_cdf(probs[:1].expand(2, -1), torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64), block)
    assert ends.tolist() == [kept[0].item(), kept[-1].item()]


def test_inverse_cdf_at_the_boundaries_of_tokens_and_blocks():
    # 256 tokens of probability 1/256 each (exact in binary), blocks of 64: u = k / 256 falls exactly
    # at the end of token k - 1 (of block k // 64 - 1 when k is a multiple of 64) and draws token k
    probs = torch.full((256, 256), 1 / 256)
    u = torch.arange(256, dtype=torch.float64) / 256
    assert inverse_cdf(probs, u, 64).tolist() == list(range(256))


def test_inverse_cdf_when_the_share_inside_a_block_rounds_to_one():
    # the largest u below 1 lands one ulp below the total; minus the first block's sum, that rounds to what
    # the total minus it rounds to, a share of 1 of the last block: still its last token of positive mass
    probs = torch.tensor([[7.647654731712805e-10, 4.190463531728028e-09, 3.995033637238521e-09, 4.986162149833717e-09,
                           0.24126392602920532, 0.6084074974060059, 0.31797468662261963, 0.0]])
    assert inverse_cdf(probs, torch.tensor([1 - 2**-53], dtype=torch.float64), 4).item() == 6


def test_inverse_cdf_of_nan_probabilities_draws_tokens_in_range():
    # a diverged model's NaN logits: some token of the vocabulary, not an index past its end (on CUDA a device assert)
    tokens = inverse_cdf(torch.full((3, 1030), float("nan")), torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64), 64)
    assert ((tokens >= 0) & (tokens < 1030)).all()
    # through sample_next: a row with one NaN or inf logit draws a token in range, the row beside it its own
    logits = torch.tensor([[0.0, float("nan"), 2.0], [0.0, float("inf"), 2.0], [-50.0, -50.0, 50.0]])
    tokens = sample_next(logits, 1.0, 0, 0.9, u=torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert ((tokens >= 0) & (tokens < 3)).all() and tokens[2] == 2


def test_first_tokens_of_generate_follow_the_model_softmax(tok):
    model = tiny_model("qwen3")
    prompt = tok.encode("Once upon a time")
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    p = reference_probs(logits.numpy(), 0.8, 0, 0.95)
    n = 4000
    out = generate(model, [prompt], 1, n=n, temperature=0.8, top_p=0.95, generator=torch.Generator().manual_seed(3))
    freq = np.bincount([r[0] for r in out], minlength=len(p)) / n
    assert np.all(freq[p == 0] == 0)
    # Pearson chi-square over the kept tokens: mean dof, sd sqrt(2 dof) under the claimed softmax
    kept = p > 0
    chi2 = n * np.sum((freq[kept] - p[kept]) ** 2 / p[kept])
    dof = kept.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)


def test_finished_is_the_one_stop_rule():
    assert finished([5, 2], [2]) and not finished([5, 5, 5], [2]) and not finished([], [2])
    assert not finished([2, 5], [2])  # a stop id inside is not an end: generate cuts after the first


def test_eager_max_rows_samples_whole_prompts_in_chunks(model, tok):
    ids = [tok.encode(t) for t in PROMPTS]
    whole = generate(model, ids, 12, n=2, temperature=0)
    assert generate(model, ids, 12, n=2, temperature=0, max_rows=3) == whole  # one prompt (2 rows) a call
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(model, ids, 4, n=0)


@pytest.mark.parametrize("sampler", [generate, fast.generate], ids=["eager", "fast"])
def test_sampling_settings_that_mean_nothing_are_refused(model, tok, sampler):
    # top_p 0 would mask every token (a NaN CDF, the last id drawn), a negative temperature invert the softmax
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match="sampling needs"):
            sampler(model, [tok.encode("abc")], 4, **bad)
