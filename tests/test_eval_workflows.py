"""
scripts/kat_eval_workflows.py end to end: a tiny random checkpoint as policy and executor (the mechanics: every
method and group reported, one record per task and method), a scripted executor whose replies we control (the
numbers: accuracies, n/a, differences paired task by task), a loopback OpenAI-compatible server (--workflow without
a checkpoint), and the input errors. Code rewards and Programmer/Test run in the real sandbox.
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_eval_workflows.py -q -o addopts=""
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_tiny_model
from nanochat.checkpoint import save_checkpoint
from nanochat.common import InputError
from nanochat.workflow_data import policy_prompt
from scripts import kat_eval_workflows

METHODS = ["policy", "direct", "cot", "sc5", "programmer", "programmer_test"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tok):
    """A tiny untrained checkpoint of the world of seed 0 with its tokenizer."""
    root = tmp_path_factory.mktemp("workflow_eval")
    tok.save(root / "tokenizer")
    model = make_tiny_model(vocab_size=300, sequence_len=256)
    save_checkpoint(root / "policy", model, 0, str(root / "tokenizer"), world={"seed": 0, "size": 1})
    # a policy that records its executor (as the GRPO stage does), one that no longer exists
    save_checkpoint(root / "policy_with_executor", model, 0, str(root / "tokenizer"), world={"seed": 0, "size": 1},
                    extra={"executor": str(root / "gone")})
    return root


def flags(root, out, **overrides):
    values = {"checkpoint": root / "policy", "limit": 10, "max_tokens": 6, "policy_max_tokens": 6,
              "execution_timeout": 5, "num_resamples": 200, "device": "cpu", "out_dir": root / "outs" / out}
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items() if v is not None]


def read_json(root, out):
    return json.loads((root / "outs" / out / "workflow_eval.json").read_text())


def capture_tasks(monkeypatch):
    """The tasks the script evaluates, as it loads them (whatever their source), for executors that answer them."""
    tasks = []
    real = kat_eval_workflows.load_all_tasks

    def capturing(*args):
        tasks.extend(real(*args))
        return tasks
    monkeypatch.setattr(kat_eval_workflows, "load_all_tasks", capturing)
    return tasks


def test_tiny_checkpoint_reports_every_method_group_and_record(root):
    # catches: a method or group missing from the report, n/a tasks left out of the records (or run anyway),
    # duplicated records, an invalid-workflow share that does not match the records, no section in outs/report.md
    kat_eval_workflows.main(flags(root, "tiny"))
    data = read_json(root, "tiny")
    records = data["records"]
    tasks = {r["task"]: r["domain"] for r in records}
    assert len(records) == len(tasks) * len(METHODS) == 10 * len(METHODS)
    assert {(r["task"], r["method"]) for r in records} == {(t, m) for t in tasks for m in METHODS}
    assert set(tasks.values()) == {"math", "qa", "code"}
    for r in records:
        if r["method"].startswith("programmer") and r["domain"] == "qa":
            assert r["reward"] is None and r["error"].startswith("n/a: col 1: Programmer does not fit qa")
        else:
            assert r["reward"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    policy = [r for r in records if r["method"] == "policy"]
    invalid = sum((r["error"] or "").startswith("invalid workflow") for r in policy)
    assert data["policy_usage"]["synthetic"]["invalid_share"] == invalid / len(policy)
    report = (root / "outs" / "tiny" / "workflow_eval.md").read_text()
    for heading in ("### synthetic: 10 tasks", "### math tasks", "### qa tasks", "### code tasks",
                    "## The policy's workflows"):
        assert heading in report
    overall = report.split("### synthetic")[1].split("###")[0]
    for method in METHODS:
        assert f"\n| {method} | " in overall
    assert "| programmer | n/a on qa tasks |" in overall
    assert "<!-- stage:tiny -->" in (root / "outs" / "report.md").read_text()
    assert "policy_accuracy" in (root / "outs" / "tiny" / "report.md").read_text()


class Scripted:
    """In place of LocalExecutor, for the policy and the executor alike: the policy writes AnswerGenerate for every
    task; AnswerGenerate is answered right on the tasks at even positions, Custom ("Think step by step.") and
    Revise always right, Programmer always wrong (math: a program that crashes, so Test fails and Revise runs)."""

    def __init__(self, tasks):
        self.tasks = tasks

    def __call__(self, model, tok, batch_size=64):  # the constructor's signature
        return self

    def describe(self):
        return "scripted"

    def right_on(self, task):
        return self.tasks.index(task) % 2 == 0

    def reply(self, prompt):
        if any(prompt == policy_prompt(task) for task in self.tasks):
            return "AnswerGenerate"
        task = max((t for t in self.tasks if t["question"] in prompt), key=lambda t: len(t["question"]))
        right = {"math": f"Answer: {task['answer']}", "qa": f"Answer: {task['answer'][0]}",
                 "code": f"```python\n{task['answer']}```"}[task["domain"]]
        wrong = {"math": "```python\ndef solve():\n    return 1 / 0\n```", "qa": "Answer: nobody",
                 "code": "```python\ndef nothing():\n    pass\n```"}[task["domain"]]
        if "Think briefly" in prompt:
            return right if self.right_on(task) else wrong
        if "Think step by step." in prompt or "Fix it." in prompt:
            return right
        return wrong  # Programmer

    def complete(self, prompts, temperature=0.0, max_tokens=128, seed=0):
        return [self.reply(prompt) for prompt in prompts]


def test_scripted_executor_scores_and_pairs_differences_task_by_task(root, monkeypatch):
    # catches: an unpaired comparison (one method's rewards in another task order: policy and direct, identical
    # task by task, would then differ somewhere), records misaligned with their task ids, a right method not
    # scoring accuracy 1, n/a methods compared on a different task set than the policy
    tasks = capture_tasks(monkeypatch)
    scripted = Scripted(tasks)
    monkeypatch.setattr(kat_eval_workflows, "LocalExecutor", scripted)
    kat_eval_workflows.main(flags(root, "scripted"))
    data = read_json(root, "scripted")
    reward = {(r["task"], r["method"]): r["reward"] for r in data["records"]}
    for task in tasks:
        expected = float(scripted.right_on(task))
        assert reward[task["id"], "policy"] == reward[task["id"], "direct"] == reward[task["id"], "sc5"] == expected
        assert reward[task["id"], "cot"] == 1.0
        if task["domain"] != "qa":
            assert reward[task["id"], "programmer"] == 0.0 and reward[task["id"], "programmer_test"] == 1.0
    right = sum(map(scripted.right_on, tasks)) / len(tasks)
    assert 0 < right < 1
    overall = data["summary"]["synthetic"]
    assert overall["policy"]["accuracy"][0] == pytest.approx(right)
    assert overall["cot"]["accuracy"] == [1.0, 1.0, 1.0]
    assert overall["direct"]["diff_accuracy"] == [0.0, 0.0, 0.0] and overall["direct"]["same_accuracy"]
    assert overall["sc5"]["same_reward"] and overall["sc5"]["calls"] == 5.0
    cot = overall["cot"]["diff_accuracy"]
    assert cot[0] == pytest.approx(right - 1) and cot[1] < cot[0] < cot[2] and not overall["cot"]["same_accuracy"]
    assert overall["programmer_test"] is None  # n/a on the qa tasks: not compared on the whole set
    code = [t for t in tasks if t["domain"] == "code"]
    right_code = sum(map(scripted.right_on, code)) / len(code)
    assert data["summary"]["code tasks"]["programmer_test"]["accuracy"] == [1.0, 1.0, 1.0]
    assert data["summary"]["code tasks"]["programmer_test"]["diff_accuracy"][0] == pytest.approx(right_code - 1)
    assert data["policy_usage"]["synthetic"]["invalid_share"] == 0.0
    assert data["policy_usage"]["synthetic"]["operator_share"] == {"AnswerGenerate": 1.0}
    report = (root / "outs" / "scripted" / "workflow_eval.md").read_text()
    assert "| cot | 1.000 [1.000, 1.000] |" in report
    assert "**Best fixed workflow** on all tasks: cot" in report
    overall_table = report.split("### synthetic")[1].split("###")[0]
    direct_row = next(line for line in overall_table.splitlines() if line.startswith("| direct |"))
    assert "⚠ no task differs" in direct_row


@pytest.fixture
def server(monkeypatch):
    """A loopback OpenAI-compatible endpoint answering every prompt "Answer: 42"; .prompts records them."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    prompts, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                prompts.append(body["messages"][0]["content"])
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Answer: 42"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.prompts = prompts
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_hand_written_workflow_through_an_endpoint_without_a_checkpoint(root, server):
    # catches: --checkpoint still required with --workflow, the endpoint not used as the executor, tasks the
    # workflow does not fit run anyway (or silently dropped without a word in the report)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    kat_eval_workflows.main(flags(root, "handwritten", checkpoint=None, executor_base_url=url, executor_model="m",
                                  workflow="Programmer -> Test ? done : Revise"))
    data = read_json(root, "handwritten")
    assert data["checkpoint"] is None and data["world"] == {"seed": 0, "size": 1}
    assert list(data["methods"]) == ["workflow", "direct"]
    records = data["records"]
    tasks = {r["task"]: r["domain"] for r in records}
    assert set(tasks.values()) == {"math", "code"} and len(records) == 2 * len(tasks)
    # per task: Programmer and Revise (its program "Answer: 42" fails), then direct's AnswerGenerate
    assert len(server.prompts) == 3 * len(tasks)
    assert all(r["answer"] == "42" for r in records if r["domain"] == "math")
    report = (root / "outs" / "handwritten" / "workflow_eval.md").read_text()
    assert "skipped: " in report and "qa tasks (col 1: Programmer does not fit qa tasks" in report


@pytest.mark.parametrize("overrides, message", [
    ({"workflow": "AnswerGenerate ->", "checkpoint": "/nowhere"}, r"--workflow 'AnswerGenerate ->' is not a valid "
     r"workflow: col 18: expected an operator"),
    ({"workflow": "ScEnsemble"}, r"fits none of the tasks' domains: math: col 1: ScEnsemble must follow"),
    ({"dataset_names": "synthetic,gsm9k"}, r"unknown or no data sets \['gsm9k'\]"),
    ({"checkpoint": "/nowhere"}, r"checkpoint not found: /nowhere/ckpt.pt"),
    ({"max_tokens": 200}, r"--max_tokens=200 leaves too little of the executor's 256-token context"),
    ({"dataset_names": "gsm8k", "from_dir": "{root}/no_hub"}, r"data set gsm8k unavailable \(FileNotFoundError: no "
     r"file matches .*no_hub/openai/gsm8k"),
    ({"checkpoint": "{root}/policy_with_executor"}, r"checkpoint not found: .*gone/ckpt.pt"),
])
def test_bad_inputs_are_input_errors(root, overrides, message):
    # catches: a raw traceback (or a slow failure after loading) for a bad workflow, data set, checkpoint, limit or
    # token budget; a semantically invalid workflow run anyway and scored 0 instead of refused; the executor a
    # policy records ignored in favour of the policy itself
    overrides = {key: str(value).format(root=root) for key, value in overrides.items()}
    with pytest.raises(InputError, match=message):
        kat_eval_workflows.main(flags(root, "bad", **overrides))
