"""
Tests for scripts/bench.py: the no-cache baseline decodes what the engine decodes, the brute-force kNN finds what
the blocked one finds, a tiny run writes every workload, a tiny run beside the peers (HF transformers, TRL) gives
every comparison its numbers, and the load rule refuses ratios from measurements under different load.
"""

import json

import pytest
import torch

from nanochat import density
from nanochat.engine import Engine
from scripts import bench, bench_peers

TINY = ["--depth=1", "--vocab_size=300", "--seq_len=32", "--train_warmup=1", "--train_steps=2", "--gen_batches=1,2",
        "--new_tokens=6", "--naive_new_tokens=3", "--pairs=4", "--pair_device_batch_size=2", "--pair_steps=2",
        "--rm_len=8", "--dpo_prompt_len=4", "--dpo_reply_len=5", "--grpo_prompts=2", "--grpo_samples=4",
        "--grpo_prompt_len=4", "--grpo_new_tokens=5", "--grpo_device_batch_size=4", "--grpo_steps=2", "--threads=1"]


def run_bench(flags):
    threads = torch.get_num_threads()  # main sets it for the whole process: give the other tests theirs back
    try:
        bench.main(flags)
    finally:
        torch.set_num_threads(threads)


def test_naive_generate_matches_engine_greedy(tiny_model):
    prompts = torch.randint(0, tiny_model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    cached = Engine(tiny_model).generate(prompts.tolist(), max_new_tokens=10, temperature=0.0).tokens
    assert torch.equal(bench.naive_generate(tiny_model, prompts, 10), cached)


def test_brute_force_knn_matches_blocked():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(4))
    brute_dist, brute_idx = bench.brute_force_knn(x, 5)
    dist, idx = density.knn(x, 5, block_size=32)
    assert torch.equal(idx, brute_idx) and torch.allclose(dist, brute_dist, atol=1e-6)


def test_tiny_run_writes_every_workload(tmp_path):
    out = tmp_path / "bench.json"
    run_bench(TINY + ["--opt_seconds=0.5", "--opt_vocab_size=300", "--opt_seq_len=32", "--opt_batch_rows=4",
                      "--opt_docs=200", "--opt_heldout_docs=20", "--autodeco_runs=2", "--repeats=2", "--peers=False",
                      # 3 tasks: one of each domain, so code answers run their tests in the sandbox
                      "--workflow_tasks=3", "--workflow_new_tokens=8", "--workflow_executor_tokens=8",
                      "--workflow_vocab_size=300", "--workflow_runs=2",
                      # brute force at N=500 needs 0.0014 GiB: over budget, so both run at 200 and blocked at 500
                      "--density_n=500", "--density_brute_n=200", "--brute_max_gib=0.001",
                      "--density_block_size=64", f"--out={out}"])
    results = json.loads(out.read_text())
    assert results["environment"]["threads"] == 1
    # without peers every comparison says how to install them instead of quoting a ratio
    for workload in bench.PEER_WORKLOADS:
        r = results[workload]
        assert r["peers"] == bench.INSTALL_PEERS and set(r["memory"]) == {"ours"}
        for c in r["comparisons"].values():
            assert c["speedup"] is None and c["not_quoted"] == bench.INSTALL_PEERS
            assert len(c["ours"]["values"]) == 2 and c["ours"]["min"] <= c["ours"]["median"] <= c["ours"]["max"]
    # every workload ran in a process of its own: its peak RSS is reported and counts at least its model
    for workload in bench.WORKLOADS:
        memory = results[workload]["memory"]
        memory = memory.get("ours", memory)
        assert memory["peak_rss_bytes"] >= memory["rss_start_bytes"] > 0
    flops = results["train"]["flops"]
    assert 0 < flops["achieved"]["adamw"] and flops["matmul_peak"] > 0
    # the rm, dpo and grpo-training FLOP/s: counted FLOPs over the rate of the step that was counted (rm's adamw
    # one, not muon's; grpo's training part, not the whole step)
    for name, label in (("rm", "rm adamw"), ("dpo", "dpo")):
        r = results[name]
        step_seconds = r["pairs"] / r["comparisons"][label]["ours"]["median"]
        assert r["flops"]["achieved"] == pytest.approx(r["flops_per_step"] / step_seconds) and r["flops_per_step"] > 0
    grpo = results["grpo"]
    assert grpo["flops"]["achieved"] == pytest.approx(grpo["train_flops_per_step"] / grpo["median_seconds"]["train"])
    for name in bench.OPTIMIZERS:
        assert results["train"][name]["tokens_per_s"] > 0
        assert results["optimizers"][name]["steps"] >= 1
        assert results["optimizers"][name]["heldout_loss"] > 0
        assert results["rm"][name]["pairs_per_s"] > 0 and len(results["rm"][name]["step_seconds"]) == 2
    assert set(results["generate"]["batches"]) == {"1", "2"}
    assert results["generate"]["naive_new_tokens"] == 3
    assert results["optimizers"]["winner"] in bench.OPTIMIZERS
    assert results["dpo"]["pairs_per_s"] > 0 and results["dpo"]["pairs_per_s_median_step"] > 0
    grpo = results["grpo"]
    assert set(grpo["median_seconds"]) == {"generate", "score", "train", "total"}
    assert all(len(seconds) == 2 for seconds in grpo["step_seconds"].values())
    assert grpo["median_seconds"]["total"] >= grpo["median_seconds"]["generate"] > 0
    autodeco = results["autodeco"]["batches"]
    assert set(autodeco) == {"1", "2"}
    assert all(b["plain"]["overhead"] == 0 and b["temperature head"]["median_seconds"] > 0 for b in autodeco.values())
    workflow = results["workflow"]
    assert workflow["domains"] == {"math": 1, "qa": 1, "code": 1} and workflow["samples"] == bench.WORKFLOW_GROUP
    assert set(workflow["median_seconds"]) == {"sampling", "execution", "training", "update"}
    assert all(len(seconds) == 2 for seconds in workflow["run_seconds"].values())
    assert all(workflow["median_seconds"][part] > 0 for part in bench.WORKFLOW_PARTS)
    assert abs(sum(workflow["share"].values()) - 1) < 1e-9
    assert abs(workflow["step_seconds"] - sum(workflow["median_seconds"][p] for p in bench.WORKFLOW_PARTS)) < 1e-9
    per_step = workflow["per_step"]
    assert per_step["executor_calls"] >= 1 and per_step["executor_prompts"] >= 3 * bench.WORKFLOW_GROUP
    assert per_step["sandbox_runs"] >= 1
    d = results["density"]
    assert [(r["method"], r["n"]) for r in d["runs"]] == [("blocked", 200), ("blocked", 500), ("brute", 200)]
    assert all(r["seconds"] > 0 and r["peak_extra_bytes"] >= 0 for r in d["runs"])
    assert d["compared_at_n"] == 200 and d["identical"] is True and "N=500" in d["brute_skipped"]


@pytest.mark.skipif(bench_peers.MISSING is not None,
                    reason=f"peers not installed ({bench_peers.MISSING}): pip install -e '.[peers]'")
def test_tiny_run_beside_the_peers(tmp_path):
    out = tmp_path / "bench.json"
    run_bench(TINY + ["--only=train,generate,rm,dpo,grpo", "--repeats=1", f"--out={out}"])
    results = json.loads(out.read_text())
    expected = {"train": {"train muon", "train adamw"}, "generate": {"generate b1", "generate b2"},
                "rm": {"rm muon", "rm adamw"}, "dpo": {"dpo"}, "grpo": {"grpo"}}
    for workload, labels in expected.items():
        r = results[workload]
        assert set(r["comparisons"]) == labels
        for c in r["comparisons"].values():
            assert c["ours"]["median"] > 0 and c["peer"]["median"] > 0
            # a ratio or the load rule's reason, never neither: a silent gap would read as "no peer"
            assert (c["speedup"] is None) != (c["not_quoted"] is None)
        # every peer ran in its own process too
        assert all(m["peak_rss_bytes"] > 0 for m in r["memory"].values()) and len(r["memory"]) > 1
    assert results["grpo"]["runs"]["trl"][0]["micro_batch_rows"] == 8  # TRL's default
    assert results["train"]["flops"]["achieved"]["hf"] > 0


QUIET = [(1.0, 1.1), (1.1, 1.2)]


def test_load_rule_quotes_the_ratio_of_medians_the_right_way_round():
    # catches an inverted ratio: ours twice as fast must read 2x for a rate and for seconds alike
    rate = bench.compare([20.0, 10.0, 30.0], [10.0, 5.0, 15.0], QUIET, QUIET, threads=2, higher_is_better=True)
    assert rate["speedup"] == 2 and rate["not_quoted"] is None
    seconds = bench.compare([1.0, 2.0, 3.0], [4.0, 5.0, 4.0], QUIET, QUIET, threads=2, higher_is_better=False)
    assert seconds["speedup"] == 2  # peer median 4 s / ours 2 s
    # catches a ratio of means instead of medians: one slow outlier must not move it
    outlier = bench.compare([20.0, 20.0, 1.0], [10.0, 10.0, 10.0], QUIET, QUIET, threads=2, higher_is_better=True)
    assert outlier["speedup"] == 2 and outlier["ours"]["min"] == 1.0


def test_noise_flag_reads_each_repeats_own_pair_of_measurements():
    # catches unpaired noise: the sides' spreads here are wide (the machine sped up between repeats) but each repeat
    # ran ours and the peer back to back and both gave 2x, so nothing is noisy; a flag from min/max of the sides
    # (10/15 to 30/5) would cry wolf. And catches a flag that never fires: a repeat at 1.5x against 2x is noisy
    steady = bench.compare([10.0, 20.0, 30.0], [5.0, 10.0, 15.0], QUIET, QUIET, threads=2, higher_is_better=True)
    assert steady["repeat_speedups"] == [2.0, 2.0, 2.0] and steady["noisy"] is None
    shaky = bench.compare([3.0, 4.0, 4.5], [2.0, 2.0, 2.0], QUIET, QUIET, threads=2, higher_is_better=True)
    assert shaky["speedup"] == 2 and shaky["noisy"].startswith("noisy: repeats 1.50-2.25x")
    # seconds: the peer's over ours, repeat by repeat
    seconds = bench.compare([1.0, 2.0], [2.0, 4.4], QUIET, QUIET, threads=2, higher_is_better=False)
    assert seconds["repeat_speedups"] == [2.0, 2.2] and seconds["noisy"] is None


def test_load_rule_refuses_measurements_under_different_load():
    # catches quoting a ratio when ours ran on a quiet machine and the peer on a busy one (or the other way round)
    busy = [(1.8, 1.9), (1.9, 1.9)]
    c = bench.compare([20.0], [10.0], QUIET, busy, threads=2, higher_is_better=True)
    assert c["speedup"] is None and c["not_quoted"].startswith("not quoted: load 1.10 (ours) vs 1.88 (peer)")
    # within the tolerance both ways: quoted
    assert bench.load_verdict(QUIET, [(1.4, 1.5)], threads=2) is None
    # catches only checking the load before each measurement: it rose during the peer's
    assert bench.load_verdict(QUIET, [(1.1, 2.6)], threads=2).startswith("not quoted: load 2.60 > 2 threads")
    # catches a rule that only compares the two sides: both under the same heavy load is still refused
    heavy = [(3.0, 3.1)]
    assert bench.load_verdict(heavy, heavy, threads=2).startswith("not quoted: load 3.10 > 2 threads + 0.5")
