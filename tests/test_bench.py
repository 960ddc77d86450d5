"""The benchmark: its memory floor and stop rate against hand-worked numbers, one tiny CPU run end to end."""

import json
import types

import pytest
import torch

import bench
import engine
from models import tiny_model


# 4 one-token prompts x 2 samples, up to 8 new tokens, stop id 9, 4 rows (2 prompts' samples) in flight
FOUR_BY_TWO = bench.Case("ragged", [[1], [2], [3], [4]], 2, 8, (9,), max_rows=4)


def test_floor_seconds_by_hand():
    # rows (L=3, k=2) and (L=5, k=1): K+V tokens read = (3 + 4) + 5 = 12; 2 rows in flight, 3 tokens:
    # ceil(3 / 2) = 2 steps of weights. (100 * 2 + 10 * 12) / 1000 = 0.32 s
    assert bench.decode_steps([2, 1], 2) == 2
    floor = bench.floor_seconds([2, 1], [3, 5], w_bytes=100, kv_bytes=10, rows_in_flight=2, bandwidth=1000)
    assert floor == pytest.approx(0.32)


def test_stop_fraction():
    assert bench.stop_fraction(500, 10**7) == pytest.approx(1 / 500, rel=1e-6)  # no cut: the mean is 1/p
    assert bench.stop_fraction(1.5, 2) == pytest.approx(0.5, rel=1e-6)  # 1 + (1 - p) = 1.5
    # the paper-shaped case: (1 - (1-p)^1024) / p is 503.7 at p = 0.0016 and 498.1 at p = 0.00163
    assert 0.0016 < bench.stop_fraction(500, 1024) < 0.00163


def test_weight_bytes_leaves_out_an_untied_input_embedding():
    # a step reads the whole output matrix, but only B rows of an input embedding that is not the same one
    from transformers import LlamaConfig, LlamaForCausalLM
    tied = tiny_model("llama")
    assert bench.weight_bytes(tied) == sum(p.nbytes for p in tied.parameters())
    untied = LlamaForCausalLM(LlamaConfig(**{**tied.config.to_dict(), "tie_word_embeddings": False}))
    assert bench.weight_bytes(untied) == sum(p.nbytes for p in untied.parameters()) - 259 * 64 * 4


def test_the_rates_count_the_bytes_read_and_written_and_two_flops_a_multiply_add(monkeypatch):
    monkeypatch.setattr(bench, "timed", lambda fn, device: (2.0, None))  # every round "took" 2 s
    assert bench.copy_bandwidth("cpu", reps=10) == 2 * 2**28 * 10 / 2.0  # 256 MiB read and written 10 times
    assert bench.matmul_rate("cpu", torch.float32) == 2 * 1024**3 * 3 / 2.0  # 3 products of 1024 x 1024 matrices


def test_hf_generate_cuts_each_row_after_its_first_stop_and_forces_the_length_without_stops():
    calls = []

    def generate(**kw):  # the prompts, then these new tokens
        calls.append(kw)
        return torch.cat([kw["input_ids"], torch.tensor([[5, 7, 9, 7], [6, 6, 6, 6]])], 1)

    model = types.SimpleNamespace(device=torch.device("cpu"), generate=generate)
    assert bench.hf_generate(model, [[1, 2], [3]], 4, 1, (7,), 0, seed=0) == [[5, 7], [6, 6, 6, 6]]
    assert calls[0]["input_ids"].tolist() == [[1, 2], [0, 3]]
    assert calls[0]["attention_mask"].tolist() == [[1, 1], [0, 1]] and calls[0]["eos_token_id"] == [7]
    assert "min_new_tokens" not in calls[0] and "cache_implementation" not in calls[0]
    assert bench.hf_generate(model, [[1, 2], [3]], 4, 1, (), 0, seed=0, static=True) == [[5, 7, 9, 7], [6, 6, 6, 6]]
    assert calls[1]["eos_token_id"] is None and calls[1]["min_new_tokens"] == 4
    assert calls[1]["cache_implementation"] == "static"


def test_hf_keeps_max_rows_in_flight_by_calling_on_fewer_prompts(monkeypatch):
    calls = []

    def hf_generate(model, prompts, max_new, n, stops, pad_id, seed, static=False):
        calls.append((len(prompts), seed, static))
        return [[p[0]] for p in prompts for _ in range(n)]

    monkeypatch.setattr(bench, "hf_generate", hf_generate)
    rows = bench.run_column("HF static+compile", None, FOUR_BY_TWO, 0, seed=10)
    assert rows == [[1], [1], [2], [2], [3], [3], [4], [4]]
    assert calls == [(2, 10, True), (2, 12, True)]  # each call its own seed


def test_the_warm_up_runs_one_in_flight_batch_of_the_case_that_stops_early(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run_column", lambda column, model, case, pad_id, seed: seen.append(case))
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=10))
    bench.warm_up_on_shapes("ours fast", model, FOUR_BY_TWO, 0, "cpu")
    assert [(c.prompts, c.n, c.max_new, c.stops, c.max_rows) for c in seen] == [([[1], [2]], 2, 8, (0, 2, 4, 6, 8), 4)]


def test_measure_by_hand(monkeypatch):
    # prompts of 3 and 5 tokens, 2 samples each, 2 rows in flight; rows (prompt-major) of 1, 2, 4 and 4 new tokens
    case = bench.Case("c", [[1, 2, 3], [4, 5, 6, 7, 8]], 2, 4, (9,), max_rows=2)

    def run_column(column, model, case, pad_id, seed, stats=None):
        stats.update(prefill_s=0.5, capture_s=0.25, steps=5, graphs=1, live_rows=8, bucket_rows=10)
        return [[1], [1, 9], [1, 1, 1, 9], [1, 1, 1, 1]]

    monkeypatch.setattr(bench, "run_column", run_column)
    monkeypatch.setattr(bench, "warm_up_on_shapes", lambda *args: 1.0)
    monkeypatch.setattr(bench, "timed", lambda fn, device: (2.0, fn()))  # the call "took" 2 s
    r = bench.measure("ours fast", None, case, 0, 0, w_bytes=100, kv_bytes=10, bandwidth=1000, device="cpu")
    # 11 new tokens, ceil(11 / 2) = 6 steps; K+V tokens read: 3 + (3 + 4) + (5 + 6 + 7 + 8) x 2 = 62;
    # floor (100 x 6 + 10 x 62) / 1000 = 1.22 s of the 2 s, and of the 2 - 0.5 - 0.25 = 1.25 s of decoding
    assert (r["rows"], r["prompt_len"], r["mean_new"], r["decode_steps"], r["warm_up_s"]) == (4, 5, 2.75, 6, 1.0)
    assert r["tok_s"] == 5.5 and r["ms_step"] == pytest.approx(1000 * 2 / 6) and r["floor_share"] == pytest.approx(0.61)
    assert r["engine"]["decode_ms_step"] == pytest.approx(250) and r["engine"]["decode_floor_share"] == pytest.approx(
        1.22 / 1.25)


def test_random_cases_have_the_shapes_the_top_of_bench_gives():
    cases = bench.random_cases(10000, [2, 3], "equal,ragged", None, seed=0)
    shape = lambda c: (c.name, len(c.prompts), c.n, c.max_new, c.max_rows)
    assert [shape(c) for c in cases] == [("equal-2", 2, 1, 256, None), ("equal-3", 3, 1, 256, None),
                                         ("ragged 32x16", 32, 16, 1024, 256)]
    assert {len(p) for c in cases for p in c.prompts} == {250} and cases[0].stops == cases[1].stops == ()
    # ~500 new tokens a row: round(p V) stop ids, p from stop_fraction (16 of 10000)
    stops = cases[2].stops
    assert len(set(stops)) == len(stops) == round(bench.stop_fraction(500, 1024) * 10000) == 16
    # a smoke run's max_new of 64: rows stop after ~32 tokens, half of it
    short = bench.random_cases(10000, [2], "ragged", 64, seed=0)
    assert len(short) == 1 and len(short[0].stops) == round(bench.stop_fraction(32, 64) * 10000)


def test_paper_rows_follow_the_shape_they_are_asked_for():
    batch, P, C = bench.paper_rows(8, 40, 80, 100, vocab=50, seed=3)
    again = bench.paper_rows(8, 40, 80, 100, vocab=50, seed=3)
    assert torch.equal(batch.input_ids, again[0].input_ids) and (P, C) == (again[1], again[2])  # from the seed alone
    # prompts 40 +- 40%, completions from 20 to 140 cut at 100; half the rows view 1
    assert all(24 <= p <= 56 for p in P) and all(20 <= c <= 100 for c in C) and max(C) == 100
    assert batch.views.tolist() == [0] * 4 + [1] * 4
    assert batch.attention_mask.sum(1).tolist() == [p + c for p, c in zip(P, C)]
    assert batch.completion_mask.sum(1).tolist() == C


def test_main_on_tiny_model(tmp_path, monkeypatch):
    real, calls = bench.run_column, []
    monkeypatch.setattr(bench, "run_column", lambda column, model, case, *a, **k: calls.append((column, case.name))
                        or real(column, model, case, *a, **k))
    path = tmp_path / "bench.json"
    results = bench.main(["--model", "tiny", "--batches", "2", "--cases", "equal,ragged", "--max-new", "4",
                          "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["results"] == results and out["bandwidth"] > 0 and out["device"] == "cpu"
    got = {(r["case"], r["column"]): r for r in out["results"]}
    cpu_columns = ["HF dynamic", "ours eager", "ours fast"]  # no static+compile off CUDA
    assert sorted(got) == sorted((case, c) for case in ["equal-2", "ragged 8x16"] for c in cpu_columns)
    for r in got.values():
        assert r["tok_s"] > 0 and r["ms_step"] > 0 and 0 < r["floor_share"] <= 1.5
    assert all(got["equal-2", c]["mean_new"] == 4 for c in cpu_columns)  # forced length
    assert got["ragged 8x16", "ours eager"]["rows"] == 128
    # the columns without shapes to compile for pay their one-off costs on a small call first
    assert calls[:2] == [("ours eager", "warm-up"), ("HF dynamic", "warm-up")] and calls[2] == ("ours fast", "equal-2")


def test_quick_runs_each_slow_column_on_one_case():
    prompts = [[1, 2, 3]] * 32
    equal = lambda b: bench.Case(f"equal-{b}", prompts[:1] * b, 1, 256)
    ragged = bench.Case("ragged 32x16", prompts, 16, 1024, (5,), max_rows=256)
    run = lambda case: bench.columns_to_run(case, gpu=True, quick=True)
    assert run(equal(64)) == run(equal(512)) == {"ours fast"}
    assert run(equal(256)) == {"ours fast", "ours eager", "HF dynamic"}
    assert run(ragged) == {"ours fast", "HF static+compile"}
    assert bench.columns_to_run(ragged, gpu=False, quick=False) == {"ours fast", "ours eager", "HF dynamic"}
    # HF times one of its two calls of 16 prompts x 16 samples; the engines the whole case
    assert len(bench.quick_share(ragged, "HF static+compile", True).prompts) == 16
    assert bench.quick_share(ragged, "ours fast", True) is ragged and bench.quick_share(ragged, "HF dynamic", False) is ragged


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.slow
def test_decode_step_variants_time_every_variant_of_the_same_step():
    # each attention, on rows at one position and on rows spread over positions, computes the step the
    # engine computes; and the variants put the tokens, positions and engine's switches back
    model = tiny_model("qwen3")
    engine.fuse(model)
    with torch.no_grad():
        results = bench.decode_step_variants(model, 4, 32)
    assert [(r["rows"], r["name"]) for r in results] == [
        ("equal", "sdpa attention"), ("equal", "matmul attention"), ("equal", "flex attention"),
        ("equal", "argmax, no sampling"), ("equal", "HF's RMSNorm modules"), ("equal", "unfused projections"),
        ("equal", "torch.compile"),
        ("spread", "sdpa attention"), ("spread", "matmul attention"), ("spread", "flex attention")]
    assert all(r["diff"] < 1e-5 and r["ms"] > 0 for r in results)
    assert results[3]["diff"] == results[4]["diff"] == 0  # the same attention: the same numbers


    assert engine.ATTENTION is None and engine.FUSED and not engine.COMPILE and engine.norm.__module__ == "engine"


def test_a_decode_step_variant_that_fails_is_one_line_and_the_others_run(monkeypatch, capsys):
    # as --compile's flex variant fails under Inductor's CPU code: the other variants are still timed
    model = tiny_model("qwen3")
    monkeypatch.setattr(engine, "compiled", lambda fn: fn)  # the torch.compile variant runs eagerly here

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(engine, "flex", no_kernel)
    with torch.no_grad():
        results = bench.decode_step_variants(model, 2, 16)
    names = [(r["rows"], r["name"]) for r in results]
    assert len(names) == 7 and ("equal", "matmul attention") in names and ("spread", "sdpa attention") in names
    assert not [name for _, name in names if "flex" in name]
    assert capsys.readouterr().out.count("flex attention: failed (RuntimeError: no kernel)") == 2
    assert engine.ATTENTION is None and not engine.COMPILE  # the switches put back after the failing variant


def test_update_flops_by_hand():
    from types import SimpleNamespace
    config = SimpleNamespace(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, head_dim=2,
                             num_key_value_heads=1, intermediate_size=8, vocab_size=10)
    # matmul weights: q k v 4 x (4 + 2 + 2) + o 4 x 4 + mlp 3 x 4 x 8 = 144. One row of 2 + 1 tokens:
    # 2 x 144 x 3 + attention 4 x 4 x (1 + 2 + 3 keys) + logits 2 x 4 x 10 x 1 = 1040 a forward; x 4 with the
    # reference
    assert bench.update_flops(config, [2], [1]) == 4 * 1040
    assert bench.update_flops(config, [2], [1], kl=False) == 3 * 1040


def test_update_benchmark_on_the_tiny_model(tmp_path, capsys):
    path = tmp_path / "update.json"
    results = bench.main(["--update", "--model", "tiny", "--rows", "4", "--micro-batch-tokens", "128",
                          "--json", str(path), "--profile", "--checkpointing", "1,0,2"])
    assert [r["checkpointing"] for r in results] == [1, 0, 2]
    # each setting profiled again on 2 rows: the step's ops by time (on CUDA: its kernels)
    out = capsys.readouterr().out
    assert out.count("profiled on 2 rows") == 3 and "checkpointing every 2:" in out
    _, P, C = bench.paper_rows(4, 40, 80, 128, 259, seed=0)  # the CPU's rows: the tokens are theirs, no padding
    for r in results:
        assert r["rows"] == 4 and r["tok_s"] > 0 and 0 < r["mfu"] and 0 <= r["pad_share"] < 0.5
        assert r["tokens"] == sum(P) + sum(C)
    # checkpointing keeps fewer activations, every other layer too
    estimate = [r["activations_estimate_gib"] for r in results]
    assert estimate[0] < estimate[1] and estimate[2] < estimate[1]
    assert json.loads(path.read_text())["results"] == results


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0"], "argument --batches: must be an integer >= 1, not 0"),
    (["--batches", "8,x"], "argument --batches: must be an integer, not 'x'"),
    (["--max-new", "-3"], "argument --max-new: must be an integer >= 1, not -3"),
    (["--update", "--rows", "0"], "argument --rows: must be an integer >= 1, not 0"),
    (["--update", "--micro-batch-tokens", "-1"], "argument --micro-batch-tokens: must be an integer >= 0, not -1"),
    (["--update", "--checkpointing", "1,-2"], "argument --checkpointing: must be an integer >= 0, not -2"),
    (["--columns", "ours fast,bogus"], "unknown --columns 'bogus': use any of 'ours fast', 'ours eager', "),
    (["--decode-step", "256"], "argument --decode-step: must be 2 comma-separated integers, not '256'"),
    (["--decode-step", "0,512"], "argument --decode-step: must be an integer >= 1, not 0"),
])
def test_options_out_of_range_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:  # before any model is loaded or anything is timed
        bench.main(["--model", "tiny", "--max-new", "2", *argv])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.splitlines()[-1]
    assert message in said
