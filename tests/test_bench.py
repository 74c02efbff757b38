"""
Tests for scripts/bench.py: the no-cache baseline decodes what the engine decodes, the brute-force kNN finds what
the blocked one finds, and a tiny run writes every workload.
"""

import json

import torch

from nanochat import density
from nanochat.engine import Engine
from scripts import bench


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
    threads = torch.get_num_threads()  # main sets it for the whole process: give the other tests theirs back
    try:
        bench.main(["--depth=1", "--vocab_size=300", "--seq_len=32", "--train_warmup=1", "--train_steps=2",
                    "--gen_batches=1,2", "--new_tokens=6", "--naive_new_tokens=3", "--opt_seconds=0.5",
                    "--opt_vocab_size=300", "--opt_seq_len=32", "--opt_batch_rows=4", "--opt_docs=200",
                    "--opt_heldout_docs=20", "--pairs=3", "--pair_device_batch_size=2", "--pair_steps=2",
                    "--rm_len=8", "--dpo_prompt_len=4", "--dpo_reply_len=5", "--grpo_prompts=2", "--grpo_samples=3",
                    "--grpo_prompt_len=4", "--grpo_new_tokens=5", "--grpo_device_batch_size=4", "--grpo_steps=2",
                    "--autodeco_runs=2",
                    # 3 tasks: one of each domain, so code answers run their tests in the sandbox
                    "--workflow_tasks=3", "--workflow_new_tokens=8", "--workflow_executor_tokens=8",
                    "--workflow_vocab_size=300", "--workflow_runs=2",
                    # brute force at N=500 needs 0.0014 GiB: over budget, so both run at 200 and blocked at 500
                    "--density_n=500", "--density_brute_n=200", "--brute_max_gib=0.001", "--density_block_size=64",
                    "--threads=1", f"--out={out}"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert results["environment"]["threads"] == 1
    assert results["train"]["reference_hf_gpt2_tokens_per_s"] is None  # not the reference size
    for name in bench.OPTIMIZERS:
        assert results["train"][name]["tokens_per_s"] > 0
        assert results["optimizers"][name]["steps"] >= 1
        assert results["optimizers"][name]["heldout_loss"] > 0
        assert results["rm"][name]["pairs_per_s"] > 0 and len(results["rm"][name]["step_seconds"]) == 2
    assert set(results["generate"]["batches"]) == {"1", "2"}
    assert results["generate"]["naive_new_tokens"] == 3
    assert results["optimizers"]["winner"] in bench.OPTIMIZERS
    assert results["rm"]["reference_trl_reward_trainer_pairs_per_s"] is None
    assert results["dpo"]["pairs_per_s"] > 0 and results["dpo"]["pairs_per_s_median_step"] > 0
    assert results["dpo"]["reference_trl_dpo_trainer_pairs_per_s"] is None
    grpo = results["grpo"]
    assert set(grpo["median_seconds"]) == {"generate", "score", "train", "total"}
    assert all(len(seconds) == 2 for seconds in grpo["step_seconds"].values())
    assert grpo["median_seconds"]["total"] >= grpo["median_seconds"]["generate"] > 0
    assert grpo["reference_trl_grpo_trainer_seconds_per_step"] is None
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
