"""
The operators of Workflow GRPO (nanochat/workflow.py parses workflows of them and runs them): each is a short
prompt to the executor model plus the parsing of its reply, and for Programmer and Test a run in the sandbox.

A workflow branch carries a State: the task (question, domain, and for code the entry point and tests) and what
the operators have made of it so far:

    answer      the current candidate; for code tasks, the program text
    code        the program of math's Programmer (Test runs it again to check the answer)
    feedback    what the last Test, Review or failed Programmer run had to say, for Revise
    passed      the verdict of the last Test or Review, read by the workflow's `?`
    candidates  the answers of a parallel block's branches, for ScEnsemble

An operator is a generator function of the state (Custom also takes its instruction): it yields requests, a
Call(prompt) for the executor or a Run(program, tests) for the sandbox, receives each one's result (the response
text; an ExecutionResult that finished in time: the interpreter ends the workflow on a timeout), and returns the
updates to the state as a dict. Writing each operator as one generator keeps it readable top to bottom while the
interpreter batches the requests of all workflows of a round. ScEnsemble needs neither, so it is a plain function.

Prompts are a couple of lines, since the local executor is a tiny model with a 256-512 token context. The prompt
functions (`<operator>_prompt(state)`) and the reply parsers (parse_answer, extract_code, parse_verdict) are
public, so that SFT data for the executor can be written in exactly the format the operators read.
"""

import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

DOMAINS = ("math", "qa", "code")


@dataclass(frozen=True)
class State:
    """One branch's state (see the module docstring). Frozen: parallel branches start from the same state and
    must not see each other's updates."""
    question: str
    domain: str
    entry_point: str = ""  # code tasks: the function to write
    tests: tuple = ()      # code tasks: assert snippets
    setup: str = ""        # code tasks: code the tests need before the program (HumanEval's imports and helpers)
    answer: str = ""
    code: str = ""
    feedback: str = ""
    passed: bool = False
    candidates: tuple = ()


@dataclass(frozen=True)
class Call:
    """A request for one executor completion of a user message."""
    prompt: str


@dataclass(frozen=True)
class Run:
    """A request for one sandbox run: run_python(program), or run_tests(program, tests) when tests is not None."""
    program: str
    tests: tuple | None = None


# -----------------------------------------------------------------------------
# reading replies

# a minus counts only where it cannot be a subtraction: "10-2" is 10 and 2
NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)  # a cut-off block counts
VERDICT = re.compile(r"verdict\W*:\W*(correct|incorrect)\b", re.I)
ARTICLES = {"a", "an", "the"}


def parse_answer(response):
    """The text after the last "Answer:" line's colon; without one, the last non-empty line."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"\W*answer\W*:\W*(.*)", line, re.I)  # "Answer: 5", "**Answer:** 5"
        if match:
            return match.group(1).strip()
    return lines[-1] if lines else ""


def extract_code(response):
    """The first ```python block of the response (to its end if the block was cut off); else the whole text."""
    match = CODE_BLOCK.search(response)
    code = match.group(1) if match else response
    return code.strip("\n").rstrip()


def parse_verdict(response):
    """(passed, reason) from a review: "Verdict: correct|incorrect" plus the rest of the reply as the reason.
    A reply without a verdict does not pass, so a workflow falls back to revising rather than trusting it."""
    match = VERDICT.search(response)
    if not match:
        return False, "the review gave no verdict"
    rest = response[:match.start()] + response[match.end():]
    reason = " ".join(rest.split()).lstrip(" .,:-*")  # what the verdict's own punctuation leaves
    return match.group(1).lower() == "correct", reason[:200]


def as_number(text):
    """The last number in a text as a Decimal ("1,234" is 1234), or None."""
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def normalise(answer, domain):
    """The form in which two answers count as the same: math compares numbers ("5.0" is "5") where there is one,
    code compares the program without blank lines and trailing spaces, and other text is compared lowercased,
    without punctuation and articles."""
    if domain == "math" and as_number(answer) is not None:
        return format(as_number(answer).normalize(), "f")
    if domain == "code":
        return "\n".join(line.rstrip() for line in answer.splitlines() if line.strip())
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(word for word in words if word not in ARTICLES)


def _candidate(response, state):
    """A reply's new answer: the program for code tasks, the answer line otherwise."""
    return extract_code(response) if state.domain == "code" else parse_answer(response)


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _error_line(result):
    """What a failed run has to say: the last line of its stderr (the exception), else its status."""
    return _last_line(result.stderr) or f"the program {result.status}"


def _math_program(code):
    return f"{code}\n\nprint(solve())\n"


# -----------------------------------------------------------------------------
# prompts

def _finish(state):
    """The closing line: how the reply gives its answer."""
    if state.domain == "code":
        return f"Write {state.entry_point} in one ```python block."
    return 'End with the line "Answer: <answer>".'


def _shown(state):
    """The current answer, as the prompts show it."""
    if state.domain == "code":
        return f"Program:\n{state.answer}"
    return f"Proposed answer: {state.answer}"


def answer_generate_prompt(state):
    return f"{state.question}\nThink briefly, then answer. {_finish(state)}"


def custom_prompt(state, instruction):
    shown = [_shown(state)] if state.answer else []
    return "\n".join([instruction, f"Question: {state.question}", *shown, _finish(state)])


def programmer_prompt(state):
    if state.domain == "code":
        return f"{state.question}\n{_finish(state)}"
    return (f"{state.question}\n"
            "Write a Python function solve() that computes and returns the answer, in one ```python block.")


def review_prompt(state):
    return (f"Question: {state.question}\n{_shown(state)}\n"
            'Is it correct? Reply "Verdict: correct" or "Verdict: incorrect" and one short reason.')


def revise_prompt(state):
    return (f"Question: {state.question}\n{_shown(state)}\n"
            f"Feedback: {state.feedback or 'none'}\nFix it. {_finish(state)}")


def format_prompt(state):
    return (f"Question: {state.question}\n{_shown(state)}\n"
            f"Restate only the final answer, as short as possible. {_finish(state)}")


# -----------------------------------------------------------------------------
# operators

def answer_generate(state):
    response = yield Call(answer_generate_prompt(state))
    return {"answer": _candidate(response, state)}


def custom(state, instruction):
    response = yield Call(custom_prompt(state, instruction))
    return {"answer": _candidate(response, state)}


def programmer(state):
    """Code: the program is the answer. Math: the program's printed solve() is the answer; when it fails, the
    answer stays and the error becomes the feedback."""
    response = yield Call(programmer_prompt(state))
    program = extract_code(response)
    if state.domain == "code":
        return {"answer": program}
    result = yield Run(_math_program(program))
    if result.status == "ok":
        return {"code": program, "answer": _last_line(result.stdout), "feedback": ""}  # last: past debug prints
    return {"code": program, "feedback": _error_line(result)}


def test(state):
    """Code: run the task's tests on the program. Math: run Programmer's program again and check that it prints
    the current answer (a number). No executor call either way."""
    if state.domain == "code":
        # the program as the reward runs it: after the task's setup
        result = yield Run(f"{state.setup}\n\n{state.answer}\n" if state.setup else state.answer, state.tests)
        feedback = f"passed {result.passed}/{result.total}"
        failure = re.search(r"^test (\d+) failed: (.*)$", result.stderr, re.M)
        if failure:  # which test failed and how, not its text: its literals would crowd the 256-token context
            feedback += f"; test {int(failure.group(1)) + 1} failed: {failure.group(2).strip().removesuffix(':')}"
        elif result.status != "ok":  # the program itself failed before the tests ran
            feedback += f"; {_error_line(result)}"
        return {"passed": result.status == "ok", "feedback": feedback}
    if not state.code:
        return {"passed": False, "feedback": "there is no program to test"}
    result = yield Run(_math_program(state.code))
    if result.status != "ok":
        return {"passed": False, "feedback": _error_line(result)}
    printed, expected = as_number(_last_line(result.stdout)), as_number(state.answer)
    if printed is not None and printed == expected:
        return {"passed": True, "feedback": "the program agrees with the answer"}
    return {"passed": False, "feedback": f"the program printed {_last_line(result.stdout)!r}, not {state.answer!r}"}


def review(state):
    response = yield Call(review_prompt(state))
    passed, reason = parse_verdict(response)
    return {"passed": passed, "feedback": reason}


def revise(state):
    response = yield Call(revise_prompt(state))
    return {"answer": _candidate(response, state)}


def sc_ensemble(state):
    """Self-consistency: the most common of the branches' answers (normalised), ties to the earliest branch.
    AFlow asks the LLM to pick the most consistent answer; counting is deterministic, free, and does not depend
    on a tiny executor reading several answers in its short context."""
    keys = [normalise(candidate, state.domain) for candidate in state.candidates]
    counts = Counter(keys)
    best = max(keys, key=counts.__getitem__)  # max keeps the first of equal counts
    return {"answer": state.candidates[keys.index(best)]}


def format_answer(state):
    response = yield Call(format_prompt(state))
    return {"answer": _candidate(response, state)}


@dataclass(frozen=True)
class Operator:
    """step(state) (or step(state, argument)): the generator above, or a plain function for no requests.
    calls: executor calls per application (the validator's worst case). domains: the task domains it fits.
    argument: takes a quoted string, as Custom("...") does."""
    step: Callable
    calls: int
    domains: tuple = DOMAINS
    argument: bool = False


OPERATORS = {
    "AnswerGenerate": Operator(answer_generate, calls=1),
    "Programmer": Operator(programmer, calls=1, domains=("math", "code")),
    "Test": Operator(test, calls=0, domains=("math", "code")),
    "Review": Operator(review, calls=1),
    "Revise": Operator(revise, calls=1),
    "ScEnsemble": Operator(sc_ensemble, calls=0),
    "Format": Operator(format_answer, calls=1),
    "Custom": Operator(custom, calls=1, argument=True),
}
