"""The benchmark: its memory floor and stop rate against hand-worked numbers, one tiny CPU run end to end."""

import json

import pytest

import bench


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


def test_main_on_tiny_model(tmp_path):
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
    for r in results:
        assert r["rows"] == 4 and r["tok_s"] > 0 and 0 < r["mfu"] and 0 <= r["pad_share"] < 0.5
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
])
def test_options_out_of_range_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:  # before any model is loaded or anything is timed
        bench.main(["--model", "tiny", "--max-new", "2", *argv])
    said = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.splitlines()[-1]
    assert message in said
