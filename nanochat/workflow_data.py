"""
What the workflow GRPO models see and learn before GRPO: the policy's prompt (a task -> the workflow to run on it),
and the synthetic world's SFT conversations for both roles (the policy writing well-formed workflows, the executor
answering the operators' prompts in the formats nanochat/operators.py parses).

One tiny chat model is SFT'd on both kinds of conversations (sft_conversations, through chat SFT's
--workflow_conversations) and then serves as the executor (a frozen copy) and as the initial policy. Without this
data every workflow it writes or runs fails, and GRPO has no signal to learn from.

The policy's conversations: policy_prompt(task), then one of its domain's candidate workflows (WORKFLOWS), drawn
uniformly, so that the SFT policy writes well-formed, valid workflows but does not yet know which is best: GRPO has
to find that out. Each list holds good and mediocre designs, short enough for a 256-token context.

The executor's conversations: one operator's prompt, rendered by operators.py's own *_prompt functions on a State
of a task, then a short reply in exactly the format that operator parses ("Answer: ..." lines, one ```python block,
"Verdict: correct|incorrect. <reason>"), for every operator that calls the executor and every domain it fits
(EXECUTOR_OPERATORS). The replies carry planted structure, so that the best workflow differs by domain:

    operator        math                    qa                          code
    AnswerGenerate  right 40%               right 65%                   bug-free 60%
    Custom          right 40%               right 65%                   bug-free 60%
    Programmer      right program 100%      -                           bug-free 60%
    Revise          right 40%               right 85%                   bug-free 100% (it sees the failing test)
    Review          verdict true 80%        verdict true 80%            verdict true 80%
    Format          restates the proposed answer, always

- math: a direct answer is a slip of the right number (its leading digit off by 1 or 2: a relative error of 10% or
  more, so it never reaches the reward's accuracy tier), while Programmer copies the question's numbers into
  `def solve(): return 23 + 45 - 12`, which is easy for a tiny model: Programmer beats every direct answer.
- qa: a wrong answer names other values of the same attribute (another colour; as many other people, for "who
  lives in ..."), so wrong answers scatter and a three-way ScEnsemble majority beats one answer; a Review that
  rejects the answer is usually right, and Revise after it usually is too: `AnswerGenerate -> Review ? done :
  Revise` (about 0.87) and the ensemble (about 0.8) beat one answer (0.65).
- code: a planted bug (planted_bug: an integer constant off by one, or a wrong operator or method) fails at least
  one test, and Revise given Test's feedback ("passed k/n; failed <assert>: <error>") writes the canonical program:
  `Programmer -> Test ? done : Revise` beats Programmer alone (1.0 against 0.6).

The states the replies answer: AnswerGenerate, Programmer and Custom start from the task alone (Custom with its
domain's instruction from the candidate workflows); Review and Format see a proposed answer that is right at the
domain's first-answer rate; Revise sees a wrong one, with the Review's "incorrect" reason as feedback for math and
qa, or Test's feedback on the buggy program for code (the tests run here, in process: the programs are our own
templates and their planted bugs, and a sandbox start per example would make building the data slow; the tests
check the feedback against the sandbox's).

Tasks are held out by id (synthetic_split): a task's part, "train" 70%, "val" 10% or "test" 20% (TASK_SHARES), is
drawn by mcqa.split_items from a hash of SPLIT_SEED and its id alone, so the seed that draws tasks never moves one
across, and SFT conversations only ever come from "train" tasks. A size-1 world has 209 distinct code tasks, split
144 / 23 / 42: code is the scarce domain (math has thousands of tasks, QA about 2,900 questions).
"""

import random
import re
from dataclasses import replace

from nanochat.execution import ExecutionResult
from nanochat.mcqa import split_items
from nanochat.operators import (DOMAINS, State, answer_generate_prompt, custom_prompt, format_prompt,
                                programmer_prompt, review_prompt, revise_prompt, test)
from nanochat.synthetic import make_world
from nanochat.workflow_tasks import DEFAULT_RATIOS, QA_FACT_CLUSTERS, SYNTHETIC_MAKERS, domain_counts

POLICY_INSTRUCTION = "Write a workflow for this {domain} task."

# -----------------------------------------------------------------------------
# The policy's candidate workflows: good and mediocre designs per domain, drawn uniformly for SFT (the eval script
# reuses them as fixed baselines). Under the planted executor: math's best are the Programmer ones, qa's the
# Review / Revise one and the ensemble, code's the Test / Revise ones.

CUSTOM_INSTRUCTIONS = {"math": "Compute it step by step.", "qa": "Answer with the name only.",
                       "code": "Write the simplest correct function."}
MATH_WORKFLOWS = (
    "AnswerGenerate",
    "Programmer",
    "AnswerGenerate -> Format",
    "[AnswerGenerate, AnswerGenerate, AnswerGenerate] -> ScEnsemble",
    "Programmer -> Test ? done : Revise",
    f'Custom("{CUSTOM_INSTRUCTIONS["math"]}")',
)
QA_WORKFLOWS = (
    "AnswerGenerate",
    "[AnswerGenerate, AnswerGenerate, AnswerGenerate] -> ScEnsemble",
    "AnswerGenerate -> Review ? done : Revise",
    "AnswerGenerate -> Format",
    f'Custom("{CUSTOM_INSTRUCTIONS["qa"]}")',
)
CODE_WORKFLOWS = (
    "Programmer",
    "Programmer -> Test ? done : Revise",
    "Programmer -> (Test ? done : Revise) * 2",
    "AnswerGenerate",
    f'Custom("{CUSTOM_INSTRUCTIONS["code"]}")',
)
WORKFLOWS = {"math": MATH_WORKFLOWS, "qa": QA_WORKFLOWS, "code": CODE_WORKFLOWS}

# -----------------------------------------------------------------------------
# The executor's planted structure (see the module docstring)

MATH_ANSWER_RATE = 0.4   # direct math answers (AnswerGenerate, Custom, Revise) that are right
QA_ANSWER_RATE = 0.65    # direct QA answers (AnswerGenerate, Custom) that are right
QA_REVISE_RATE = 0.85    # QA revisions, after a Review said "incorrect", that are right
CODE_BUG_RATE = 0.4      # first programs (Programmer, AnswerGenerate, Custom) with a planted bug
REVIEW_ACCURACY = 0.8    # Review verdicts that tell the truth about the proposed answer

# (operator, domain) -> the share of replies that are right: the reference answer (a bug-free program for code);
# for Review a true verdict, for Format the proposed answer restated. Its keys are the executor's operators.
RIGHT_RATES = {
    ("AnswerGenerate", "math"): MATH_ANSWER_RATE, ("Custom", "math"): MATH_ANSWER_RATE,
    ("Revise", "math"): MATH_ANSWER_RATE, ("Programmer", "math"): 1.0,
    ("AnswerGenerate", "qa"): QA_ANSWER_RATE, ("Custom", "qa"): QA_ANSWER_RATE, ("Revise", "qa"): QA_REVISE_RATE,
    ("AnswerGenerate", "code"): 1 - CODE_BUG_RATE, ("Custom", "code"): 1 - CODE_BUG_RATE,
    ("Programmer", "code"): 1 - CODE_BUG_RATE, ("Revise", "code"): 1.0,
    **{("Review", domain): REVIEW_ACCURACY for domain in DOMAINS},
    **{("Format", domain): 1.0 for domain in DOMAINS},
}
EXECUTOR_OPERATORS = {domain: tuple(op for op, d in RIGHT_RATES if d == domain) for domain in DOMAINS}
FIRST_ANSWER = {"math": "AnswerGenerate", "qa": "AnswerGenerate", "code": "Programmer"}  # what Review, Format see
FIRST_PROMPTS = {"AnswerGenerate": answer_generate_prompt, "Programmer": programmer_prompt}
REVIEW_REASONS = {True: "The answer looks right.", False: "The answer looks wrong."}

# a planted bug: an integer constant of the solution's body off by one, or one of these slips; the last, a
# forgotten return, fails every test (no synthetic function returns None)
BUG_SLIPS = ((" + ", " - "), (" * ", " + "), (" > ", " >= "), (" > ", " < "), (" == ", " != "), ("[:", "[1:"),
             ("[-", "["), (".lower()", ".upper()"), (".count(", ".index("), ("'!'", "'.'"), ("return ", ""))

# -----------------------------------------------------------------------------
# Held-out tasks

TASK_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}
# the split's hash seed: fixed, so that every script agrees on which tasks are held out; 6 cuts the 209 code tasks
# of a size-1 world (their questions barely depend on the world's seed) closest to the shares: 144 / 23 / 42
SPLIT_SEED = 6
TASK_POOL = 400    # distinct tasks per domain that conversations draw from, at most (the rest repeat them)


def policy_prompt(task):
    """The policy's user message for one task (nanochat/workflow_tasks.py record): short, for a 256-token context."""
    return f"{POLICY_INSTRUCTION.format(domain=task['domain'])}\nTask: {task['question']}"


def task_part(task):
    """The part of TASK_SHARES a synthetic task belongs to, by its id alone."""
    return next(name for name, part in split_items([task], TASK_SHARES, SPLIT_SEED).items() if part)


def _distinct_tasks(world, domain, split, count, seed):
    """Up to count distinct tasks of one domain in one part, in draw order; fewer where the world runs out."""
    rng = random.Random(f"workflow-split-{world.seed}-{world.size}-{seed}-{domain}")
    found = {}
    for _ in range(100 + int(50 * count / TASK_SHARES[split])):  # generous: rare templates take many draws
        if len(found) == count:
            break
        task = SYNTHETIC_MAKERS[domain](world, rng)
        if task is not None and task["id"] not in found and task_part(task) == split:
            found[task["id"]] = task
    return list(found.values())


def synthetic_split(world_spec, split, n, seed, domain_ratios=None, at_most=False):
    """
    n distinct synthetic tasks of one part ("train", "val", "test") of the world {"seed", "size"} (a checkpoint's
    "world"), in domain_ratios (default workflow_tasks.DEFAULT_RATIOS), shuffled together; deterministic in
    (world, split, n, seed). Raises ValueError where the part has too few distinct tasks of a domain (code is the
    scarce one: 144 / 23 / 42 in a size-1 world), unless at_most: then such a domain gives all it has (a training
    pool).
    """
    if split not in TASK_SHARES:
        raise ValueError(f"synthetic workflow tasks are split into {', '.join(TASK_SHARES)}, not {split!r}")
    world = make_world(seed=world_spec["seed"], size=world_spec["size"])
    tasks = []
    for domain, count in domain_counts(n, DEFAULT_RATIOS if domain_ratios is None else domain_ratios).items():
        found = _distinct_tasks(world, domain, split, count, seed)
        if len(found) < count and not at_most:
            raise ValueError(f"the world (seed {world.seed}, size {world.size}) gave only {len(found)} distinct "
                             f"{domain} tasks in {split!r} of the {count} asked for")
        tasks += found
    random.Random(f"workflow-split-order-{world.seed}-{world.size}-{seed}").shuffle(tasks)
    return tasks


def _conversation_tasks(world, split, n, seed):
    """n tasks of one part in DEFAULT_RATIOS, shuffled: each distinct task of a pool of up to TASK_POOL per domain
    once, then repeats drawn from the pool (the world has only about 209 code tasks)."""
    rng = random.Random(f"workflow-conversation-tasks-{seed}")
    tasks = []
    for domain, count in domain_counts(n, DEFAULT_RATIOS).items():
        pool = _distinct_tasks(world, domain, split, min(count, TASK_POOL), seed)
        if count and not pool:
            raise ValueError(f"the world (seed {world.seed}, size {world.size}) has no {domain} tasks in {split!r}")
        tasks += pool + rng.choices(pool, k=count - len(pool))
    rng.shuffle(tasks)
    return tasks


# -----------------------------------------------------------------------------
# The policy's conversations

def policy_conversations(world, n, seed, split="train"):
    """n conversations [user: policy_prompt(task), assistant: a candidate workflow of its domain, uniformly]."""
    rng = random.Random(f"workflow-policy-{seed}")
    return [[{"role": "user", "content": policy_prompt(task)},
             {"role": "assistant", "content": rng.choice(WORKFLOWS[task["domain"]])}]
            for task in _conversation_tasks(world, split, n, f"policy-{seed}")]


# -----------------------------------------------------------------------------
# Right and wrong answers

def _attribute_values(world):
    """Each value a synthetic QA answer can hold -> every value of its attribute in the world."""
    pools = [world.specs[cluster].candidates for cluster in QA_FACT_CLUSTERS if world.specs[cluster].candidates]
    pools.append(tuple(person.name for person in world.people))  # who lives in a city, who has a pet
    pools.append(tuple(sorted({item["value"] for item in world.specs["age"].items}, key=int)))
    return {value: pool for pool in pools for value in pool}


def _wrong_qa_answer(world, reference, rng):
    """Another answer of the same kind: each value replaced by another value of its attribute; a list of names
    (a region's cities, a city's people) by as many other names, sorted like the reference."""
    pool_of = _attribute_values(world)
    values = reference.split(", ")
    for value in values:
        if value not in pool_of:
            raise ValueError(f"no attribute of the world holds {value!r} (of the answer {reference!r})")
    if len({pool_of[value] for value in values}) > 1:  # "turtle, Velo": a pet and its name
        return ", ".join(rng.choice([other for other in pool_of[value] if other != value]) for value in values)
    others = [other for other in pool_of[values[0]] if other not in values]
    if not others:
        raise ValueError(f"the world has no wrong answer to {reference!r}")
    return ", ".join(sorted(rng.sample(others, min(len(values), len(others)))))


def _wrong_number(reference, rng):
    """A slip of a synthetic math answer (a whole number >= 100): its leading digit off by 1 or 2, a relative
    error of 10% or more, so that it never reaches the reward's accuracy tier."""
    if not reference.isdigit():
        raise ValueError(f"synthetic math answers are whole numbers, not {reference!r}")
    lead = int(reference[0])
    return str(rng.choice([d for d in range(1, 10) if 0 < abs(d - lead) <= 2])) + reference[1:]


def _run_here(task, program):
    """(tests passed, [(test index, exception)]) of a program on a code task, run in this process: the programs
    are our own (the task's solution and its planted bugs), and a sandbox start per example would be slow."""
    namespace, passed, failures = {}, 0, []
    exec(program, namespace)
    for i, snippet in enumerate(task["tests"]):
        try:
            exec(compile(snippet, f"<test {i}>", "exec"), namespace)
            passed += 1
        except Exception as e:
            failures.append((i, e))
    return passed, failures


def check_program(task, program):
    """operators.test's update {"passed", "feedback"} for a program on a code task (the tests run by _run_here,
    each failure reported in the sandbox's words: "test i failed: Error: message")."""
    passed, failures = _run_here(task, program)
    total = len(task["tests"])
    stderr = "\n".join(f"test {i} failed: {type(e).__name__}: {e}" for i, e in failures)
    result = ExecutionResult("ok" if passed == total else "failed", int(passed < total), "", stderr, False, 0.0,
                             passed, total, False, False, -1)
    step = test(State(task["question"], "code", task["entry_point"], tuple(task["tests"]), answer=program))
    next(step)  # its one request: the run made here
    try:
        step.send(result)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("operators.test asked for more than one run")


def planted_bug(task, rng):
    """The task's solution with a plausible bug, chosen at random among those that fail at least one of its tests
    by a wrong value (an AssertionError; a crash's message would make Revise's prompt too long for the context):
    an integer constant of its body off by one, or a slip of BUG_SLIPS (a wrong operator or method)."""
    header, body = task["answer"].strip().split("\n", 1)
    bodies = [body[:m.start()] + str(int(m.group()) + delta) + body[m.end():]
              for m in re.finditer(r"\d+", body) for delta in (-1, 1)]
    bodies += [body.replace(old, new, 1) for old, new in BUG_SLIPS if old in body]
    rng.shuffle(bodies)
    for buggy in bodies:
        program = f"{header}\n{buggy}"
        _, failures = _run_here(task, program)
        if failures and all(isinstance(e, AssertionError) for _, e in failures):
            return program
    raise ValueError(f"no planted bug fails a test of {task['id']} by a wrong value: {task['answer']!r}")


def _answer(world, task, right, rng):
    """An answer in the form the domain's operators hold it: the reference (the solution program for code), or a
    wrong one."""
    if task["domain"] == "math":
        return task["answer"] if right else _wrong_number(task["answer"], rng)
    if task["domain"] == "qa":
        return task["answer"][0] if right else _wrong_qa_answer(world, task["answer"][0], rng)
    return task["answer"].strip() if right else planted_bug(task, rng)


def _reply(domain, answer):
    return f"```python\n{answer}\n```" if domain == "code" else f"Answer: {answer}"


# -----------------------------------------------------------------------------
# The executor's conversations

def executor_example(world, task, operator, rng):
    """
    One executor example of an operator on a task: {"task", "operator", "state" (the operators.State it answers),
    "prompt", "reply", "update"}, update being what the operator should make of the reply (its returned dict, or
    for math's Programmer the program it runs: {"code": ...}).
    """
    domain = task["domain"]
    state = State(task["question"], domain, task["entry_point"], tuple(task["tests"]))
    right = rng.random() < RIGHT_RATES[(operator, domain)]
    if operator == "Review":
        proposed_right = rng.random() < RIGHT_RATES[(FIRST_ANSWER[domain], domain)]
        state = replace(state, answer=_answer(world, task, proposed_right, rng))
        verdict = proposed_right == right  # a true verdict says what the answer is
        prompt, update = review_prompt(state), {"passed": verdict, "feedback": REVIEW_REASONS[verdict]}
        reply = f"Verdict: {'correct' if verdict else 'incorrect'}. {REVIEW_REASONS[verdict]}"
    elif operator == "Programmer" and domain == "math":
        program = task["solution"].strip()  # the question's numbers, copied into one expression
        prompt, reply, update = programmer_prompt(state), _reply("code", program), {"code": program}
    else:
        if operator == "Format":
            proposed_right = rng.random() < RIGHT_RATES[(FIRST_ANSWER[domain], domain)]
            state = replace(state, answer=_answer(world, task, proposed_right, rng))
            answer, prompt = state.answer, format_prompt(state)
        elif operator == "Revise":
            wrong = _answer(world, task, False, rng)
            feedback = check_program(task, wrong)["feedback"] if domain == "code" else REVIEW_REASONS[False]
            state = replace(state, answer=wrong, feedback=feedback)
            answer = _answer(world, task, right, rng)
            prompt = revise_prompt(state)
        else:  # a first answer, from the task alone
            answer = _answer(world, task, right, rng)
            prompt = (custom_prompt(state, CUSTOM_INSTRUCTIONS[domain]) if operator == "Custom"
                      else FIRST_PROMPTS[operator](state))
        reply, update = _reply(domain, answer), {"answer": answer}
    return {"task": task, "operator": operator, "state": state, "prompt": prompt, "reply": reply, "update": update}


def executor_examples(world, n, seed, split="train"):
    """n executor examples of tasks of one part, each of an operator drawn uniformly from EXECUTOR_OPERATORS."""
    rng = random.Random(f"workflow-executor-{seed}")
    return [executor_example(world, task, rng.choice(EXECUTOR_OPERATORS[task["domain"]]), rng)
            for task in _conversation_tasks(world, split, n, f"executor-{seed}")]


def executor_conversations(world, n, seed, split="train"):
    """n conversations [user: an operator's prompt, assistant: its planted reply] (executor_examples)."""
    return [[{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["reply"]}]
            for example in executor_examples(world, n, seed, split)]


def sft_conversations(world_spec, n, policy_share, seed):
    """
    n conversations for workflow GRPO's SFT, round(n * policy_share) of them the policy's and the rest the
    executor's, from the "train" tasks only of the world {"seed", "size"} (a checkpoint's "world"), so that the
    "val" and "test" tasks stay unseen.
    """
    world = make_world(seed=world_spec["seed"], size=world_spec["size"])
    num_policy = round(n * policy_share)
    return policy_conversations(world, num_policy, seed) + executor_conversations(world, n - num_policy, seed)
