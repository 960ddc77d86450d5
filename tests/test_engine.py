"""The fast engine against HF generate and the eager loop (greedy, token for token), its slots and
buckets, and its sampling against the softmax it claims to sample."""

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import engine
from models import cast_weights, load_model, random_model, tiny_model
from sample import generate, generate_eager
from test_sample import PROMPTS, hf_greedy, reference_probs


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, used, scale):
    """engine.flash_varlen's contract, one packed sequence at a time: the queries q[cu_q[i] : cu_q[i+1]]
    attend to the keys k[cu_k[i] : cu_k[i] + used[i]], within the bounds max_q and max_k."""
    assert all(x.dtype == torch.int32 and x.is_contiguous() for x in (cu_q, cu_k, used))
    assert len(cu_q) == len(cu_k) == len(used) + 1
    out = torch.full_like(q, float("nan"))
    for i in range(len(used)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i] + used[i])
        assert 0 < qs.stop - qs.start <= max_q and 0 < used[i] <= max_k and ks.stop <= cu_k[i + 1]
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks])
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attention", ["sdpa", "matmul", "varlen", "flex"])
@pytest.mark.parametrize("max_rows,check_every", [(None, 1), (3, 1), (3, 4), (1, 2)])
def test_greedy_equals_hf_generate_with_refilled_slots_and_stops(model, tok, max_rows, check_every, attention,
                                                                 monkeypatch):
    # four prompts of different lengths, stop ids that end rows at different steps, fewer slots
    # than sequences (slots are refilled) and windows of several steps between looks; varlen (flash
    # attention, CUDA only) with the op replaced by a slow reference of its contract; flex (FlexAttention,
    # uncompiled on the CPU) with blocks of 16 columns, so that rows read different numbers of blocks
    monkeypatch.setattr(engine, "ATTENTION", attention)
    monkeypatch.setattr(engine, "FLEX_BLOCK", 16)
    monkeypatch.setattr(engine, "flash_varlen", varlen_reference)
    ids = [tok.encode(t) for t in PROMPTS]
    free = hf_greedy(model, tok, PROMPTS, 24)
    stops = [free[0][5], free[2][11]]
    ours = engine.generate(model, ids, 24, temperature=0, stop_ids=stops, max_rows=max_rows,
                           check_every=check_every)
    assert ours == hf_greedy(model, tok, PROMPTS, 24, eos=stops)
    assert len({len(r) for r in ours}) > 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attention", ["sdpa", "varlen", "flex"])
def test_the_cuda_schedule_with_replays_standing_in_for_graphs(model, tok, attention, monkeypatch):
    # what CUDA runs, here on the CPU: row counts bucketed to 1, 2, 4, 5 with free slots inside a bucket,
    # cache lengths bucketed (varlen, flex: one length, the whole cache), looks every 4 steps; each "graph"
    # replays its step
    monkeypatch.setattr(engine, "ATTENTION", attention)
    monkeypatch.setattr(engine, "FLEX_BLOCK", 16)
    monkeypatch.setattr(engine, "flash_varlen", varlen_reference)
    monkeypatch.setattr(engine, "LENGTH_BUCKET", 16)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    captured = []

    def capture(step, slots, pool):
        captured.append(step.__defaults__)  # the step's (b, t)
        return type("Replay", (), {"replay": staticmethod(step)})

    monkeypatch.setattr(engine, "capture", capture)
    ids = [tok.encode(t) for t in PROMPTS] * 2
    free = hf_greedy(model, tok, PROMPTS, 24)
    stops = [free[0][5], free[2][11]]
    stats = {}
    ours = engine.generate(model, ids, 24, temperature=0, stop_ids=stops, max_rows=5, check_every=4,
                           cuda_graphs=True, stats=stats)
    assert ours == hf_greedy(model, tok, PROMPTS, 24, eos=stops) * 2
    assert stats["graphs"] == len(captured) and stats["capture_s"] > 0 and stats["steps"] % 4 == 0
    L = -(-(max(map(len, ids)) + 24) // 16) * 16  # columns: a multiple of 16
    assert len(set(captured)) == len(captured) and {b for b, _ in captured} <= {1, 2, 4, 5}
    assert all(t == L for _, t in captured) if attention in ("varlen", "flex") else \
        all(t % 16 == 0 or t == L for _, t in captured) and len({t for _, t in captured}) > 1


def test_n_samples_of_each_prompt_equal_the_eager_loop(model, tok):
    ids = [tok.encode(t) for t in PROMPTS]
    stops = [7, 100, 200]
    eager = generate_eager(model, ids, 20, n=3, temperature=0, stop_ids=stops)
    assert engine.generate(model, ids, 20, n=3, temperature=0, stop_ids=stops, max_rows=5) == eager


def test_prefill_in_several_forwards_changes_nothing(model, tok, monkeypatch):
    ids = [tok.encode(t) for t in PROMPTS]
    whole = engine.generate(model, ids, 12, temperature=0)
    monkeypatch.setattr(engine, "PREFILL_TOKENS", 20)  # one or two prompts a forward
    monkeypatch.setattr(engine, "PREFILL_AHEAD", 1)
    assert engine.generate(model, ids, 12, temperature=0, max_rows=2) == whole
    many = [tok.encode(f"{i} + {i}") for i in range(12)]
    expected = engine.generate(model, many, 3, temperature=0)
    sizes, prefill = [], engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda model, prompts, dtype: sizes.append(len(prompts)) or
                        prefill(model, prompts, dtype))
    monkeypatch.setattr(engine, "PREFILL_AHEAD", 2)
    assert engine.generate(model, many, 3, temperature=0, max_rows=3) == expected
    # the first admission needs 3 prompts, more than PREFILL_AHEAD: no look-ahead joins them; each prompt once
    assert sizes[0] == 3 and max(sizes) == 3 and sum(sizes) == 12


def test_one_new_token_and_stop_on_the_first_token(tok):
    model = tiny_model("qwen3")
    ids = [tok.encode("abc"), tok.encode("hello")]
    first = [r[0] for r in engine.generate(model, ids, 1, temperature=0)]
    assert engine.generate(model, ids, 1, temperature=0) == [[f] for f in first]
    out = engine.generate(model, ids, 8, n=2, temperature=0, stop_ids=[first[0]], max_rows=1)
    assert out[0] == out[1] == [first[0]]  # finished at admission: the slot went straight to the next
    assert out[2] == out[3] and len(out[2]) >= 1
    as_tensor = engine.generate(model, ids, 8, n=2, temperature=0, stop_ids=torch.tensor([first[0]]), max_rows=1)
    assert as_tensor == out  # stop ids as a tensor stop the rows too (its elements hash by identity, not value)


def test_stop_ids_and_max_new_tokens(tok):
    model = tiny_model("qwen3")
    stops = list(range(0, 259, 10))  # a tenth of the vocabulary: rows end at all lengths
    ended = []
    out = engine.generate(model, [tok.encode("abc"), tok.encode("hello world")], 12, n=16, stop_ids=stops,
                          generator=torch.Generator().manual_seed(0), max_rows=7, check_every=5,
                          progress=ended.append)
    assert len(out) == 32 and ended == [1] * 32  # the progress hook hears of each sequence as it ends
    for row in out:
        first_stop = next((i for i, t in enumerate(row) if t in stops), None)
        assert len(row) == 12 if first_stop is None else first_stop == len(row) - 1
    assert any(len(r) < 12 for r in out) and any(len(r) == 12 for r in out)


def test_seed_reproduces_and_each_sample_draws_its_own_first_token(tok):
    model = tiny_model("llama")
    ids = [tok.encode("one"), tok.encode("two three")]
    seeded = lambda seed: dict(generator=torch.Generator().manual_seed(seed))
    run = lambda seed: engine.generate(model, ids, 10, n=3, max_rows=4, **seeded(seed))
    assert run(1) == run(1)
    assert run(1) != run(2)
    # regression (nanochat): prefill logits sampled once and broadcast gave all samples one first token
    out = engine.generate(model, [tok.encode("The answer is")], 1, n=16, **seeded(0))
    assert len({r[0] for r in out}) > 4


def test_first_and_later_tokens_follow_the_model_softmax(tok):
    # the first token comes from the prefill logits, the second from the engine's own decode step
    model = tiny_model("qwen3")
    prompt = tok.encode("Once upon a time")
    n = 4000
    out = engine.generate(model, [prompt], 2, n=n, temperature=0.8, top_p=0.95, max_rows=1000,
                          generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first_logits = model(torch.tensor([prompt])).logits[0, -1]
        common = max(set(r[0] for r in out), key=[r[0] for r in out].count)
        second_logits = model(torch.tensor([prompt + [common]])).logits[0, -1]
    draws = ((first_logits, [r[0] for r in out]), (second_logits, [r[1] for r in out if r[0] == common]))
    for logits, tokens in draws:
        p = reference_probs(logits.numpy(), 0.8, 0, 0.95)
        freq = np.bincount(tokens, minlength=len(p)) / len(tokens)
        assert np.all(freq[p == 0] == 0)
        kept = p > 0
        chi2 = len(tokens) * np.sum((freq[kept] - p[kept]) ** 2 / p[kept])
        dof = kept.sum() - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof)


def test_decode_step_equals_the_hf_forward(model, tok):
    # one decode step of the engine's own forward against HF's logits on the whole sequence
    prompt = tok.encode("Tom has 4 apples")
    slots = engine.Slots(model, 2, 32, 1, torch.float32, torch.device("cpu"))
    (k, v, _), = engine.prefill(model, [prompt], torch.float32)
    for s in range(2):
        slots.k[:, s, :, : len(prompt)], slots.v[:, s, :, : len(prompt)] = k, v
    slots.tok[:] = torch.tensor([65, 66])
    slots.pos[:] = len(prompt)
    with torch.no_grad():
        logits = engine.step_logits(model, slots, 2, 24)
        ref = model(torch.tensor([prompt + [65], prompt + [66]])).logits[:, -1]
        engine.decode_step(model, slots, 2, 24, (0, 0, 1.0))  # greedy: the argmax goes in, the position advances
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert slots.tok.tolist() == ref.argmax(-1).tolist() and slots.pos.tolist() == [len(prompt) + 1] * 2


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_the_decode_step_at_qwen3_1_7b_shapes_reads_no_value_on_the_host(attention, monkeypatch):
    # what a CUDA graph needs of the step, checked without a GPU: on the meta device (shapes, no values) any
    # op that reads a value on the host (.item(), a Python `if` on a tensor) or whose shape depends on values
    # (boolean indexing, nonzero) raises; real Qwen3-1.7B shapes in bfloat16, greedy and sampled with top-k
    # and top-p (sort, scatter, the inverse CDF)
    monkeypatch.setattr(engine, "ATTENTION", attention)
    model = cast_weights(random_model("qwen3-1.7b", device="meta"), torch.bfloat16)
    slots = engine.Slots(model, 8, 64, 1, torch.bfloat16, model.device)
    with torch.no_grad():
        for sampling in ((0, 0, 1.0), (1.0, 20, 0.95)):
            engine.decode_step(model, slots, 5, 32, sampling)
            assert slots.tok.shape == slots.pos.shape == (8,) and slots.tok.dtype == slots.pos.dtype == torch.long
    # the check bites: one host read planted in the step
    monkeypatch.setattr(engine, "sample_next", lambda logits, *a, **k: logits.argmax(-1) * int(logits.max()))
    with pytest.raises(RuntimeError, match="meta"):
        engine.decode_step(model, slots, 5, 32, (0, 0, 1.0))


def test_norm_and_rope_compute_what_hf_computes():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    model = tiny_model("qwen3")
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.norm.weight.normal_()  # not all ones, so the weight's product is checked too
        for dtype in (torch.float32, torch.bfloat16):
            module, x = model.model.norm.to(dtype), (3 * torch.randn(5, 64)).to(dtype)
            ours, theirs = engine.norm(module, x), module(x)
            if dtype == torch.float32:
                assert torch.equal(ours, theirs)
            else:  # one rounding to bfloat16 where HF rounds twice: at most one unit in the last place
                assert ours.dtype == dtype
                torch.testing.assert_close(ours, theirs, atol=0, rtol=2 ** -7)
        model.float()
        slots = engine.Slots(model, 1, 40, 1, torch.float32, torch.device("cpu"))
        pos = torch.tensor([0, 7, 39])
        q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
        cos, sin = model.model.rotary_emb(q, pos[:, None])  # HF's (b, 1, D) table at each row's position
        hf_q, hf_k = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos, sin)  # (b, H, 1, D)
        ours = engine.rope(torch.cat((q, k), 1), slots.cos[pos][:, None], slots.sin[pos][:, None])
    assert torch.equal(ours, torch.cat((hf_q, hf_k), 1)[:, :, 0])


def test_buckets_and_supports():
    assert engine.buckets(1) == [1] and engine.buckets(6) == [1, 2, 4, 6] and engine.buckets(8) == [1, 2, 4, 8]
    assert engine.supports(tiny_model("qwen3")) and engine.supports(tiny_model("llama"))


def test_the_attention_is_the_fastest_measured_unless_set(monkeypatch):
    from types import SimpleNamespace
    like = lambda device, dtype: SimpleNamespace(device=torch.device(device), dtype=dtype)  # a tensor's device, dtype
    capability = (9, 0)  # an H100 / H200
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert engine.ATTENTION is None
    assert engine.attention_for(like("cuda", torch.bfloat16)) == "varlen"  # fastest on an H200 (README)
    assert engine.attention_for(like("cuda", torch.float32)) == "sdpa"  # flash has no float32
    assert engine.attention_for(like("cpu", torch.bfloat16)) == "sdpa"
    capability = (7, 5)  # a T4: no flash attention
    assert engine.attention_for(like("cuda", torch.float16)) == "sdpa"
    monkeypatch.setattr(engine, "ATTENTION", "matmul")
    assert engine.attention_for(like("cuda", torch.bfloat16)) == "matmul"


def small(cls, config_cls, **kw):
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, **kw)).eval()


def test_qwen2_with_qkv_bias_equals_hf_generate(tok):
    qwen2 = small(Qwen2ForCausalLM, Qwen2Config)
    assert engine.supports(qwen2) and qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert engine.generate(qwen2, [tok.encode(t) for t in PROMPTS], 16, temperature=0, max_rows=3) == \
        hf_greedy(qwen2, tok, PROMPTS, 16)


def test_other_architectures_fall_back_to_the_eager_loop(tok):
    mistral = small(MistralForCausalLM, MistralConfig)
    assert not engine.supports(mistral)
    ids = [tok.encode("abc"), tok.encode("hello")]
    assert engine.generate(mistral, ids, 6, temperature=0) == generate(mistral, ids, 6, temperature=0)
    # a RoPE that rescales with the length at each forward (here past 32 positions) has no fixed cos / sin table
    dynamic = small(LlamaForCausalLM, LlamaConfig, max_position_embeddings=32,
                    rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert not engine.supports(dynamic) and engine.supports(small(LlamaForCausalLM, LlamaConfig))
    ids = [tok.encode("abcdefghijklmnopqrst"), tok.encode("hi")]
    assert engine.generate(dynamic, ids, 40, temperature=0) == generate(dynamic, ids, 40, temperature=0)
    with pytest.raises(TypeError, match="engine"):  # the caller picks a sampler: the reference takes no engine
        generate(mistral, ids, 6, engine="vllm")


@pytest.mark.parametrize("make", [lambda: tiny_model("qwen3"), lambda: tiny_model("llama"),
                                  lambda: small(Qwen2ForCausalLM, Qwen2Config),  # q / k / v biases
                                  lambda: small(LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True)])
def test_fused_projections_compute_what_the_modules_compute(make, tok):
    model, fused = make().eval(), make().eval()  # the same seed: the same weights
    engine.fuse(fused)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    # the modules' weights (and biases) are views into the joined ones: no weight twice, the state dict as it was
    assert attn.k_proj.weight.data_ptr() == attn.qkv[0][attn.q_proj.out_features].data_ptr()
    assert attn.v_proj.weight.data_ptr() == attn.qkv[0][-attn.v_proj.out_features].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up[0][mlp.gate_proj.out_features].data_ptr()
    if attn.k_proj.bias is not None:
        assert attn.k_proj.bias.data_ptr() == attn.qkv[1][attn.q_proj.out_features].data_ptr()
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    state, expected = fused.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
    with torch.no_grad():  # HF's forward (the prefill) reads the same numbers through the views
        assert torch.equal(fused(torch.tensor([list(range(1, 40))])).logits, model(torch.tensor([list(range(1, 40))])).logits)
    ids = [tok.encode(t) for t in PROMPTS]
    assert engine.generate(fused, ids, 16, temperature=0, max_rows=3) == hf_greedy(model, tok, PROMPTS, 16)
    assert hasattr(attn, "qkv") and hasattr(mlp, "gate_up")  # still joined after a generate call


def test_a_fused_model_recast_after_runs_its_modules_weights(tok):
    # .double() gives every weight a new tensor: the joined float32 weights are stale, and dropped
    model = tiny_model("qwen3").eval()
    engine.fuse(model)
    model.double()
    ids = [tok.encode(t) for t in PROMPTS]
    assert engine.generate(model, ids, 12, temperature=0) == generate_eager(model, ids, 12, temperature=0)
    layer = model.model.layers[0]
    assert not hasattr(layer.self_attn, "qkv") and not hasattr(layer.mlp, "gate_up")


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate():
    model, tokenizer = load_model("smollm2")
    texts = ["What is 7 + 5?", "Name a colour."]
    ids = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                          add_generation_prompt=True), add_special_tokens=False)
           for t in texts]
    ours = engine.generate(model, ids, 20, n=2, temperature=0, stop_ids=[2], max_rows=3, check_every=3)
    for i, p in enumerate(ids):
        ref = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
        assert ours[2 * i] == ours[2 * i + 1] == ref[: len(ours[2 * i])]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_layers_and_sampler_compute_the_eager_step(model, tok, fused, monkeypatch):
    # engine.COMPILE: each layer's step and the sampler through torch.compile (Inductor, here its CPU code) give
    # the logits of the eager step and the same greedy and sampled tokens, with slots refilled and row counts
    # changing (dynamic shapes); also with fuse()'s joined weights, as the loop runs its sampling copy
    from torch._dynamo.utils import counters
    if fused:
        model = copy.deepcopy(model)
        engine.fuse(model)
    ids = [tok.encode(t) for t in PROMPTS]
    slots = engine.Slots(model, 3, 48, 1, torch.float32, torch.device("cpu"))
    slots.tok.random_(200, generator=torch.Generator().manual_seed(0))
    slots.pos[:] = torch.tensor([5, 17, 30])
    with torch.no_grad():
        eager_logits = engine.step_logits(model, slots, 3, 32)
        seeded = lambda: dict(n=2, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(0))
        eager = engine.generate(model, ids, 16, temperature=0, max_rows=3)
        eager_sampled = engine.generate(model, ids, 16, max_rows=3, **seeded())
        monkeypatch.setattr(engine, "COMPILE", True)
        compiled_logits = engine.step_logits(model, slots, 3, 32)
        assert engine.generate(model, ids, 16, temperature=0, max_rows=3) == eager
        assert engine.generate(model, ids, 16, max_rows=3, **seeded()) == eager_sampled
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] > 0  # Inductor really ran


def test_stats_count_the_decode_steps_and_rows(model, tok):
    # with a look every step, each live row of a step gets one token there (its first came from the prefill)
    ids = [tok.encode(t) for t in PROMPTS]
    stats = {}
    out = engine.generate(model, ids, 12, n=2, temperature=0, stop_ids=[7, 100], max_rows=3, stats=stats)
    assert stats["live_rows"] == sum(len(r) - 1 for r in out) and stats["steps"] >= max(map(len, out)) - 1
    assert stats["live_rows"] <= stats["bucket_rows"] <= 3 * stats["steps"]
    assert stats["prefill_s"] > 0 and stats["graphs"] == 0 and "capture_s" not in stats  # the CPU: no graphs
    assert out == engine.generate(model, ids, 12, n=2, temperature=0, stop_ids=[7, 100], max_rows=3)


@pytest.mark.parametrize("block", [16, 128])
def test_the_flex_mask_reads_each_rows_columns_and_skips_the_blocks_past_them(block, monkeypatch):
    # the block structure is what the compiled kernel skips by (the CPU's uncompiled flex reads only mask_mod):
    # a row at position p reads blocks 0..p // block, and inside them columns 0..p
    monkeypatch.setattr(engine, "FLEX_BLOCK", block)
    pos, length = torch.tensor([0, 15, 16, 40, 127, 128, 200]), 208
    mask = engine.flex_mask(pos, length)
    blocks = mask.to_dense()[:, 0, 0]  # (b, blocks): 1 where the row reads the block
    n = -(-length // block)
    assert blocks.shape == (len(pos), n)
    assert blocks.tolist() == [[int(j <= p // block) for j in range(n)] for p in pos.tolist()]
    cols = torch.arange(length)
    seen = blocks.repeat_interleave(block, -1)[:, :length].bool() & mask.mask_mod(
        torch.arange(len(pos))[:, None], 0, 0, cols[None])
    assert torch.equal(seen, cols[None] <= pos[:, None])
    engine.flex_mask(pos.to("meta"), length)  # built from shapes alone: no value read on the host (a CUDA graph's need)
