"""Tests for grpo.py: references are naive float64 loops, finite differences and hand values."""
import copy
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from grpo import (Rollouts, accumulate_gradients, count_flat_groups, group_advantages,
                  grpo_loss, lr_schedule, make_optimizer, make_reference, make_scheduler, pad_rollouts, step,
                  token_logprobs)
from models import load_model


V = 64


def tiny_model(seed=0, tie=False):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie))


def pad_batch(prompts, completions, pad_id=0):
    return pad_rollouts(list(zip(prompts, completions)), pad_id)


def test_each_row_is_its_prompt_left_padded_then_its_completion_right_padded():
    pairs = [([1, 2, 3], [11]), ([4, 5], [12, 13]), ([6], [14, 15, 16, 17]), ([7, 8, 9, 10], [])]
    ids, attention, completion = pad_rollouts(pairs, pad_id=2)  # a pad id that is a real token of row 0
    assert ids.shape == (4, 4 + 4) and ids.dtype == torch.long
    for i, (p, c) in enumerate(pairs):
        assert ids[i].tolist() == [2] * (4 - len(p)) + p + c + [2] * (4 - len(c))
        assert attention[i].tolist() == [0] * (4 - len(p)) + [1] * (len(p) + len(c)) + [0] * (4 - len(c))
        assert completion[i].tolist() == [0] * 4 + [1] * len(c) + [0] * (4 - len(c))


def random_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = [(3, 5), (6, 2), (1, 7), (4, 4)]
    prompts = [torch.randint(1, V, (p,), generator=g).tolist() for p, _ in lens]
    completions = [torch.randint(1, V, (c,), generator=g).tolist() for _, c in lens]
    return prompts, completions


def sample_model(name):
    return load_model(name)[0]


@pytest.mark.parametrize("make_model", [
    lambda: tiny_model(tie=False), lambda: tiny_model(tie=True),
    lambda: sample_model("tiny"), lambda: sample_model("tiny-llama")],
    ids=["qwen3", "qwen3-tied", "sample-tiny", "sample-tiny-llama"])
@pytest.mark.parametrize("T", [0.7, 1.0])
def test_token_logprobs_equals_full_log_softmax(make_model, T):
    model = make_model()
    ids, attn, comp = pad_batch(*random_batch())
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, comp, temperature=T, chunk=3)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        full = (model(ids, attention_mask=attn, position_ids=pos).logits.double() / T)
        full = full.log_softmax(-1)  # (B, T, V)
    want = torch.zeros(ids.shape, dtype=torch.float64)
    want[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = torch.where(comp.bool(), want, 0.0)
    torch.testing.assert_close(logp.double(), want, atol=1e-5, rtol=1e-5)


def test_token_logprobs_left_padded_equals_one_by_one():
    model = tiny_model()
    prompts, completions = random_batch()
    ids, attn, comp = pad_batch(prompts, completions)
    logp = token_logprobs(model, ids, attn, comp)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        one = torch.tensor([p + c])
        one_comp = torch.zeros_like(one)
        one_comp[:, len(p):] = 1
        with torch.no_grad():
            alone = token_logprobs(model, one, torch.ones_like(one), one_comp)[0, len(p):]
        torch.testing.assert_close(logp[b][comp[b].bool()].detach(), alone, atol=1e-5, rtol=1e-5)
    # padded rows must not leak NaN into the gradient
    logp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rows_aligned_at_column_0_are_scored_without_a_mask(monkeypatch):
    # a token-budget micro-batch (rows sorted, moved to column 0, padded on the right) runs plain causal
    # attention, with no mask for SDPA to read, and scores each row as the left-padded batch does
    model = sample_model("tiny")
    prompts, completions = random_batch()
    ids, attn, comp = pad_batch(prompts, [c[: 2 + i] for i, c in enumerate(completions)])  # 5 to 8 tokens a row
    aligned = next(Rollouts(ids, attn, comp, torch.zeros(len(ids))).micro_batches(None, 10**6))
    assert not attn[:, 0].all() and not aligned.attention_mask[:, -1].all()  # padding on the left, then the right
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **k: calls.append((k.get("attn_mask"), k.get("is_causal"))) or sdpa(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        padded = token_logprobs(model, ids, attn, comp)
        assert calls and all(mask is not None for mask, _ in calls)
        calls.clear()
        ours = token_logprobs(model, aligned.input_ids, aligned.attention_mask, aligned.completion_mask)
    assert calls and all(mask is None and causal for mask, causal in calls)
    real = lambda x, m: tuple(x[m.bool()].tolist())
    want = {real(ids[b], attn[b]): padded[b][comp[b].bool()] for b in range(len(ids))}
    for row, mask, c, logp in zip(aligned.input_ids, aligned.attention_mask, aligned.completion_mask, ours):
        torch.testing.assert_close(logp[c.bool()], want[real(row, mask)], atol=1e-5, rtol=1e-5)


def test_eos_equal_to_pad_stays_in_the_loss():
    eos = pad = 0
    model = tiny_model()
    # row 0 ends with EOS, which is also the pad id; row 1 is longer and pads row 0 on the right
    ids, attn, comp = pad_batch([[7, 8, 9], [3, 4]], [[11, 12, eos], [13, 14, 15, 16, eos]], pad)
    eos_pos = 5
    assert ids[0, eos_pos] == eos and comp[0, eos_pos] == 1 and comp[0, eos_pos + 1] == 0
    logp = token_logprobs(model, ids, attn, comp)
    logp.retain_grad()
    assert logp[0, eos_pos] < 0  # scored, not zeroed like padding
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -1.0]), comp, kl_coef=0)
    loss.backward()
    assert logp.grad[0, eos_pos] != 0 and logp.grad[0, eos_pos + 1] == 0


def test_group_advantages_by_hand():
    s = math.sqrt(3) / 2  # (1 - 0.5) / sqrt(1/3): unbiased std of [1, 0, 0, 1] is sqrt(1/3)
    torch.testing.assert_close(group_advantages([1, 0, 0, 1], 4), torch.tensor([s, -s, -s, s]))
    h = 0.5 / math.sqrt(0.5)  # groups [1, 0] and [0, 1]: std sqrt(1/2)
    torch.testing.assert_close(group_advantages([1, 0, 0, 1], 2), torch.tensor([h, -h, -h, h]))
    torch.testing.assert_close(group_advantages([1, 0, 0, 0], 4, scale="none"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert group_advantages([1, 1, 0, 0], 2).abs().max() == 0
    assert count_flat_groups([1, 1, 0, 0, 1, 0], 2) == 2


def test_per_question_factor_cancels_under_std_only():
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 0])
    scaled = rewards.clone()
    scaled[:4] *= 0.9  # e.g. (1 - w_d P_div) of question 0
    torch.testing.assert_close(group_advantages(scaled, 4), group_advantages(rewards, 4))
    assert not torch.allclose(group_advantages(scaled, 4, scale="none"),
                              group_advantages(rewards, 4, scale="none"))


def naive_loss(logp, old, ref, A, mask, clip_eps, kl_coef, agg):
    B, T = len(logp), len(logp[0])
    seq_losses, total, count = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b][t]:
                continue
            rho = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(rho, 1 - clip_eps), 1 + clip_eps)
            l = -min(rho * A[b], clipped * A[b])
            if kl_coef:
                d = ref[b][t] - logp[b][t]
                l += kl_coef * (math.exp(d) - d - 1)
            s, n = s + l, n + 1
        total, count = total + s, count + n
        seq_losses.append(s / max(n, 1))
    return total / count if agg == "token-mean" else sum(seq_losses) / B


def random_loss_inputs(spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, end) in enumerate([(1, 6), (3, 5), (2, 3), (0, 6)]):
        mask[b, start:end] = True
    logp[~mask] = float("nan")  # padding may hold garbage; it must not leak
    return logp, old, ref, A, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("spread", [0.01, 0.5])  # 0.5: many tokens beyond the clip range
def test_grpo_loss_equals_naive_loop(agg, kl_coef, spread):
    logp, old, ref, A, mask = random_loss_inputs(spread)
    loss, stats = grpo_loss(logp, old, ref if kl_coef else None, A, mask, 0.2, kl_coef, agg)
    want = naive_loss(logp.tolist(), old.tolist(), ref.tolist(), A.tolist(), mask.tolist(),
                      0.2, kl_coef, agg)
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
    assert (stats["clip_frac"] > 0.2) == (spread == 0.5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_grpo_loss_gradient_matches_finite_differences(agg):
    logp, old, ref, A, mask = random_loss_inputs(0.3, seed=3)
    logp = torch.where(mask, logp, -1.0).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: grpo_loss(x, old, ref, A, mask, 0.2, 0.1, agg)[0], (logp,))


def naive_view_loss(logp, old, ref, A, mask, views, clip_eps, kl_coef):
    """The release's rule as a float64 loop: per view, the sum of l_t over its tokens / their count;
    the two views added. Scalar torch ops, so autograd gives the reference gradient too."""
    total, count = [0.0, 0.0], [0, 0]
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b, t]:
                continue
            rho = torch.exp(logp[b, t] - old[b, t])
            clipped = rho.clamp(1 - clip_eps, 1 + clip_eps)
            d = ref[b, t] - logp[b, t]
            l = -torch.minimum(rho * A[b], clipped * A[b]) + kl_coef * (torch.exp(d) - d - 1)
            total[views[b]] = total[views[b]] + l
            count[views[b]] += 1
    return total[0] / count[0] + total[1] / count[1]


def test_view_token_mean_loss_and_gradient_equal_a_float64_loop():
    # rows 0 and 3 are view 0 (5 + 6 tokens), rows 1 and 2 view 1 (2 + 1 tokens): a joint mean
    # would weight view 0 11/14; the release's rule gives each view its own mean
    logp, old, ref, A, mask = random_loss_inputs(0.3, seed=4)
    logp = torch.where(mask, logp, -1.0).requires_grad_()
    views = torch.tensor([0, 1, 1, 0])
    loss, _ = grpo_loss(logp, old, ref, A, mask, 0.2, 0.1, "view-token-mean", views=views)
    want = naive_view_loss(logp, old, ref, A, mask, views.tolist(), 0.2, 0.1)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)
    got_grad, = torch.autograd.grad(loss, logp)
    want_grad, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    joint, _ = grpo_loss(logp, old, ref, A, mask, 0.2, 0.1, "token-mean")
    assert not math.isclose(joint.item(), loss.item(), rel_tol=1e-3)
    # one view only: the rule is the plain token-mean
    one, _ = grpo_loss(logp, old, ref, A, mask, 0.2, 0.1, "view-token-mean")
    assert math.isclose(one.item(), joint.item(), rel_tol=1e-12)


def test_kl_is_zero_when_reference_is_the_policy():
    logp, old, _, A, mask = random_loss_inputs(0.1)
    with_kl, stats = grpo_loss(logp, old, logp.clone(), A, mask, kl_coef=0.5)
    without, _ = grpo_loss(logp, old, None, A, mask, kl_coef=0.0)
    assert stats["kl"] == 0 and with_kl.item() == without.item()


def test_clipping_stops_the_gradient_beyond_the_range():
    rho = torch.tensor([1.3, 0.7, 1.1, 0.9], dtype=torch.float64)
    old = torch.zeros(2, 4, dtype=torch.float64)
    logp = rho.log().repeat(2, 1).requires_grad_()  # (2, 4): row 0 has A = +1, row 1 A = -1
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, stats = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, 0.2, 0.0)
    loss.backward()
    clipped = torch.tensor([[True, False, False, False],   # A > 0: only rho > 1 + eps is clipped
                            [False, True, False, False]])  # A < 0: only rho < 1 - eps is clipped
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~clipped] != 0).all()
    assert stats["clip_frac"] == 2 / 8


def rollouts_for(model, seed=1):
    ids, attn, comp = pad_batch(*random_batch(seed))
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, comp)
    g = torch.Generator().manual_seed(seed)
    old = torch.where(comp.bool(), logp + 0.3 * torch.randn(logp.shape, generator=g), 0.0)
    return Rollouts(ids, attn, comp, torch.tensor([1.2, -0.4, 0.3, -1.1]), old_logp=old,
                    views=torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("agg", ["view-token-mean", "token-mean", "seq-mean"])
def test_micro_batching_does_not_change_loss_or_gradients(agg):
    model = tiny_model(tie=True)  # the tied head takes gradient from both of its uses
    ref_model = tiny_model(seed=5)  # a different reference so the KL term is not zero
    batch = rollouts_for(model)
    results = []
    for size in (4, 2, 1):
        model.zero_grad(set_to_none=True)
        stats = accumulate_gradients(model, batch, size, ref_model, kl_coef=0.1, agg=agg)
        results.append((stats, [p.grad.clone() for p in model.parameters()]))
    (s0, g0), rest = results[0], results[1:]
    assert s0["clip_frac"] > 0 and s0["kl"] > 0
    for s, g in rest:
        for k in ("loss", "clip_frac", "ratio", "kl"):
            assert math.isclose(s[k], s0[k], rel_tol=1e-5, abs_tol=1e-7), k
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_micro_batches_by_tokens_give_the_one_pass_gradient_in_float64():
    model, ref_model = tiny_model(tie=True).double(), tiny_model(seed=5).double()
    g = torch.Generator().manual_seed(3)
    lens = [(int(p), int(c)) for p, c in zip(torch.randint(1, 9, (12,), generator=g),
                                             torch.randint(1, 15, (12,), generator=g))]
    prompts = [torch.randint(1, V, (p,), generator=g).tolist() for p, _ in lens]
    completions = [torch.randint(1, V, (c,), generator=g).tolist() for _, c in lens]
    batch = Rollouts(*pad_batch(prompts, completions), torch.randn(12, generator=g, dtype=torch.float64),
                     views=torch.arange(12) % 2)
    grads = []
    for size, tokens in ((12, None), (None, 40), (3, 25), (None, 1)):  # one pass; by tokens; both caps; a row each
        model.zero_grad(set_to_none=True)
        done = []  # the progress bar's updates: each micro-batch's rows, once its backward is done
        stats = accumulate_gradients(model, batch, size, ref_model, kl_coef=0.1, micro_batch_tokens=tokens,
                                     progress=done.append)
        grads.append([p.grad.clone() for p in model.parameters()])
        assert done == [len(mb.advantages) for mb in batch.micro_batches(size, tokens)] and sum(done) == 12
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert stats["pad_share"] == 0  # a row a micro-batch, left-aligned: no padding at all
    mbs = list(batch.micro_batches(None, 40))
    lengths = [mb.attention_mask.sum(-1) for mb in mbs]
    assert sorted(torch.cat(lengths).tolist(), reverse=True) == torch.cat(lengths).tolist()  # longest first
    assert all(mb.attention_mask.numel() <= 40 or len(mb.advantages) == 1 for mb in mbs)
    assert all(mb.attention_mask[:, 0].all() for mb in mbs)  # every row starts at column 0


def test_a_micro_batch_of_empty_completions_gives_no_gradient_and_no_error():
    # a row with no completion token, alone in its micro-batch: nothing to score, but a backward still runs
    model, ref_model = tiny_model().double(), tiny_model(seed=5).double()
    batch = Rollouts(*pad_batch([[5, 6, 7], [5, 6]], [[8, 9], []]), torch.tensor([1.0, -1.0], dtype=torch.float64))
    grads = []
    for size in (2, 1):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, batch, size, ref_model, kl_coef=0.1)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_token_budget_pads_under_a_tenth_of_a_paper_shaped_step():
    # 512 rows: prompts 60-400 tokens, completions ~700 on average, a fifth cut off at 1024
    g = torch.Generator().manual_seed(0)
    P, C = torch.randint(60, 400, (512,), generator=g), torch.randint(200, 1300, (512,), generator=g).clamp(max=1024)
    T = int(P.max() + C.max())
    attn = torch.zeros(512, T, dtype=torch.long)
    comp = torch.zeros_like(attn)
    for b, (p, c) in enumerate(zip(P.tolist(), C.tolist())):
        attn[b, 400 - p : 400 + c], comp[b, 400 : 400 + c] = 1, 1
    batch = Rollouts(attn.clone(), attn, comp, torch.zeros(512))
    pad = lambda mbs: 1 - attn.sum().item() / sum(mb.attention_mask.numel() for mb in mbs)
    by_rows, by_tokens = pad(list(batch.micro_batches(8))), pad(list(batch.micro_batches(None, 16384)))
    assert by_tokens < 0.10 < by_rows
    print(f"padding: {by_rows:.1%} in rows of 8, {by_tokens:.1%} by 16k-token budgets")


def test_step_updates_and_reports():
    model = tiny_model()
    assert make_reference(model, 0.0) is None
    ref_model = make_reference(model, 0.005)
    assert not any(p.requires_grad for p in ref_model.parameters())
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, lr=1e-3)
    sched = make_scheduler(opt, 10)  # lr_schedule over 10 steps
    batch = rollouts_for(model)
    batch.old_logp = None  # the release's single pass: rho = 1, nothing clipped, KL 0
    stats = step(model, opt, batch, 2, ref_model, sched)
    assert stats["clip_frac"] == 0 and abs(stats["ratio"] - 1) < 1e-6 and stats["kl"] == 0
    assert stats["grad_norm"] > 0 and stats["lr"] == 1e-3 and opt.param_groups[0]["lr"] == 1e-3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_lr_schedule():
    f = [lr_schedule(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert f[55] == pytest.approx(0.5) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_schedule(0, 17) == 0.5  # a warm-up of round(1.7) = 2 steps
    assert lr_schedule(100, 100) == lr_schedule(130, 100) == 0.0  # 0 from the end on, not a second cosine


def test_learning_signal_raises_rewarded_first_token():
    model = tiny_model(seed=2)
    prompt, G, L = torch.tensor([[5, 17, 42, 8]]), 16, 3

    def p_first():
        with torch.no_grad():
            return model(prompt).logits[0, -1].softmax(-1)  # (V,)

    p0 = p_first()
    target = int(p0.argsort()[V // 2])  # a middling token, p ~ 1/V
    opt = make_optimizer(model, lr=1e-2)
    torch.manual_seed(0)
    for _ in range(25):
        ids = prompt.repeat(G, 1)
        with torch.no_grad():
            for _ in range(L):
                next_id = torch.multinomial(model(ids).logits[:, -1].softmax(-1), 1)  # (G, 1)
                ids = torch.cat([ids, next_id], 1)
        comp = torch.zeros_like(ids)
        comp[:, prompt.shape[1]:] = 1
        rewards = (ids[:, prompt.shape[1]] == target).float()
        step(model, opt, Rollouts(ids, torch.ones_like(ids), comp, group_advantages(rewards, G)),
             micro_batch_size=8, kl_coef=0.0)
    assert p_first()[target] > 4 * p0[target]


def test_a_nan_gradient_skips_the_update():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2)
    batch = rollouts_for(model)
    batch.advantages = torch.tensor([1.0, float("nan"), 0.5, -1.0])  # a poisoned reward
    before = copy.deepcopy(model.state_dict())
    stats = step(model, optimizer, batch, 2, kl_coef=0.0)
    assert stats["skipped"] and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert optimizer.state == {} and all(p.grad is None for p in model.parameters())  # AdamW untouched
    batch.advantages = torch.tensor([1.0, -0.5, 0.5, -1.0])
    assert not step(model, optimizer, batch, 2, kl_coef=0.0)["skipped"]  # a finite step goes through


def test_adamw_decays_every_weight_as_the_release():
    # the release decays all weights, norms included: on a zero gradient AdamW's step is the decay alone,
    # each weight times 1 - lr * weight_decay (its moments stay 0, so the Adam update adds 0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, lr=0.1, weight_decay=0.5)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(before)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.allclose(p, 0.95 * b) for p, b in zip(model.parameters(), before))
    assert any(name.endswith("norm.weight") for name, _ in model.named_parameters())  # norms are among them
