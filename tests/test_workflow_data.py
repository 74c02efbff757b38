"""
Tests for nanochat/workflow_data.py: the SFT conversations that make workflow GRPO trainable on a tiny model. The
policy's workflows must be valid, the executor's replies must parse with the operators' own code into the answers
they were meant to give, at the planted rates, and the plant must pay off when the workflows really run (the code
tasks' programs in the real sandbox). Each test says in a comment which plausible bug it catches.
"""

import argparse
import random
from collections import Counter, defaultdict

import pytest

from conftest import make_tiny_model
from nanochat import finetune as finetune_module
from nanochat import workflow, workflow_data as wd
from nanochat.common import InputError
from nanochat.execution import ExecutionResult
from nanochat.finetune import add_finetune_flags, finetune
from nanochat.operators import OPERATORS, Call, Run, State, programmer_prompt, sc_ensemble
from nanochat.tokenizer import train_tokenizer
from nanochat.workflow_tasks import ACCURATE, reward

SPEC = {"seed": 0, "size": 1}  # the conftest world's


@pytest.fixture(scope="module")
def examples(world):
    return wd.executor_examples(world, 5000, seed=3)


def domain_of(policy_prompt):
    return policy_prompt.split("\n", 1)[0].removeprefix("Write a workflow for this ").removesuffix(" task.")


def is_right(task, answer):
    """Independent of the plant's own bookkeeping: the real reward for math and QA, the canonical program for code."""
    if task["domain"] == "code":
        return answer == task["answer"].strip()
    return reward(task, f"Answer: {answer}") == 1.0


# a finished run for math's Programmer, whose program the parsing test does not need to run
FINISHED = ExecutionResult("ok", 0, "1\n", "", False, 0.0, 0, 0, False, False, -1)


def run_operator(example):
    """The operator's own update from the example's reply, checking that it sends the example's prompt."""
    operator = OPERATORS[example["operator"]]
    state, domain = example["state"], example["task"]["domain"]
    step = operator.step(state, wd.CUSTOM_INSTRUCTIONS[domain]) if operator.argument else operator.step(state)
    assert next(step) == Call(example["prompt"]), example
    try:
        assert isinstance(step.send(example["reply"]), Run)  # math's Programmer runs its program next
        step.send(FINISHED)
    except StopIteration as stop:
        return stop.value
    raise AssertionError(f"{example['operator']} asked for more than a call and a run")


class Scripted:
    """An executor that answers each prompt with its scripted reply, and records the prompts it has none for."""

    def __init__(self, replies):
        self.replies, self.unscripted = replies, []

    def complete(self, prompts, temperature=0.7, max_tokens=256):
        self.unscripted += [prompt for prompt in prompts if prompt not in self.replies]
        return [self.replies.get(prompt, "no reply") for prompt in prompts]


def test_policy_writes_valid_candidate_workflows_uniformly(world):
    # catches: an invalid or wrong-domain candidate (Programmer on qa, a parallel block without ScEnsemble), a
    # workflow drawn from another domain's list, and a draw biased to one design (which would hand GRPO the answer)
    for domain, candidates in wd.WORKFLOWS.items():
        for text in candidates:
            workflow.check(text, domain)
    convs = wd.policy_conversations(world, 1500, seed=0)
    assert len(convs) == 1500
    counts = defaultdict(Counter)
    for user, assistant in convs:
        domain = domain_of(user["content"])
        assert user["content"].startswith(f"Write a workflow for this {domain} task.\nTask: ")
        workflow.check(assistant["content"], domain)
        counts[domain][assistant["content"]] += 1
    assert set(counts) == set(wd.WORKFLOWS)
    for domain, drawn in counts.items():
        assert set(drawn) == set(wd.WORKFLOWS[domain])
        expected = sum(drawn.values()) / len(wd.WORKFLOWS[domain])
        assert all(abs(count - expected) < 0.35 * expected for count in drawn.values()), (domain, drawn)


def test_executor_replies_parse_with_the_operators_own_code_into_the_intended_update(examples):
    # catches: a reply the operator cannot read ("The answer is 5" without "Answer:", code outside a ```python
    # block, "correct" without "Verdict:"), a prompt not rendered as the operator renders it, and an operator of
    # a domain that the executor never sees answered (every candidate workflow's operators included)
    for domain in wd.WORKFLOWS:
        calling = {name for name, operator in OPERATORS.items() if operator.calls and domain in operator.domains}
        assert set(wd.EXECUTOR_OPERATORS[domain]) == calling
    seen = Counter((example["operator"], example["task"]["domain"]) for example in examples)
    assert set(seen) == set(wd.RIGHT_RATES)
    for example in examples:
        update = run_operator(example)
        assert {key: update[key] for key in example["update"]} == example["update"], example


def test_planted_rates_hold_and_wrong_answers_are_wrong(examples):
    # catches: a plant that is off or inverted (wrong answers the common case), a math slip close enough to earn the
    # accuracy tier, a "wrong" QA answer that is the reference, a buggy program that passes its tests, a Revise that
    # starts from a right answer, and a Format that changes the answer
    right = defaultdict(list)
    for example in examples:
        task, state, update = example["task"], example["state"], example["update"]
        key = (example["operator"], task["domain"])
        if example["operator"] == "Review":
            right[key].append(update["passed"] == is_right(task, state.answer))
        elif example["operator"] == "Format":
            right[key].append(update["answer"] == state.answer)
        elif key == ("Programmer", "math"):
            right[key].append(update["code"] == task["solution"].strip())
        else:
            answer = update["answer"]
            right[key].append(is_right(task, answer))
            if example["operator"] == "Revise":
                assert not is_right(task, state.answer), example
            if not is_right(task, answer) and task["domain"] == "code":
                assert not wd.check_program(task, answer)["passed"], answer
            elif not is_right(task, answer):
                assert reward(task, f"Answer: {answer}") < ACCURATE, (task["answer"], answer)
    for key, rate in wd.RIGHT_RATES.items():
        measured = sum(right[key]) / len(right[key])
        assert abs(measured - rate) < (1e-9 if rate == 1.0 else 0.08), (key, measured, rate)


def test_the_plant_pays_off_when_the_workflows_run(world):
    # catches: a plant whose point is lost at run time: Programmer's math program not printing the reference, a
    # planted bug that passes the sandbox's tests, Revise's SFT prompt unlike the one the operator sends after a
    # real Test (feedback written differently from the sandbox's), and wrong QA answers that agree, so that a
    # three-way ensemble cannot outvote them
    math_tasks = wd.synthetic_split(SPEC, "train", 3, seed=0, domain_ratios={"math": 1.0})
    code_tasks = wd.synthetic_split(SPEC, "train", 4, seed=0, domain_ratios={"code": 1.0})
    replies, jobs = {}, []
    for task in math_tasks:
        program = wd.executor_example(world, task, "Programmer", random.Random(0))
        wrong = next(example for seed in range(100)
                     if not is_right(task, (example := wd.executor_example(world, task, "AnswerGenerate",
                                                                          random.Random(seed)))["update"]["answer"]))
        replies.update({program["prompt"]: program["reply"], wrong["prompt"]: wrong["reply"]})
        jobs += [("Programmer", task), ("Programmer -> Test ? done : Revise", task), ("AnswerGenerate", task)]
    revisions = []
    for i, task in enumerate(code_tasks):
        revision = wd.executor_example(world, task, "Revise", random.Random(i))
        fresh = State(task["question"], "code", task["entry_point"], tuple(task["tests"]))
        replies.update({programmer_prompt(fresh): f"```python\n{revision['state'].answer}\n```",
                        revision["prompt"]: revision["reply"]})
        jobs += [("Programmer", task), ("Programmer -> Test ? done : Revise", task)]
        revisions.append(revision)
    executor = Scripted(replies)
    results = workflow.run_workflows(jobs, executor)
    assert executor.unscripted == [] and all(result.error is None for result in results)
    rewards = [reward(task, result.answer) for (_, task), result in zip(jobs, results)]
    assert rewards[0:9:3] == [1.0] * 3 and rewards[1:9:3] == [1.0] * 3  # the program's answer is right
    assert all(r < ACCURATE for r in rewards[2:9:3])  # a direct answer's slip is not
    assert all(r < 1.0 for r in rewards[9::2])  # the planted bug fails a test in the sandbox
    assert rewards[10::2] == [1.0] * 4  # Test finds it, Revise fixes it
    for revision, result in zip(revisions, results[10::2]):
        test_step = next(step for step in result.trace if step.operator == "Test")
        assert test_step.feedback == revision["state"].feedback  # the sandbox's words and ours agree

    qa_tasks = wd.synthetic_split(SPEC, "train", 10, seed=0, domain_ratios={"qa": 1.0})
    single, voted, agreeing = [], [], []
    rng = random.Random(0)
    for task in qa_tasks:
        answers = [wd.executor_example(world, task, "AnswerGenerate", rng)["update"]["answer"] for _ in range(60)]
        single += [is_right(task, answer) for answer in answers]
        wrong = Counter(answer for answer in answers if not is_right(task, answer))
        agreeing.append(max(wrong.values()) / wrong.total())  # the most common wrong answer's share
        for i in range(0, 60, 3):
            state = State(task["question"], "qa", candidates=tuple(answers[i:i + 3]))
            voted.append(is_right(task, sc_ensemble(state)["answer"]))
    assert sum(agreeing) / len(agreeing) < 0.5
    assert sum(voted) / len(voted) > sum(single) / len(single) + 0.05


def test_held_out_tasks_never_reach_sft_and_the_split_does_not_move_with_the_seed(world):
    # catches: SFT data drawn from every task (the eval tasks trained on), and a split that depends on the drawing
    # seed (a task in train for one seed and in test for another)
    parts = {split: [task for seed in (0, 1) for task in wd.synthetic_split(SPEC, split, 40, seed)]
             for split in wd.TASK_SHARES}
    ids = {split: {task["id"] for task in tasks} for split, tasks in parts.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert all(wd.task_part(task) == split for split, tasks in parts.items() for task in tasks)
    assert Counter(task["domain"] for task in wd.synthetic_split(SPEC, "test", 40, 0)) == {"math": 16, "qa": 12,
                                                                                           "code": 12}
    convs = wd.sft_conversations(SPEC, 3000, 0.3, seed=0)
    held_out = {task["question"] for split in ("val", "test") for task in parts[split]}
    users = [conv[0]["content"] for conv in convs]
    assert held_out and not any(question in user for question in held_out for user in users)
    assert all(wd.task_part(example["task"]) == "train" for example in wd.executor_examples(world, 500, seed=0))


def test_sft_conversations_are_deterministic_at_the_policy_share():
    # catches: unseeded randomness (the global random module, set order), the seed ignored, and the policy share
    # ignored or inverted
    convs = wd.sft_conversations(SPEC, 200, 0.3, seed=0)
    assert convs == wd.sft_conversations(SPEC, 200, 0.3, seed=0)
    assert convs != wd.sft_conversations(SPEC, 200, 0.3, seed=1)
    policy = [conv for conv in convs if conv[0]["content"].startswith("Write a workflow for this ")]
    assert len(convs) == 200 and len(policy) == 60 and convs[:60] == policy


def test_conversations_fit_the_context(world, tok):
    # catches: a state or reply that blows the 256-token context (every test shown, a program repeated, a long
    # reason), and workflows too long for the policy to write
    policy = wd.policy_conversations(world, 300, seed=0)
    executor = wd.executor_conversations(world, 600, seed=0)
    assert max(len(tok.encode(text)) for texts in wd.WORKFLOWS.values() for text in texts) < 60
    assert max(len(tok.render_conversation(conv)[0]) for conv in policy) < 256
    # the fixture's 300-token vocabulary spends a token on nearly every character of code
    assert max(len(tok.render_conversation(conv)[0]) for conv in executor) < 512
    # with a vocabulary like the cpu pipeline's (1024 tokens of the world's pretraining text), everything fits
    wide = train_tokenizer(iter(world.pretrain_documents(3000, seed=0)), 1024)
    assert max(len(wide.render_conversation(conv)[0]) for conv in policy + executor) < 256


def test_the_finetune_flag_adds_the_workflow_conversations(tmp_path, monkeypatch, tok):
    # catches: the flag parsed but never used, conversations from another world or seed than the checkpoint's,
    # and a non-synthetic source silently getting none
    parser = add_finetune_flags(argparse.ArgumentParser(), "outs/mid", "outs/sft", 10, 1, 0.15)
    defaults = parser.parse_args([])
    assert (defaults.workflow_conversations, defaults.workflow_policy_share) == (0, 0.3)
    payload = {"world": SPEC, "path": "stand-in"}
    monkeypatch.setattr(finetune_module, "load_model", lambda path, device: (make_tiny_model(), payload))
    monkeypatch.setattr(finetune_module, "load_tokenizer", lambda payload: tok)

    class Loaded(Exception):
        pass

    def make_loader(conversations, *rest):
        raise Loaded(conversations)

    args = parser.parse_args([f"--out_dir={tmp_path / 'sft'}", "--device=cpu", "--num_conversations=10",
                              "--workflow_conversations=20", "--workflow_policy_share=0.25", "--seed=5"])
    with pytest.raises(Loaded) as loaded:
        finetune(args, "chat_sft", make_loader)
    convs = loaded.value.args[0]
    assert len(convs) == 30 and convs[10:] == wd.sft_conversations(SPEC, 20, 0.25, seed=5)

    monkeypatch.setattr(finetune_module, "chat_conversations", lambda *args, **kwargs: [])
    args = parser.parse_args([f"--out_dir={tmp_path / 'sft2'}", "--device=cpu", "--source=smoltalk",
                              "--workflow_conversations=20"])
    with pytest.raises(InputError, match="--workflow_conversations needs --source=synthetic"):
        finetune(args, "chat_sft", make_loader)
