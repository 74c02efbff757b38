"""
Tests for the world task, nanochat/evaluate.py, scripts/chat_eval.py and scripts/chat_cli.py, on a tiny real run
directory: a BPE tokenizer trained on world text and a random-weight GPT saved as outs/sft, laid out the way the
stage scripts leave them (the checkpoint carries a copy of its tokenizer in outs/sft/tokenizer). The scripts run
as subprocesses where their exit codes and stdout are the contract; nothing touches the network.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.evaluate import evaluate_task, generate_responses
from nanochat.gpt import GPT, config_from_depth
from nanochat.synthetic import make_world
from nanochat.tasks import TASKS, world
from nanochat.tokenizer import Tokenizer, train_tokenizer
from scripts import chat_eval

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tok = train_tokenizer(iter(make_world(0, 1).pretrain_documents(40, seed=0)), 400)
    tok.save(root / "outs" / "tokenizer")
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, tok.vocab_size, 64, n_embd=64, n_head=4, verbose=False)).eval()
    with torch.no_grad():
        for p in model.parameters():  # the real init zeroes projections, which would make every row alike
            p.normal_(0, 0.3)
        # random weights seldom say <|assistant_end|>: make it replace the token greedy decoding picks third for
        # the first question, so some responses end on it (others end on <|bos|> or at the length limit)
        prompt = tok.render_for_completion(world.load(limit=1)[0]["messages"])
        third = Engine(model).generate([prompt], max_new_tokens=3, temperature=0.0).tokens[0, 2].item()
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 1.01 * model.lm_head.weight[third]
    save_checkpoint(root / "outs" / "sft", model, 0, root / "outs" / "tokenizer", world={"seed": 0, "size": 1})
    return root


@pytest.fixture(scope="module")
def model_tok(run_dir):
    model, _ = load_model(run_dir / "outs" / "sft")
    return model, Tokenizer.load(run_dir / "outs" / "tokenizer")


def run_script(run_dir, module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=run_dir, env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_world_task_loads_and_scores():
    assert TASKS["world"] is world
    items = world.load(limit=30, seed=0, size=1)
    assert len(items) == 30 and len(world.load()) == world.DEFAULT_LIMIT
    assert world.load(limit=10) == items[:10]
    assert world.load(limit=10, seed=1) != items[:10]  # another world, other people and questions
    for item in items:
        assert item["messages"][-1]["role"] == "user" and item["cluster"] in make_world(0, 1).clusters
        assert world.score(item, f"The answer is {item['answer']}.") == 1.0
        assert world.score(item, "I'm not sure, it could be many things.") == 0.0
    colour = next(i for i in items if i["cluster"] == "colour")
    rival = "blue" if colour["answer"] != "blue" else "red"
    assert world.score(colour, f"It's {rival}.") == 0.0
    assert world.score(colour, f"It's {colour['answer']} or {rival}.") == 0.0  # hedging is wrong
    assert world.gold(colour, f"It's {colour['answer']}.") == {"correct": 1, "artifacts": 0, "score": 1.0}
    # artifacts cost gold score, not correctness
    artifacted = f"Great question! It's {colour['answer']}\u2014plain and simple."
    assert world.score(colour, artifacted) == 1.0
    assert world.gold(colour, artifacted) == {"correct": 1, "artifacts": 2, "score": 0.5}
    with pytest.raises(ValueError, match="only a 'test' split"):
        world.load(split="train")


def test_batched_generation_equals_one_at_a_time(model_tok):
    model, tok = model_tok
    conversations = [item["messages"] for item in world.load(limit=6)]
    conversations.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi."},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 2?"}])
    responses = generate_responses(model, tok, conversations, max_new_tokens=12, batch_size=3)
    stop = {tok.encode_special("<|assistant_end|>"), tok.bos_token_id}
    expected, reasons = [], set()
    for conversation in conversations:
        gen = Engine(model).generate([tok.render_for_completion(conversation)], max_new_tokens=12, temperature=0.0,
                                     stop_tokens=sorted(stop))
        ids = gen.tokens[0].tolist()
        cut = next((t for t, token in enumerate(ids) if token in stop), len(ids))
        expected.append(tok.decode(ids[:cut]))
        reasons.add(gen.finish_reasons[0] if cut == len(ids) else tok.decode([ids[cut]]))
    assert responses == expected
    assert reasons == {"<|assistant_end|>", "<|bos|>", "length"}  # every way a response ends was exercised


def test_evaluate_task_world_metrics(model_tok):
    model, tok = model_tok
    items = world.load(limit=6)
    result = evaluate_task(model, tok, world, items, max_new_tokens=8, batch_size=4)
    records = result["records"]
    assert result["n"] == 6 and len(records) == 6
    assert [r["prompt"] for r in records] == [i["prompt"] for i in items]
    assert result["accuracy"] == result["correct"] == sum(r["score"] for r in records) / 6
    assert result["artifact_rate"] == sum(r["artifacts"] > 0 for r in records) / 6
    assert set(result["per_cluster"]) == {i["cluster"] for i in items}


def test_evaluate_task_samples_k_responses_per_item_and_reports_pass_at_k(model_tok):
    # catches: sampling flags dropped on the way to the engine, samples scored against another item's answer
    model, tok = model_tok
    items = world.load(limit=4)

    class EvenLength:  # a task whose verdict depends only on the response, so the expectation is independent
        @staticmethod
        def score(item, response):
            return float(len(response) % 2 == 0)

    result = evaluate_task(model, tok, EvenLength, items, max_new_tokens=6, batch_size=4, temperature=1.0,
                           seed=5, num_samples=3, top_p=0.9, min_p=0.05)
    responses = generate_responses(model, tok, [i["messages"] for i in items], 6, 4, 1.0, 5, num_samples=3,
                                   top_p=0.9, min_p=0.05)
    assert [r["response"] for r in result["records"]] == responses and result["n"] == 12
    assert [(r["item"], r["sample"]) for r in result["records"]] == [(i, j) for i in range(4) for j in range(3)]
    assert [r["prompt"] for r in result["records"][::3]] == [i["prompt"] for i in items]
    expected = sum(any(len(r) % 2 == 0 for r in responses[3 * i:3 * i + 3]) for i in range(4)) / 4
    assert result["pass@3"] == expected
    greedy = generate_responses(model, tok, [i["messages"] for i in items], 6, 4)
    assert responses[::3] != greedy  # the samples really were sampled


def test_chat_cli_one_shot_and_prompts_file(run_dir, model_tok):
    one = run_script(run_dir, "scripts.chat_cli", "--ckpt_path", "outs/sft", "--prompt", "What is 2 + 3?",
                     "--max_new_tokens", "16")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.split("\n")) == 2 and one.stdout.endswith("\n")  # one line, newline-terminated
    prompts = ["What is 7 + 5?", "Where does Zilel live?", "Tell me about a cat."]
    (run_dir / "p.txt").write_text(f"{prompts[0]}\n\n   \n{prompts[1]}\n{prompts[2]}")
    batch = run_script(run_dir, "scripts.chat_cli", "--ckpt_path", "outs/sft/ckpt.pt", "--prompts_file", "p.txt",
                       "--max_new_tokens", "16", "--temperature", "0", "--batch_size", "2")
    assert batch.returncode == 0, batch.stderr
    lines = batch.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == ""
    model, tok = model_tok
    greedy = generate_responses(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=16)
    assert lines[:3] == [r.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") for r in greedy]


def test_chat_cli_missing_checkpoint(run_dir):
    result = run_script(run_dir, "scripts.chat_cli", "--ckpt_path", "outs/nope", "--prompt", "Hi")
    assert result.returncode != 0 and result.stdout == ""
    assert "outs/nope/ckpt.pt" in result.stderr and "Traceback" not in result.stderr


def test_chat_eval_writes_results(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    chat_eval.main(["--ckpt_path", "outs/sft", "--limit", "8", "--max_new_tokens", "16"])
    results = json.loads((run_dir / "outs" / "eval_sft" / "results.json").read_text())
    world_result = results["tasks"]["world"]
    assert results["world"] == {"seed": 0, "size": 1} and world_result["n"] == 8
    assert len(world_result["records"]) == 8 and 0.0 <= world_result["accuracy"] <= 1.0
    assert "## eval_sft" in (run_dir / "outs" / "report.md").read_text()
    assert "world" in capsys.readouterr().out
