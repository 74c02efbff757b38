"""
The workflow GRPO stage end to end at tiny size: a policy that writes a valid workflow about half the time, and an
executor behind a loopback OpenAI-compatible server that answers every operator prompt right, so a valid workflow
earns reward 1 and an invalid one 0: the signal GRPO must follow.
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_workflow_stage.py -q -o addopts=""
"""

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import make_tiny_model, sigkill_when, torchrun
from nanochat import workflow_data
from nanochat.batching import collate_targets
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.training import train_step

WORLD = {"seed": 0, "size": 1}
RATIOS = "math=0.5,qa=0.5"


def right_reply(prompt, tasks):
    """The reply of an executor that knows every task's answer, in the format the operators parse."""
    for task in tasks:
        if task["question"] in prompt:
            answer = task["answer"] if isinstance(task["answer"], str) else task["answer"][0]
            if "Verdict" in prompt:
                return "Verdict: correct. The answer looks right."
            return f"Answer: {answer}"
    return "Answer: unknown"


@pytest.fixture(scope="module")
def executor_url():
    tasks = [t for split in ("train", "val") for t in workflow_data.synthetic_split(
        WORLD, split, 400 if split == "train" else 40, seed=0, domain_ratios={"math": 0.5, "qa": 0.5}, at_most=True)]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = right_reply(body["messages"][-1]["content"], tasks)
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def policy_root(tmp_path_factory, tok):
    """A tiny policy taught to answer every task with "AnswerGenerate" or with the invalid "Answer Generate", about
    half and half, so that sampled groups hold both."""
    root = tmp_path_factory.mktemp("workflow")
    tok.save(root / "tokenizer")
    model = make_tiny_model(vocab_size=300, sequence_len=256)
    model.train()
    tasks = workflow_data.synthetic_split(WORLD, "train", 16, seed=0, domain_ratios={"math": 0.5, "qa": 0.5})
    rows = [tok.render_conversation([{"role": "user", "content": workflow_data.policy_prompt(t)},
                                     {"role": "assistant", "content": text}], max_tokens=257)
            for t in tasks for text in ("AnswerGenerate", "Answer Generate")]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        picked = torch.randperm(len(rows))[:8].tolist()
        train_step(model, [opt], [collate_targets([rows[i] for i in picked], "cpu")], 1.0)
    save_checkpoint(root / "policy", model.eval(), 0, str(root / "tokenizer"), world=WORLD)
    return root


def flags(root, url, out, **overrides):
    values = {"model_name": root / "policy", "executor_base_url": url, "executor_model": "scripted",
              "domain_ratios": RATIOS, "num_train_tasks": 40, "num_eval_tasks": 8, "max_steps": 2,
              "rollout_batch_size": 2, "num_return_sequences_in_group": 4, "max_tokens": 12,
              "learning_rate": 3e-3, "warmup_steps": 0, "eval_every": 0, "save_every": 1, "device": "cpu",
              "out_dir": root / out}
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def weights(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def test_grpo_on_workflows_raises_the_valid_share(policy_root, executor_url):
    # catches: rewards not reaching the update (advantages of the wrong rows, the prompt's tokens in the loss, a
    # sign flip), an executor never called: the share of valid workflows must rise where validity alone pays
    from scripts import kat_train_workflow
    kat_train_workflow.main(flags(policy_root, executor_url, "learn", max_steps=8, rollout_batch_size=4,
                                  num_eval_tasks=16))
    meta = json.load(open(policy_root / "learn" / "meta.json"))
    metrics = meta["metrics"]
    assert 0.2 < metrics["invalid_share_start"] < 0.8  # the fixture's policy: both kinds in the groups
    assert metrics["invalid_share_final"] < metrics["invalid_share_start"] - 0.1
    assert metrics["reward_final"] > metrics["reward_start"]
    report = (policy_root / "learn" / "report.md").read_text()
    assert "Operator usage per domain" in report and "AnswerGenerate" in report
    load_model(policy_root / "learn", "cpu")  # a plain GPT that the next stage and chat_cli load


def test_two_processes_under_torchrun_train_what_one_process_does(policy_root, executor_url):
    # catches: tasks split unevenly over ranks, a rank scoring another rank's workflows, rewards or summaries not
    # gathered, the loss normalised per rank
    from scripts import kat_train_workflow
    kat_train_workflow.main(flags(policy_root, executor_url, "one_proc"))
    torchrun("scripts.kat_train_workflow", flags(policy_root, executor_url, "two_procs"))
    one, two = weights(policy_root / "one_proc"), weights(policy_root / "two_procs")
    start = weights(policy_root / "policy")
    assert any(not torch.equal(one[k], start[k]) for k in start)
    # the same samples and rewards (below); the weights to float rounding as Adam scales it: two ranks sum their
    # halves' gradients in another order, and Adam divides a near-zero gradient by its own size, so last-bit
    # differences move a weight by up to ~2e-5 (main at 1 thread: 1.0e-5) against ~4.5e-3 of training
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-4), k
    m1, m2 = (json.load(open(policy_root / d / "meta.json"))["metrics"] for d in ("one_proc", "two_procs"))
    for key in ("reward_start", "reward_final", "invalid_share_final"):
        assert m1[key] == pytest.approx(m2[key]), key


def test_sigkill_then_resume_gives_the_uninterrupted_run(policy_root, executor_url):
    # catches: a resume that redraws other tasks, restarts the optimizer or the LoRA adapters, or repeats a step
    from scripts import kat_train_workflow
    common = dict(max_steps=4, lora_rank=2)
    kat_train_workflow.main(flags(policy_root, executor_url, "straight", **common))
    killed = policy_root / "killed"
    code = sigkill_when("scripts.kat_train_workflow", flags(policy_root, executor_url, "killed", **common),
                        killed / "optim.pt", policy_root / "killed.log")
    assert code == -signal.SIGKILL and not (killed / "ckpt.pt").exists()
    kat_train_workflow.main(flags(policy_root, executor_url, "killed", resume=True, **common))
    expected, resumed = weights(policy_root / "straight"), weights(killed)
    assert not any("lora" in k for k in resumed)  # merged at the end
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.mark.parametrize("override, match", [
    ({"num_return_sequences_in_group": 1}, "at least 2"),
    ({"executor_model": ""}, "executor_model"),
    ({"domain_ratios": "math=0.5,qa=0.6"}, "domain_ratios"),
    ({"lora_rank": 2, "lora_target_modules": "c_nope"}, "lora_target_modules"),
    ({"dataset_names": "nope"}, "dataset_names"),
    ({"executor_base_url": "", "executor_max_tokens": 200}, "executor_max_tokens"),
    ({"max_tokens": 200}, "--max_tokens=200 leaves too little of the policy's 256-token context"),
])
def test_bad_inputs_are_one_line_errors(policy_root, executor_url, override, match, capsys):
    # catches: a traceback (or a silent default) instead of an error naming the flag
    from nanochat.common import InputError
    from scripts import kat_train_workflow
    try:
        kat_train_workflow.main(flags(policy_root, executor_url, "bad", **override))
    except InputError as e:
        message = str(e)
    except SystemExit:  # argparse's own checks (types, choices)
        message = capsys.readouterr().err
    else:
        pytest.fail(f"{override} was accepted")
    assert match in message


def test_the_recorded_executor_is_found_from_another_working_directory(policy_root, tmp_path, monkeypatch):
    # catches: the executor recorded as typed (relative to where training ran), which the evaluation then cannot
    # find from anywhere else
    from nanochat.checkpoint import load_payload
    from scripts import kat_eval_workflows, kat_train_workflow
    monkeypatch.chdir(policy_root)  # train with relative paths, as speedrun.sh does
    kat_train_workflow.main(flags(policy_root, "", "local_executor", model_name="policy", out_dir="local_executor",
                                  max_steps=1, num_return_sequences_in_group=2, num_eval_tasks=2,
                                  executor_max_tokens=4, executor_base_url="", executor_model=""))
    monkeypatch.chdir(tmp_path)
    executor = kat_eval_workflows.recorded_executor(load_payload(policy_root / "local_executor"))
    assert os.path.samefile(executor, policy_root / "policy")
