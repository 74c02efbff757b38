"""Tests for scripts/bench.py: the no-cache baseline decodes what the engine decodes, and a tiny run writes it all."""

import json

import torch

from nanochat.engine import Engine
from scripts import bench


def test_naive_generate_matches_engine_greedy(tiny_model):
    prompts = torch.randint(0, tiny_model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    cached = Engine(tiny_model).generate(prompts.tolist(), max_new_tokens=10, temperature=0.0).tokens
    assert torch.equal(bench.naive_generate(tiny_model, prompts, 10), cached)


def test_tiny_run_writes_every_workload(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()  # main sets it for the whole process: give the other tests theirs back
    try:
        bench.main(["--depth=1", "--vocab_size=300", "--seq_len=32", "--train_warmup=1", "--train_steps=2",
                    "--gen_batches=1,2", "--new_tokens=6", "--naive_new_tokens=3", "--opt_seconds=0.5",
                    "--opt_vocab_size=300", "--opt_seq_len=32", "--opt_batch_rows=4", "--opt_docs=200",
                    "--opt_heldout_docs=20", "--threads=1", f"--out={out}"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert results["environment"]["threads"] == 1
    assert results["train"]["reference_hf_gpt2_tokens_per_s"] is None  # not the reference size
    for name in bench.OPTIMIZERS:
        assert results["train"][name]["tokens_per_s"] > 0
        assert results["optimizers"][name]["steps"] >= 1
        assert results["optimizers"][name]["heldout_loss"] > 0
    assert set(results["generate"]["batches"]) == {"1", "2"}
    assert results["generate"]["naive_new_tokens"] == 3
    assert results["optimizers"]["winner"] in bench.OPTIMIZERS
