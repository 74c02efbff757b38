"""
The workflow language of Workflow GRPO: parser, validator and canonical text (nanochat/workflow.py), the operators'
reply parsing (nanochat/operators.py), and the interpreter against a scripted executor, with real sandbox runs.
"""

import pytest

from nanochat import workflow
from nanochat.operators import State, extract_code, parse_answer, parse_verdict, sc_ensemble
from nanochat.workflow import (Cond, Loop, Op, Parallel, Seq, WorkflowError, check, max_calls, operators_used, parse,
                               run_workflows, to_text, validate)


class Scripted:
    """An executor that answers each prompt with the response of the first rule whose keys all occur in it, and
    records every batch of prompts it is sent."""

    def __init__(self, rules):
        self.rules = [((keys,) if isinstance(keys, str) else keys, response) for keys, response in rules]
        self.batches = []

    def complete(self, prompts, temperature, max_tokens):
        self.batches.append(list(prompts))
        responses = []
        for prompt in prompts:
            matching = [response for keys, response in self.rules if all(key in prompt for key in keys)]
            assert matching, f"no scripted response for {prompt!r}"
            responses.append(matching[0])
        return responses


def math_task(question):
    return {"id": question, "domain": "math", "question": question, "answer": ""}


def qa_task(question):
    return {"id": question, "domain": "qa", "question": question, "answer": ""}


def add_task(question):
    return {"id": question, "domain": "code", "question": question, "answer": "", "entry_point": "add",
            "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}


def program(body):
    return f"Here it is.\n```python\ndef add(a, b):\n    return {body}\n```\n"


def operators_of(result, branch=""):
    return [step.operator for step in result.trace if step.branch == branch]


# -----------------------------------------------------------------------------
# parsing and validation

@pytest.mark.parametrize("text, canonical", [
    ("AnswerGenerate", "AnswerGenerate"),
    ("AnswerGenerate->Review->Format", "AnswerGenerate -> Review -> Format"),
    ("[AnswerGenerate,AnswerGenerate ,  AnswerGenerate]->ScEnsemble",
     "[AnswerGenerate, AnswerGenerate, AnswerGenerate] -> ScEnsemble"),
    ("[AnswerGenerate -> Review, Programmer] -> ScEnsemble", "[AnswerGenerate -> Review, Programmer] -> ScEnsemble"),
    ("Programmer -> Test ? done : Revise", "Programmer -> Test ? done : Revise"),
    ("Test ? done : ( Revise -> Test )", "Test ? done : (Revise -> Test)"),
    ("Review ? done : Test ? done : Revise", "Review ? done : Test ? done : Revise"),
    ("( Review -> Revise ) *2", "(Review -> Revise) * 2"),
    ("Programmer -> ((Test ? done : Revise)) * 3 -> Format", "Programmer -> (Test ? done : Revise) * 3 -> Format"),
    ("AnswerGenerate -> (Review -> (Revise))", "AnswerGenerate -> Review -> Revise"),
    ('Custom( "Say \\"why\\", then \\\\ answer." ) -> Format', 'Custom("Say \\"why\\", then \\\\ answer.") -> Format'),
])
def test_valid_workflows_round_trip_through_canonical_text(text, canonical):
    # catches: a construct the parser drops or mis-nests, or that to_text writes in a form that parses differently
    ast = parse(text)
    assert to_text(ast) == canonical
    assert parse(to_text(ast)) == ast


def test_parse_builds_the_documented_ast():
    # catches: '?' binding a whole sequence as its else branch, loops losing their count, unflattened groups
    assert parse("Programmer -> (Test ? done : Revise) * 3") == \
        Seq((Op("Programmer"), Loop(Cond(Op("Test"), Op("Revise")), 3)))
    assert parse("Test ? done : Revise -> Format") == Seq((Cond(Op("Test"), Op("Revise")), Op("Format")))
    assert parse("Test ? done : (Revise -> Format)") == Cond(Op("Test"), Seq((Op("Revise"), Op("Format"))))
    assert parse("[AnswerGenerate, Custom(\"Be brief.\")] -> ScEnsemble") == \
        Seq((Parallel((Op("AnswerGenerate"), Op("Custom", "Be brief."))), Op("ScEnsemble")))
    assert parse("AnswerGenerate -> (Review -> Revise)") == parse("AnswerGenerate -> Review -> Revise")


@pytest.mark.parametrize("text, domain, col, message", [
    ("[AnswerGenerate, AnswerGenerate -> ScEnsemble", "math", 46,
     "expected '->', ',' or ']' (to close the '[' at col 1), found end of workflow"),
    ("AnswerGenerate -> Reviewer", "qa", 19, "unknown operator 'Reviewer'"),
    ("AnswerGenerate -> ScEnsemble", "qa", 19, "ScEnsemble must follow a parallel block"),
    ("AnswerGenerate -> [AnswerGenerate, Review] -> Format", "qa", 19, "must be followed by '-> ScEnsemble'"),
    ("AnswerGenerate -> (Review -> Revise) * 9", "qa", 40, "loop bound 9 is out of range 1..3"),
    ("AnswerGenerate -> Programmer", "qa", 19, "Programmer does not fit qa tasks"),
    ("AnswerGenerate Review", "qa", 16, "expected '->' or end of workflow, found 'Review'"),
    ("Test->Revise [", "code", 14, "expected '->' or end of workflow, found '['"),
    ("Programmer -> Revise * 2", "math", 22, "a loop needs parentheses"),
    ("AnswerGenerate -> Revise ? done : Format", "qa", 19, "the condition before '?' must be Test or Review"),
    ("Programmer -> done", "math", 15, "'done' can only follow '?'"),
    ("Review ? stop : Revise", "qa", 10, "expected 'done' after '?', found 'stop'"),
    ('AnswerGenerate -> Custom("unfinished', "qa", 26, "unterminated string"),
    ('Custom("  ")', "qa", 1, "instruction is empty"),
    ("[AnswerGenerate] -> ScEnsemble", "qa", 1, "2 to 5 branches, not 1"),
    ("[(Review ? done : (Revise) * 2) * 2, AnswerGenerate] -> ScEnsemble", "qa", 30, "nested more than 3 levels"),
    ("[(AnswerGenerate -> Review) * 2, (AnswerGenerate -> Review) * 2, (AnswerGenerate -> Review) * 2, Format]"
     " -> ScEnsemble", "qa", 1, "may make 13 executor calls, more than 12"),
    ("AnswerGenerate -> %", "qa", 19, "unexpected character '%'"),
])
def test_invalid_workflows_name_the_column_and_the_problem(text, domain, col, message):
    # catches: an error reported at the wrong column (0- vs 1-based, the start instead of the offending token),
    # or an invalid workflow that passes
    with pytest.raises(WorkflowError) as info:
        check(text, domain)
    assert info.value.position == col - 1
    assert str(info.value).startswith(f"col {col}: ")
    assert message in str(info.value)


def test_validate_returns_every_problem_in_text_order():
    # catches: a validator that stops at the first problem, or checks the domain of the condition of '?' not at all
    problems = validate(parse("Programmer -> Test ? done : Revise -> [Format, Format]"), "qa")
    assert [(p.position, p.message.split(" ")[0]) for p in problems] == [(0, "Programmer"), (14, "Test"), (38, "a")]
    assert validate(parse("Programmer -> Test ? done : Revise -> [Format, Format] -> ScEnsemble"), "math") == []


def test_max_calls_counts_the_worst_case_and_operators_used_lists_them():
    # catches: loops counted once, Test/ScEnsemble counted as executor calls, a condition's else branch left out
    ast = parse('(Review -> Revise) * 3 -> [AnswerGenerate, Programmer, Custom("x")] -> ScEnsemble -> '
                'Test ? done : Revise')
    assert max_calls(ast) == 3 * 2 + 3 + 0 + 0 + 1
    assert operators_used(ast) == ["Review", "Revise", "AnswerGenerate", "Programmer", "Custom", "ScEnsemble",
                                   "Test", "Revise"]


# -----------------------------------------------------------------------------
# operators' reply parsing

def test_operators_read_the_replies_format():
    # catches: the first "Answer:" line taken instead of the last, code outside the block kept, "incorrect" read
    # as "correct", a missing verdict read as a pass
    assert parse_answer("Answer: 3\nWait, no.\n**Answer:** 4\n") == "4"
    assert parse_answer("It is\nclearly 7\n\n") == "clearly 7"
    assert extract_code("Sure:\n```python\nx = 1\n```\nand\n```python\ny = 2\n```") == "x = 1"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off by max_tokens
    assert extract_code("def f(): pass") == "def f(): pass"
    assert parse_verdict("Verdict: **incorrect**\nThe sum is off by one.") == (False, "The sum is off by one.")
    assert parse_verdict("Looks fine.\nverdict: Correct") == (True, "Looks fine.")
    assert parse_verdict("I think it is correct.")[0] is False


def test_ensemble_votes_on_normalised_answers_ties_to_the_first():
    # catches: a vote on raw strings, a tie going to the last or most recent branch
    def vote(domain, *candidates):
        return sc_ensemble(State("q", domain, candidates=candidates))["answer"]
    assert vote("math", "7", "5.0", "x = 5", "7.00", "5") == "5.0"
    assert vote("qa", "Blue", "the red.", "blue", "Red") == "Blue"
    assert vote("qa", "The Red.", "blue", "red") == "The Red."


# -----------------------------------------------------------------------------
# the interpreter

def test_one_round_of_three_jobs_is_one_executor_batch():
    # catches: a driver that calls the executor once per job or per operator instead of once per round
    executor = Scripted([
        ("What is 2 + 2?\nThink", "2 and 2 make 4.\nAnswer: 4"),
        ("Where is Korlin?\nThink", "Answer: by the river"),
        ("What does Zavu like?\nThink", "Answer: red apples"),
        ("Is it correct?", "Verdict: correct\nIt checks out."),
        ("Restate only", "Answer: apples"),
    ])
    jobs = [("AnswerGenerate -> Review", math_task("What is 2 + 2?")),
            ("AnswerGenerate -> Review", qa_task("Where is Korlin?")),
            ("AnswerGenerate -> Review -> Format", qa_task("What does Zavu like?"))]
    results = run_workflows(jobs, executor)
    assert [len(batch) for batch in executor.batches] == [3, 3, 1]
    assert all("Think" in prompt for prompt in executor.batches[0])
    assert all("Is it correct?" in prompt for prompt in executor.batches[1])
    assert [r.answer for r in results] == ["4", "by the river", "apples"]
    assert [r.calls for r in results] == [2, 2, 3]
    assert [r.error for r in results] == [None, None, None]
    assert results[0].trace[1].feedback == "It checks out."


def test_parallel_branches_share_a_round_and_are_voted():
    # catches: branches run one after another, their answers not handed to ScEnsemble, or a raw-string vote
    executor = Scripted([
        (("Use algebra.", "What is 2 + 3?"), "Answer: 5.0"),
        (("Count on fingers.", "What is 2 + 3?"), "One, two...\nAnswer: 5"),
        ("What is 2 + 3?\nThink", "Answer: 7"),
        ("Where is Korlin?\nThink", "Answer: north"),
    ])
    jobs = [('[AnswerGenerate, Custom("Use algebra."), Custom("Count on fingers.")] -> ScEnsemble',
             math_task("What is 2 + 3?")),
            ("AnswerGenerate", qa_task("Where is Korlin?"))]
    ensemble, single = run_workflows(jobs, executor)
    assert [len(batch) for batch in executor.batches] == [4]
    assert ensemble.answer == "5.0" and ensemble.calls == 3 and ensemble.error is None
    assert sorted(step.branch for step in ensemble.trace) == ["", "1", "2", "3"]
    assert operators_of(ensemble) == ["ScEnsemble"]
    assert single.answer == "north"


def test_test_then_done_skips_revise_when_the_tests_pass_and_revises_when_they_fail():
    # catches: a '?' that ignores Test's verdict (always or never revising), or a Test that does not really run the
    # task's tests in the sandbox
    executor = Scripted([
        (("Feedback:", "(second)"), program("a + b")),
        ("Write add(a, b). (first)", program("a + b")),
        ("Write add(a, b). (second)", program("abs(a) + b")),
    ])
    jobs = [("Programmer -> Test ? done : Revise", add_task("Write add(a, b). (first)")),
            ("Programmer -> Test ? done : Revise", add_task("Write add(a, b). (second)"))]
    passing, failing = run_workflows(jobs, executor)
    assert operators_of(passing) == ["Programmer", "Test"]
    assert passing.answer == "def add(a, b):\n    return a + b" and passing.calls == 1
    assert operators_of(failing) == ["Programmer", "Test", "Revise"]
    assert failing.trace[1].feedback == "passed 1/2; test 2 failed: AssertionError"
    assert "passed 1/2; test 2 failed: AssertionError" in failing.trace[2].prompt
    assert failing.answer == "def add(a, b):\n    return a + b" and failing.calls == 2
    assert [len(batch) for batch in executor.batches] == [2, 1]  # the Test round makes no executor call


def test_test_runs_the_program_after_the_tasks_setup():
    # catches: Test running the bare program while the reward runs it after the setup (HumanEval's imports and
    # helpers): a right program would fail Test and be revised away
    executor = Scripted([("Write add(a, b).", program("a + b"))])
    task = add_task("Write add(a, b).") | {"setup": "OFFSET = 0\n", "tests": ["assert add(1, 2) == 3 + OFFSET"]}
    (result,) = run_workflows([("Programmer -> Test ? done : Revise", task)], executor)
    assert operators_of(result) == ["Programmer", "Test"] and result.trace[1].feedback == "passed 1/1"


def test_loops_run_exactly_n_times_and_done_ends_the_loop():
    # catches: an off-by-one loop, a loop run once, or a `done` that only skips the else branch (the loop would
    # go on testing)
    executor = Scripted([
        ("Is it correct?", "Verdict: incorrect\nToo vague."),
        (("Feedback: Too vague.", "Where is Korlin?"), "Answer: north of the river"),
        ("Where is Korlin?\nThink", "Answer: north"),
        (("Feedback:", "return a * b"), program("a + b")),
        ("Write add(a, b).", program("a * b")),
    ])
    jobs = [("AnswerGenerate -> (Review -> Revise) * 2", qa_task("Where is Korlin?")),
            ("Programmer -> (Test ? done : Revise) * 3", add_task("Write add(a, b)."))]
    looped, retried = run_workflows(jobs, executor)
    assert operators_of(looped) == ["AnswerGenerate", "Review", "Revise", "Review", "Revise"]
    assert looped.calls == 5 and looped.answer == "north of the river"
    assert operators_of(retried) == ["Programmer", "Test", "Revise", "Test"]
    assert retried.trace[-1].feedback == "passed 2/2" and retried.calls == 2


def test_programmer_runs_its_program_in_the_sandbox():
    # catches: an answer read from the reply's text instead of the program's output, a failed run that still
    # replaces the answer, or a math Test that does not compare the program's output with the answer
    executor = Scripted([
        ("What is 23 plus 45?\nWrite a Python function solve()", "```python\ndef solve():\n    return 23 + 45\n```"),
        ("Feedback:", "Answer: 70"),
        ("What is 3 times 4?\nThink", "Answer: 12"),
        ("What is 3 times 4?\nWrite a Python function solve()", "```python\ndef solve():\n    return 3 / 0\n```"),
    ])
    jobs = [("Programmer -> Test", math_task("What is 23 plus 45?")),
            ("AnswerGenerate -> Programmer -> Test", math_task("What is 3 times 4?")),
            ("Programmer -> Revise -> Test", math_task("What is 23 plus 45?"))]
    ran, failed, revised = run_workflows(jobs, executor)
    assert ran.answer == "68" and ran.error is None
    assert ran.trace[-1].feedback == "the program agrees with the answer"
    assert revised.answer == "70" and revised.trace[-1].feedback == "the program printed '68', not '70'"
    assert failed.answer == "12" and failed.error is None
    assert failed.trace[1].feedback == "ZeroDivisionError: division by zero"
    assert failed.trace[2].feedback == "ZeroDivisionError: division by zero"  # Test: no passing program


def test_a_hostile_program_times_out_into_an_error_and_the_other_jobs_finish():
    # catches: a timeout that raises out of run_workflows (stopping every job), hangs the round, or is left as an
    # ordinary answer the reward would score
    executor = Scripted([
        ("What is 1 + 1?\nWrite", "```python\ndef solve():\n    while True:\n        pass\n```"),
        ("What is 2 + 2?\nThink", "Answer: 4"),
        ("Is it correct?", "Verdict: correct\nFine."),
        ("Write add(a, b).", program("a + b")),
    ])
    jobs = [("Programmer -> Review", math_task("What is 1 + 1?")),
            ("AnswerGenerate -> Review", math_task("What is 2 + 2?")),
            ("Programmer -> Test ? done : Revise", add_task("Write add(a, b)."))]
    hostile, plain, code = run_workflows(jobs, executor, execution_timeout=1.0)
    assert hostile.error.startswith("timeout: Programmer's program was stopped")
    assert hostile.answer == "" and operators_of(hostile) == ["Programmer"] and hostile.calls == 1
    assert not any("What is 1 + 1?" in prompt for batch in executor.batches[1:] for prompt in batch)
    assert (plain.answer, plain.calls, plain.error) == ("4", 2, None)
    assert code.error is None and operators_of(code) == ["Programmer", "Test"]


def test_a_sandbox_that_cannot_start_fails_only_its_job(monkeypatch):
    # catches: a sandbox start failure (RuntimeError) that crashes the round for every job
    def cannot_start(program, timeout):
        raise RuntimeError("the execution sandbox failed to start")
    monkeypatch.setattr(workflow, "run_python", cannot_start)
    executor = Scripted([("What is 23 plus 45?\nWrite", "```python\ndef solve():\n    return 68\n```"),
                         ("Where is Korlin?\nThink", "Answer: north")])
    jobs = [("Programmer", math_task("What is 23 plus 45?")), ("AnswerGenerate", qa_task("Where is Korlin?"))]
    broken, fine = run_workflows(jobs, executor)
    assert broken.error == "execution failure: Programmer's sandbox run failed: the execution sandbox failed to start"
    assert fine.answer == "north" and fine.error is None


def test_an_invalid_workflow_gets_an_error_result_without_a_call():
    # catches: an invalid workflow that is run anyway (Programmer on a qa task) or that crashes the whole batch
    executor = Scripted([("Where is Korlin?\nThink", "Answer: north")])
    jobs = [("Programmer -> Test", qa_task("Who is Zavu?")),
            ("AnswerGenerate ->", qa_task("Who is Vesh?")),
            ("AnswerGenerate", qa_task("Where is Korlin?"))]
    wrong_domain, broken, fine = run_workflows(jobs, executor)
    assert wrong_domain.error == "invalid workflow: col 1: Programmer does not fit qa tasks, only math, code"
    assert broken.error.startswith("invalid workflow: col 18: expected an operator")
    assert (wrong_domain.calls, broken.calls, wrong_domain.trace) == (0, 0, [])
    assert executor.batches == [['Where is Korlin?\nThink briefly, then answer. End with the line "Answer: <answer>".']]
    assert fine.answer == "north"
