"""scale.py: the sampling copy, the memory plan and budgets, checkpointing and compiled layers, AdamW's
state up front, and torchrun: gloo ranks and FSDP2 against one process with the whole batch."""
import copy
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import engine
import grpo
import scale
import selfharmony
from grpo import accumulate_gradients, make_optimizer
from models import cast_weights, load_model, random_model, tiny_model
from sample import generate_eager
from scale import (allocate_state, default_kv_budget_gb, kv_bytes_per_token, rows_for_budget, sampling_copy,
                   sync_sampling_copy)
from test_grpo import V, rollouts_for
from test_grpo import tiny_model as grpo_model
from test_selfharmony import ROOT, TINY, final_weights, free_port, read_log


def test_the_sampling_copy_is_a_frozen_copy_unless_the_policy_itself_will_do():
    model = tiny_model()
    assert sampling_copy(model, torch.float32) is model  # CPU float32: one copy
    for dtype, separate in ((torch.bfloat16, False), (torch.float32, True)):  # a GPU's; FSDP's whole copy
        copy = sampling_copy(model, dtype, separate)
        assert copy is not model and not copy.training and not any(p.requires_grad for p in copy.parameters())
        assert all(torch.equal(a, b.to(dtype)) and a.dtype == dtype
                   for a, b in zip(copy.parameters(), model.parameters()))


def test_kv_budget_by_hand(monkeypatch):
    model = cast_weights(random_model("qwen3-1.7b", device="meta"), torch.bfloat16)
    # K and V, 28 layers, 8 KV heads of 128, 2 bytes: 2 * 28 * 8 * 128 * 2 = 114,688 bytes a token
    assert kv_bytes_per_token(model.config, torch.bfloat16) == 114_688
    # 10 GiB over rows of 1,000 tokens, 1,008 columns in the fast engine's cache (a multiple of 16):
    # 10 * 2**30 / (114,688 * 1,008) = 92.9 -> 92 rows; never below 1
    assert rows_for_budget(model, 10, 1000) == 92 and rows_for_budget(model, 1e-6, 1000) == 1
    assert rows_for_budget(model, 10, 1008) == 92 and rows_for_budget(model, 10, 992) == 94  # 10 * 2**30 / 113,770,496
    assert default_kv_budget_gb("cpu") is None
    # on CUDA half of what is free once what is still to come is set aside: (100 - 20) / 2 = 40 GiB; at least 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 141 * 2**30))
    assert default_kv_budget_gb("cuda", reserve_gb=20) == 40 and default_kv_budget_gb("cuda:0", reserve_gb=99.5) == 1


@pytest.mark.parametrize("fused", [False, True])
def test_sampling_copy_follows_the_policy_after_an_update(tok, fused):
    # fused: the sync's in-place copies into the modules' weights land in the joined weights the step reads
    policy = tiny_model("qwen3")
    sampler = sampling_copy(policy, torch.float64)  # another dtype: a real copy, as bfloat16 on a GPU
    assert sampler is not policy and sampling_copy(policy, torch.float32) is policy
    if fused:
        engine.fuse(sampler)
    ids = [tok.encode("abc"), tok.encode("hello world")]
    before = engine.generate(sampler, ids, 16, temperature=0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    policy(torch.tensor([ids[0]]), labels=torch.tensor([ids[0]])).loss.backward()
    optimizer.step()
    expected = generate_eager(policy.double(), ids, 16, temperature=0)
    policy.float()
    assert engine.generate(sampler, ids, 16, temperature=0) == before  # stale until synced
    sync_sampling_copy(sampler, policy)
    after = engine.generate(sampler, ids, 16, temperature=0)
    assert after == expected and after != before
    assert hasattr(sampler.model.layers[0].self_attn, "qkv") == fused


def test_the_bfloat16_sampling_copy_is_what_from_pretrained_loads(tmp_path):
    # the weights are cast and the buffers kept: RoPE's frequencies stay float32, as from_pretrained(dtype=
    # bfloat16) keeps them (Module.to(bfloat16) rounds them, and far positions then rotate by other angles)
    policy = tiny_model("qwen3")
    policy.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    sampler = sampling_copy(policy, torch.bfloat16)
    tiny = load_model("tiny", dtype="bfloat16")[0]
    for model in (sampler, tiny):
        assert next(model.parameters()).dtype == torch.bfloat16
        buffers, expected = dict(model.named_buffers()), dict(loaded.named_buffers())
        assert buffers.keys() == expected.keys() and "model.rotary_emb.inv_freq" in buffers
        assert all(b.dtype == torch.float32 and torch.equal(b, expected[k]) for k, b in buffers.items())
    ids = torch.tensor([list(range(1, 250))])
    with torch.no_grad():
        assert torch.equal(sampler(ids).logits, loaded(ids).logits)
        assert not torch.equal(policy.to(torch.bfloat16)(ids).logits, loaded(ids).logits)  # what .to() gave


def test_activation_estimate_grows_with_tokens_and_shrinks_with_checkpointing():
    from scale import activation_estimate, set_checkpointing
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    logits = lambda t: 3 * min(1024, t) * V * 4
    bytes_at = activation_estimate(model)
    full = {t: bytes_at(t) - logits(t) for t in (1024, 4096)}
    # linear in tokens, and at least each layer's input (64 float32 a token) is kept
    assert 3.9 < full[4096] / full[1024] < 4.1 and full[1024] > 6 * 64 * 4 * 1024
    set_checkpointing(model, True)
    model.eval()
    kept = activation_estimate(model)(4096) - logits(4096)
    layers = model.get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers) and not model.training  # put back as it was
    assert kept < full[4096] / 2.5
    set_checkpointing(model, 2)  # layers 0, 2, 4 of 6: between the two
    half = activation_estimate(model)(4096) - logits(4096)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False] * 3
    assert kept < half < full[4096] and abs(half - (kept + full[4096]) / 2) < 0.15 * full[4096]
    # a rebuilt layer is counted when the last layer is checkpointed (backward reaches it first), not the first
    for layer, flag in zip(layers, [False, True] * 3):
        layer.gradient_checkpointing = flag
    odd = activation_estimate(model)(4096) - logits(4096)
    assert full[4096] / 12 < odd - half < full[4096] / 3  # about one layer's activations
    # three float32 logits chunks of min(chunk, tokens) x V: a micro-batch shorter than the chunk fills less
    estimate, small = activation_estimate(model), activation_estimate(model, chunk=8)
    assert estimate(8) == small(8) and estimate(100) - small(100) == 3 * (100 - 8) * V * 4


@pytest.mark.slow
def test_compiled_layers_give_the_eager_gradient_under_checkpointing():
    # compile_layers (--compile): the decoder layers through torch.compile (Inductor's CPU code here), recomputed
    # in backward by checkpointing, scored by a compiled reference too: the eager step's gradient and loss
    from scale import compile_layers, set_checkpointing
    from torch._dynamo.utils import counters
    model, ref_model = grpo_model(tie=True), grpo_model(seed=5)
    batch = rollouts_for(model)
    set_checkpointing(model, True)
    model.train()
    results, calls = [], []
    for layer in model.get_decoder().layers:  # count the layers' checkpoint calls: compiled, they still checkpoint
        layer._gradient_checkpointing_func = lambda *a, f=layer._gradient_checkpointing_func, **k: (
            calls.append(len(results)), f(*a, **k))[1]
    for compiled in (False, True):
        if compiled:
            compile_layers(model), compile_layers(ref_model)
        model.zero_grad(set_to_none=True)
        stats = accumulate_gradients(model, batch, None, ref_model, kl_coef=0.1, micro_batch_tokens=20)
        results.append((stats["loss"], [p.grad.clone() for p in model.parameters()]))
    assert counters["stats"]["unique_graphs"] > 0  # Inductor really ran
    assert calls.count(0) == calls.count(1) > 0
    assert math.isclose(results[0][0], results[1][0], rel_tol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_all_or_every_other_layer_keeps_the_gradient(every):
    from scale import set_checkpointing
    model, ref_model = grpo_model(tie=True), grpo_model(seed=5)
    batch = rollouts_for(model)
    grads = []
    for setting in (0, every):
        set_checkpointing(model, setting)
        model.train().zero_grad(set_to_none=True)
        accumulate_gradients(model, batch, 2, ref_model, kl_coef=0.1)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert [layer.gradient_checkpointing for layer in model.get_decoder().layers] == [True, every == 1]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_adamw_state_allocated_up_front_gives_a_fresh_adamws_steps():
    # allocate_state: the moments exist, as zeros, before the first step, and the weights are untouched; two
    # steps on the same gradients then give what a fresh AdamW gives, bit for bit
    a = grpo_model()
    b = copy.deepcopy(a)
    opt_a, opt_b = make_optimizer(a, lr=1e-2, weight_decay=0.1), make_optimizer(b, lr=1e-2, weight_decay=0.1)
    allocate_state(opt_a)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and not opt_b.state
    assert len(opt_a.state) == len(list(a.parameters())) and all(p.grad is None for p in a.parameters())
    assert all(s["step"] == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in opt_a.state.values())
    assert opt_a.param_groups[0]["lr"] == 1e-2
    for seed in (0, 1):
        for model, opt in ((a, opt_a), (b, opt_b)):
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_adamws_moments_are_in_memory_before_the_first_rollouts(tmp_path, monkeypatch):
    real, held = selfharmony.train_step, []

    def spy(model, policy, sampler, tokenizer, optimizer, *args, **kwargs):
        held.append(sorted(map(id, optimizer.state)) == sorted(map(id, model.parameters())))
        return real(model, policy, sampler, tokenizer, optimizer, *args, **kwargs)

    monkeypatch.setattr(selfharmony, "train_step", spy)
    selfharmony.main(TINY + ["--steps", "1", "--no-eval", "--out-dir", str(tmp_path)])
    assert held == [True]


def test_memory_plan_adds_what_stays_and_names_the_switches_when_it_will_not_fit():
    model = tiny_model()
    P = sum(p.nbytes for p in model.parameters())  # float32
    args = selfharmony.parse_args(TINY + ["--kv-cache-gb", "0.5"])
    args.micro_batch_tokens = 0
    parts = scale.resident_bytes(model, model, grpo.make_reference(model, 0.1), args, 1)
    line, fits = scale.memory_plan(parts, scale.activation_estimate(model), model, args, 1, "cpu")
    gib = lambda x: f"{x / 2**30:.1f}"
    assert fits and f"weights {gib(P)} + gradients {gib(P)} + AdamW {gib(2 * P)}" in line
    assert "the KV cache 0.5" in line and "sampling copy" not in line  # the CPU samples with the policy
    args.kv_cache_gb, args.fsdp = 1e6, True
    parts = scale.resident_bytes(model, model, None, args, 2)
    line, fits = scale.memory_plan(parts, scale.activation_estimate(model), model, args, 2, "cpu", 2**40)
    assert not fits and f"weights {gib(P / 2)}" in line  # under --fsdp, this rank's half
    assert "plus FSDP's gathered units 1024.0" in line
    # tiny: the root holds the (tied) embeddings 259 x 64 and the final norm 64; a layer 4 x 64 x 64 (q k v o: 4 heads,
    # 2 key/value heads of 16, so k and v are 64 x 32), 3 x 64 x 128 (MLP), 2 norms of 64 and q / k norms of 16;
    # float32. Root and its gradients, two layers and theirs
    root, layer = 259 * 64 + 64, 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64 + 2 * 16
    assert scale.gathered_bytes(model) == 4 * (2 * root + 4 * layer)
    assert line.endswith("It will not fit: try --grad-checkpointing (or 2, every other layer), a lower --micro-batch, "
                         "a lower --kv-cache-gb")
    for every, switch in ((2, "try --grad-checkpointing, "), (6, "try --grad-checkpointing 3, "), (1, "try a lower")):
        args.grad_checkpointing = every  # checkpointing every N-th layer: checkpoint more of them
        line, _ = scale.memory_plan(parts, scale.activation_estimate(model), model, args, 2, "cpu", 2**40)
        assert switch in line
    # the units FSDP gathers come on top of the update's activations, so they alone can make it not fit
    args.kv_cache_gb = 0.5
    assert scale.memory_plan(parts, scale.activation_estimate(model), model, args, 2, "cpu", 2**20)[1]
    assert not scale.memory_plan(parts, scale.activation_estimate(model), model, args, 2, "cpu", 2**50)[1]


def test_the_default_micro_batch_halves_until_the_estimate_fits(monkeypatch):
    # CUDA's defaults on a card (faked) that holds what stays and the activations of 4,096 tokens, not 8,192
    model, args = tiny_model(), selfharmony.parse_args(TINY)
    monkeypatch.setattr(scale, "default_kv_budget_gb", lambda device, reserve_gb: 1e-4)
    stays = sum(scale.resident_bytes(model, model, None, args, 1).values())
    activations = scale.activation_estimate(model)
    assert activations(4096) < activations(8192) and 1e-4 * 2**30 < activations(4096)
    card = types.SimpleNamespace(total_memory=stays + activations(4096))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    plan, _ = scale.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 4096 and args.kv_cache_gb == 1e-4
    assert "at 4096 tokens a micro-batch" in plan and "will not fit" not in plan
    # given, it is kept even where it will not fit, and the line says which switches to turn
    args = selfharmony.parse_args(TINY + ["--micro-batch-tokens", "8192"])
    plan, _ = scale.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 8192 and "It will not fit: try" in plan
    # a row longer than the budget is a micro-batch of its own: with rows of up to 1,024 + 3,072 tokens the
    # widest holds 4,096 whatever the budget, so halving stops there, and the plan says it will not fit
    card.total_memory = stays + activations(2048)
    args = selfharmony.parse_args(TINY + ["--max-new-tokens", "3072"])
    plan, _ = scale.set_budgets(args, model, model, None, 1, "cuda", torch.float32)
    assert args.micro_batch_tokens == 4096 and "at 4096 tokens a micro-batch" in plan
    assert "It will not fit: try --grad-checkpointing (or 2, every other layer), a lower --kv-cache-gb" in plan
    args = selfharmony.parse_args(TINY + ["--max-new-tokens", "3072", "--micro-batch-tokens", "1024"])
    assert "at 4096 tokens a micro-batch" in scale.set_budgets(args, model, model, None, 1, "cuda", torch.float32)[0]


def test_the_default_kv_budget_sets_aside_what_the_first_update_will_allocate(monkeypatch):
    # the gradients (P) and AdamW's moments (2P) come in the first update, after the first KV cache; under
    # --fsdp (2 ranks) this rank's shards of those, and of the weights and the reference, which are sharded
    # after the budget is set
    model, reserved = tiny_model(), []
    P = sum(p.nbytes for p in model.parameters())
    monkeypatch.setattr(scale, "default_kv_budget_gb", lambda device, reserve_gb: reserved.append(reserve_gb) or 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**40))
    scale.set_budgets(selfharmony.parse_args(TINY), model, model, None, 1, "cuda", torch.float32)
    args = selfharmony.parse_args(TINY + ["--fsdp"])
    scale.set_budgets(args, model, model, grpo.make_reference(model, 0.1), 2, "cuda", torch.float32)
    assert reserved == [pytest.approx(3 * P / 2**30), pytest.approx((P + 2 * P + P + P) / 2 / 2**30)]


def test_cuda_peaks_of_sampling_and_update_are_logged(tmp_path, monkeypatch):
    # peak_gib reads the allocator's peak, then starts a new count
    held = {"peak": 3 * 2**30}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=0))
    assert scale.peak_gib(torch.device("cuda")) == 3.0 and held["peak"] == 0
    assert scale.peak_gib(torch.device("cpu")) is None
    # the loop: a count started before sampling, read after it (sampling) and after the update
    calls = iter(range(100))
    monkeypatch.setattr(scale, "peak_gib", lambda device: float(next(calls)))
    selfharmony.main(TINY + ["--steps", "2", "--no-eval", "--out-dir", str(tmp_path)])
    assert [(r["mem_sample"], r["mem_update"]) for r in read_log(tmp_path)] == [(1.0, 2.0), (4.0, 5.0)]


def update_on_rows(rows, out_path, fsdp=False):
    """One grpo.step of the loop's batch layout on the given rollout rows (run under gloo or alone;
    fsdp: the model and reference sharded over the ranks, micro-batches by a token budget)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 259, (3 + i % 4,), generator=gen).tolist(),
              torch.randint(0, 259, (2 + (5 * i) % 7,), generator=gen).tolist()) for i in range(8)]
    advantages = torch.randn(8, generator=gen)
    model = tiny_model("qwen3")
    ref = grpo.make_reference(model, 0.05)
    policy = model.train()
    if fsdp:
        policy, ref = scale.shard(model), scale.shard(ref)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # weights move by the gradient itself (Adam's
    # first step is ~lr * sign(grad), which turns float noise on near-zero gradients into full steps)
    views = [0, 0, 0, 0, 1, 1, 1, 1]  # the loop's layout: view 0's rows, then view 1's
    batch = grpo.Rollouts(*grpo.pad_rollouts([pairs[i] for i in rows], pad_id=256), advantages[rows],
                          views=torch.tensor([views[i] for i in rows]))
    # no clipping: a clipped step has one norm whatever the gradient's scale, and the scale is what ranks add up
    grpo.step(policy, optimizer, batch, 2, ref, kl_coef=0.05, micro_batch_tokens=20 if fsdp else None,
              max_grad_norm=float("inf"))
    if fsdp:  # every weight back to this rank's shard, the reference's root too (it ran forward only)
        from torch.distributed.tensor import DTensor
        assert all(isinstance(p, DTensor) for m in (policy, ref) for p in m.parameters())
    weights = {k: v.full_tensor() if fsdp else v for k, v in model.state_dict().items()}
    if out_path:
        torch.save(weights, out_path)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_gloo_ranks_equal_one_process_with_the_whole_batch(tmp_path, fsdp):
    # under FSDP the ranks also run unequal numbers of micro-batches (3 rows against 5, by tokens)
    script = f"""
import os, sys, torch, torch.distributed as dist
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
from test_scale import update_on_rows
dist.init_process_group("gloo")
rank = dist.get_rank()
update_on_rows([0, 1, 2] if rank == 0 else [3, 4, 5, 6, 7], {str(tmp_path)!r} + f"/rank{{rank}}.pt", {fsdp})
dist.destroy_process_group()
"""
    (tmp_path / "ranks.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(tmp_path / "ranks.py")], check=True, env=env, cwd=tmp_path)
    whole = update_on_rows(list(range(8)), None)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(torch.allclose(got[k], whole[k], atol=1e-6) for k in whole)
    # and the unequal split really matters: one rank alone is a different update
    alone = update_on_rows([0, 1, 2], None)
    assert not all(torch.allclose(alone[k], whole[k], atol=1e-6) for k in whole)


@pytest.mark.slow
def test_compiled_layers_under_fsdp_still_checkpoint_and_give_the_eager_gradient(tmp_path):
    # the loop's order under --fsdp --compile --grad-checkpointing: shard, then compile_layers. (Compiled before,
    # the layers would skip checkpointing under transformers 5.2x: FSDP2's subclass wraps forward again.) One gloo
    # rank; the layers' checkpoint calls are counted, the gradient compared with the eager sharded step
    script = f"""
import sys, torch, torch.distributed as dist
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import grpo, scale
from test_grpo import rollouts_for, tiny_model
dist.init_process_group("gloo")
calls, grads = [], []
for compiled in (False, True):
    model, ref = tiny_model(tie=True), tiny_model(seed=5)
    batch = rollouts_for(model)
    scale.set_checkpointing(model, True)
    policy, ref_sharded = scale.shard(model.train()), scale.shard(ref)
    for layer in model.get_decoder().layers:  # count the checkpoint calls of each layer
        layer._gradient_checkpointing_func = lambda *a, f=layer._gradient_checkpointing_func, **k: (
            calls.append(compiled), f(*a, **k))[1]
    if compiled:
        scale.compile_layers(model)
    grpo.accumulate_gradients(policy, batch, None, ref_sharded, kl_coef=0.1, micro_batch_tokens=20)
    grads.append([p.grad.full_tensor() for p in model.parameters()])
assert calls.count(True) == calls.count(False) > 0, calls
assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
dist.destroy_process_group()
"""
    (tmp_path / "rank.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1"}
    subprocess.run([sys.executable, str(tmp_path / "rank.py")], check=True, env=env, cwd=tmp_path)


def torchrun(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(ROOT / "selfharmony.py")] + argv, check=True, env=env, cwd=cwd)


@pytest.mark.slow
def test_the_loop_under_fsdp_stops_resumes_and_samples_what_the_replicated_loop_samples(tmp_path):
    argv = TINY + ["--steps", "3", "--no-eval", "--device", "cpu", "--micro-batch-tokens", "64"]
    torchrun(argv + ["--out-dir", str(tmp_path / "replicated")], tmp_path)
    torchrun(argv + ["--fsdp", "--stop-after", "2", "--out-dir", str(tmp_path / "fsdp")], tmp_path)
    torchrun(argv + ["--resume", "--out-dir", str(tmp_path / "fsdp")], tmp_path)  # --fsdp from the checkpoint
    same = lambda r: {k: r[k] for k in ("step", "reward0", "reward1", "len0", "len1")}
    # the sampling copy is gathered from the shards after each update: step 2 and 3 sample the same texts
    assert [same(r) for r in read_log(tmp_path / "fsdp")] == [same(r) for r in read_log(tmp_path / "replicated")]
    a, b = final_weights(tmp_path / "replicated"), final_weights(tmp_path / "fsdp")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    with pytest.raises(SystemExit, match="made with --fsdp: resume it under torchrun"):
        selfharmony.main(argv + ["--resume", "--steps", "3", "--out-dir", str(tmp_path / "fsdp")])
