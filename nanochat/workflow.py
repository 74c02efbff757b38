"""
The workflow language of Workflow GRPO: a policy model writes a one-line workflow of operators
(nanochat/operators.py), we parse it, validate it for the task's domain, and run it with an executor model.

    AnswerGenerate -> Review ? done : Revise -> Format
    [AnswerGenerate, Programmer, Custom("Work backwards.")] -> ScEnsemble
    Programmer -> (Test ? done : Revise) * 3

Grammar (whitespace is ignored):

    workflow := sequence END
    sequence := term ('->' term)*
    term     := primary ('?' 'done' ':' term)?          the primary before '?' must be Test or Review
    primary  := NAME | NAME '(' STRING ')'              an operator; only Custom takes a string ("...", \\" \\\\)
              | '[' sequence (',' sequence)* ']'        a parallel block, to be followed by '-> ScEnsemble'
              | '(' sequence ')' ('*' INT)?             grouping, or a loop run INT times

Semantics. A sequence runs its steps in order. `C ? done : X` applies C (Test or Review); if it passed, `done`
stops the branch: nothing after it in the branch runs, no further loop iteration either (so
`(Test ? done : Revise) * 3` retries until the tests pass); else X runs. `(X) * n` runs X n times. A parallel block
runs each branch on its own copy of the state and hands their answers to ScEnsemble, which votes; a `done` inside
a branch stops only that branch.

The AST, frozen dataclasses: Op(name, arg) (arg: Custom's instruction, else None), Seq(steps) (two or more steps,
none of them a Seq: the parser flattens grouped sequences), Parallel(branches), Loop(body, times), Cond(condition:
an Op, otherwise). Each node keeps `pos`, the 0-based offset where problems with it are reported (a loop's is its
count's), left out of equality so that parse(to_text(ast)) == ast.

parse raises the first syntax error as a WorkflowError(position, message); validate returns every semantic problem
(operator/domain mismatch, ScEnsemble and parallel blocks apart, parallel width, loop bound, nesting depth, and
for an otherwise valid workflow worst-case executor calls past MAX_CALLS) as a list in text order, empty when the
workflow is fine; check does both and raises the first problem.

Running. run_workflows advances all jobs together in rounds. Every job is a generator that yields a list of
requests (executor calls, sandbox runs) and receives their results; parallel branches are generators of their own,
run in lockstep by their block, and all jobs are run in lockstep the same way. Each round the driver sends every
executor call of every job in ONE executor.complete batch, and runs the round's sandbox runs concurrently in a
thread pool meanwhile. A job whose program times out (or is killed at its CPU or memory limit) ends with an error;
the others go on.
"""

import inspect
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from nanochat.execution import run_python, run_tests
from nanochat.operators import DOMAINS, OPERATORS, Call, Run, State

MAX_CALLS = 12        # worst-case executor calls of one workflow
MAX_DEPTH = 3         # nested parallel blocks, loops and conditionals
MAX_NESTING = 8       # brackets and parentheses open at once: the recursive parser's guard
MIN_BRANCHES, MAX_BRANCHES = 2, 5
MIN_LOOP, MAX_LOOP = 1, 3
MAX_INSTRUCTION = 200  # characters of a Custom instruction: the executor's context is short


class WorkflowError(ValueError):
    """A problem with a workflow at a 0-based character offset; str() gives the 1-based column."""

    def __init__(self, position, message):
        super().__init__(f"col {position + 1}: {message}")
        self.position = position
        self.message = message


# -----------------------------------------------------------------------------
# the AST

@dataclass(frozen=True)
class Op:
    name: str
    arg: str | None = None
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Seq:
    steps: tuple
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Parallel:
    branches: tuple
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Loop:
    body: object
    times: int
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Cond:
    condition: Op
    otherwise: object
    pos: int = field(default=0, compare=False)


def _steps(node):
    return node.steps if isinstance(node, Seq) else (node,)


# -----------------------------------------------------------------------------
# parsing

@dataclass(frozen=True)
class Token:
    kind: str  # "->", one of "[](),?:*", "int", "name", "string", "end"
    value: object
    pos: int

    def describe(self):
        if self.kind == "end":
            return "end of workflow"
        if self.kind == "string":
            return "a string"
        return f"'{self.value}'"


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DIGITS = re.compile(r"[0-9]+")


def tokenize(text):
    """The tokens of a workflow, ending with an "end" token."""
    tokens, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            tokens.append(Token("end", None, i))
            return tokens
        if text.startswith("->", i):
            tokens.append(Token("->", "->", i))
            i += 2
        elif text[i] in "[](),?:*":
            tokens.append(Token(text[i], text[i], i))
            i += 1
        elif match := DIGITS.match(text, i):
            if len(match.group()) > 3:  # no sensible count is longer, and a huge one would be slow to convert
                raise WorkflowError(i, f"number {match.group()[:10]} is too large")
            tokens.append(Token("int", int(match.group()), i))
            i = match.end()
        elif match := NAME.match(text, i):
            tokens.append(Token("name", match.group(), i))
            i = match.end()
        elif text[i] == '"':
            start, chars = i, []
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text):  # \" and \\ (any escaped character stands for itself)
                    i += 1
                chars.append(text[i])
                i += 1
            if i == len(text):
                raise WorkflowError(start, "unterminated string")
            tokens.append(Token("string", "".join(chars), start))
            i += 1
        else:
            raise WorkflowError(i, f"unexpected character {text[i]!r}")


class Parser:
    """Recursive descent over the tokens, one method per grammar rule (see the module docstring)."""

    def __init__(self, text):
        self.tokens = tokenize(text)
        self.i = 0
        self.open = 0  # brackets and parentheses open now

    def peek(self):
        return self.tokens[self.i]

    def take(self):
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, kind, expected):
        token = self.take()
        if token.kind != kind:
            raise WorkflowError(token.pos, f"expected {expected}, found {token.describe()}")
        return token

    def workflow(self):
        node = self.sequence()
        self.expect("end", "'->' or end of workflow")
        return node

    def sequence(self):
        steps = list(_steps(self.term()))
        while self.peek().kind == "->":
            self.take()
            steps.extend(_steps(self.term()))
        if self.peek().kind == "*":
            raise WorkflowError(self.peek().pos, "a loop needs parentheses: (...) * N")
        return steps[0] if len(steps) == 1 else Seq(tuple(steps), steps[0].pos)

    def term(self):
        node = self.primary()
        if self.peek().kind != "?":
            return node
        if not (isinstance(node, Op) and node.name in ("Test", "Review")):
            raise WorkflowError(node.pos, "the condition before '?' must be Test or Review")
        self.take()
        token = self.take()
        if (token.kind, token.value) != ("name", "done"):
            raise WorkflowError(token.pos, f"expected 'done' after '?', found {token.describe()}")
        self.expect(":", "':' after 'done'")
        return Cond(node, self.term(), node.pos)

    def primary(self):
        token = self.take()
        if token.kind == "name":
            return self.operator(token)
        if token.kind not in ("[", "("):
            raise WorkflowError(token.pos, f"expected an operator, '[' or '(', found {token.describe()}")
        self.open += 1
        if self.open > MAX_NESTING:
            raise WorkflowError(token.pos, f"more than {MAX_NESTING} brackets and parentheses open at once")
        closing = f"(to close the '{token.kind}' at col {token.pos + 1})"
        if token.kind == "[":
            branches = [self.sequence()]
            while self.peek().kind == ",":
                self.take()
                branches.append(self.sequence())
            self.expect("]", f"'->', ',' or ']' {closing}")
            node = Parallel(tuple(branches), token.pos)
        else:
            node = self.sequence()
            self.expect(")", f"'->' or ')' {closing}")
            if self.peek().kind == "*":
                self.take()
                count = self.expect("int", "a loop count after '*'")
                node = Loop(node, count.value, count.pos)
        self.open -= 1
        return node

    def operator(self, token):
        if token.value == "done":
            raise WorkflowError(token.pos, "'done' can only follow '?', as in 'Test ? done : Revise'")
        if token.value not in OPERATORS:
            raise WorkflowError(token.pos, f"unknown operator '{token.value}'; known: {', '.join(OPERATORS)}")
        if not OPERATORS[token.value].argument:
            return Op(token.value, None, token.pos)
        self.expect("(", f"'(' and a quoted instruction after {token.value}")
        arg = self.expect("string", "a quoted instruction")
        self.expect(")", "')' after the instruction")
        return Op(token.value, arg.value, token.pos)


def parse(text):
    """The AST of a workflow text; raises WorkflowError at the first syntax error."""
    return Parser(text).workflow()


def to_text(node):
    """Canonical text of an AST: parse(to_text(ast)) == ast for every AST that parse returns."""
    if isinstance(node, Op):
        if node.arg is None:
            return node.name
        escaped = node.arg.replace("\\", "\\\\").replace('"', '\\"')
        return f'{node.name}("{escaped}")'
    if isinstance(node, Seq):
        return " -> ".join(to_text(step) for step in node.steps)
    if isinstance(node, Parallel):
        return "[" + ", ".join(to_text(branch) for branch in node.branches) + "]"
    if isinstance(node, Loop):
        return f"({to_text(node.body)}) * {node.times}"
    otherwise = to_text(node.otherwise)
    if isinstance(node.otherwise, Seq):  # a term: a sequence needs its parentheses back
        otherwise = f"({otherwise})"
    return f"{to_text(node.condition)} ? done : {otherwise}"


def _children(node):
    if isinstance(node, Seq):
        return node.steps
    if isinstance(node, Parallel):
        return node.branches
    if isinstance(node, Loop):
        return (node.body,)
    if isinstance(node, Cond):
        return (node.condition, node.otherwise)
    return ()


def operators_used(node):
    """The operator names of a workflow in text order, repeats included (Custom as "Custom")."""
    if isinstance(node, Op):
        return [node.name]
    return [name for child in _children(node) for name in operators_used(child)]


def max_calls(node):
    """Executor calls in the worst case: every loop runs to its bound and every condition fails."""
    if isinstance(node, Op):
        return OPERATORS[node.name].calls
    if isinstance(node, Loop):
        return node.times * max_calls(node.body)
    return sum(max_calls(child) for child in _children(node))


# -----------------------------------------------------------------------------
# validation

def validate(ast, domain):
    """Every problem of a parsed workflow for a task domain, as WorkflowErrors in text order ([] if none)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    problems = []
    _check_sequence(_steps(ast), domain, 0, problems)
    # the call budget only means something for an otherwise valid workflow (a loop bound of 9 is its own problem)
    if not problems and max_calls(ast) > MAX_CALLS:
        problems.append(WorkflowError(0, f"the workflow may make {max_calls(ast)} executor calls, more than "
                                         f"{MAX_CALLS}"))
    return sorted(problems, key=lambda problem: problem.position)


def _check_sequence(steps, domain, depth, problems):
    """A parallel block and ScEnsemble must stand next to each other, in that order, in one sequence."""
    for i, step in enumerate(steps):
        before = steps[i - 1] if i > 0 else None
        after = steps[i + 1] if i + 1 < len(steps) else None
        if isinstance(step, Op) and step.name == "ScEnsemble" and not isinstance(before, Parallel):
            problems.append(WorkflowError(step.pos, "ScEnsemble must follow a parallel block [..., ...]"))
        if isinstance(step, Parallel) and not (isinstance(after, Op) and after.name == "ScEnsemble"):
            problems.append(WorkflowError(step.pos, "a parallel block must be followed by '-> ScEnsemble'"))
        _check_node(step, domain, depth, problems)


def _check_node(node, domain, depth, problems):
    if isinstance(node, Op):
        fits = OPERATORS[node.name].domains
        if domain not in fits:
            problems.append(WorkflowError(node.pos, f"{node.name} does not fit {domain} tasks, only "
                                                    f"{', '.join(fits)}"))
        if node.arg is not None and not node.arg.strip():
            problems.append(WorkflowError(node.pos, f"{node.name}'s instruction is empty"))
        if node.arg is not None and len(node.arg) > MAX_INSTRUCTION:
            problems.append(WorkflowError(node.pos, f"{node.name}'s instruction is longer than "
                                                    f"{MAX_INSTRUCTION} characters"))
        return
    if isinstance(node, Seq):  # only in hand-built ASTs: the parser flattens sequences
        _check_sequence(node.steps, domain, depth, problems)
        return
    if depth + 1 > MAX_DEPTH:
        problems.append(WorkflowError(node.pos, f"nested more than {MAX_DEPTH} levels deep (parallel blocks, "
                                                "loops and conditionals)"))
        return  # what is inside would only repeat the problem
    if isinstance(node, Parallel):
        if not MIN_BRANCHES <= len(node.branches) <= MAX_BRANCHES:
            problems.append(WorkflowError(node.pos, f"a parallel block has {MIN_BRANCHES} to {MAX_BRANCHES} "
                                                    f"branches, not {len(node.branches)}"))
    if isinstance(node, Loop) and not MIN_LOOP <= node.times <= MAX_LOOP:
        problems.append(WorkflowError(node.pos, f"loop bound {node.times} is out of range {MIN_LOOP}..{MAX_LOOP}"))
    for child in _children(node):
        _check_sequence(_steps(child), domain, depth + 1, problems)


def check(text, domain):
    """Parse and validate: the AST of a workflow fit for the domain, or the first problem raised."""
    ast = parse(text)
    problems = validate(ast, domain)
    if problems:
        raise problems[0]
    return ast


# -----------------------------------------------------------------------------
# running

@dataclass(frozen=True)
class Step:
    """One operator application: its executor prompt and response (None without a call), and the answer and
    feedback after it. branch: "" for the main line, "2" for a parallel block's second branch, "2.1" inside it."""
    operator: str
    branch: str
    prompt: str | None
    response: str | None
    answer: str
    feedback: str


@dataclass
class WorkflowResult:
    """answer: the final answer ("" on an error). calls: executor calls made. error: None, or "invalid workflow:
    ...", "timeout: ..." or "execution failure: ..."; the reward scores a result with an error 0."""
    answer: str
    trace: list
    calls: int
    error: str | None = None


class JobFailed(Exception):
    """Ends one job (not the others) with its message as the result's error."""


def lockstep(generators):
    """Run generators of the request protocol together: each round, yield the concatenation of their request
    lists and hand each its own slice of the results. Returns their return values, in order."""
    finals = [None] * len(generators)
    pending = {}  # index -> the requests it waits on

    def advance(i, results):
        try:
            pending[i] = generators[i].send(results)
        except StopIteration as stop:
            finals[i] = stop.value
            pending.pop(i, None)

    for i in range(len(generators)):
        advance(i, None)
    while pending:
        waiting = [(i, len(pending[i])) for i in pending]
        results = yield [request for i, _ in waiting for request in pending[i]]
        start = 0
        for i, size in waiting:
            advance(i, results[start:start + size])
            start += size
    return finals


def _run_failure(op, result):
    """The error that ends the job after a sandbox run, or None when the program finished (passing or not)."""
    if isinstance(result, Exception):  # the sandbox could not start
        return f"execution failure: {op.name}'s sandbox run failed: {result}"
    # killed counts as a timeout: with cpu_seconds = the timeout, a busy loop usually dies of SIGXCPU first
    if result.status in ("timeout", "killed"):
        return f"timeout: {op.name}'s program was stopped ({result.status}, {result.wall_time:.1f} s)"
    return None


def _apply(op, state, trace, branch):
    """Run one operator: forward its requests (one per round), check its sandbox runs, apply its updates."""
    operator = OPERATORS[op.name]
    step = operator.step(state) if op.arg is None else operator.step(state, op.arg)
    prompt = response = None
    if inspect.isgenerator(step):
        result = None
        while True:
            try:
                request = step.send(result)
            except StopIteration as stop:
                updates = stop.value
                break
            (result,) = yield [request]
            if isinstance(request, Call):
                prompt, response = request.prompt, result
            elif (error := _run_failure(op, result)) is not None:
                trace.append(Step(op.name, branch, prompt, response, state.answer, error))  # what ran, for the logs
                raise JobFailed(error)
    else:
        updates = step
    state = replace(state, **updates)
    trace.append(Step(op.name, branch, prompt, response, state.answer, state.feedback))
    return state


def _run(node, state, trace, branch):
    """Run a node on a state: yields request lists, returns (state, done), done when a `done` stopped the branch."""
    if isinstance(node, Op):
        return (yield from _apply(node, state, trace, branch)), False
    if isinstance(node, (Seq, Loop)):
        steps = node.steps if isinstance(node, Seq) else (node.body,) * node.times
        for step in steps:
            state, done = yield from _run(step, state, trace, branch)
            if done:
                return state, True
        return state, False
    if isinstance(node, Cond):
        state = yield from _apply(node.condition, state, trace, branch)
        if state.passed:
            return state, True
        return (yield from _run(node.otherwise, state, trace, branch))
    labels = [f"{branch}.{i + 1}" if branch else str(i + 1) for i in range(len(node.branches))]
    finals = yield from lockstep([_run(b, state, trace, label) for b, label in zip(node.branches, labels)])
    return replace(state, candidates=tuple(final.answer for final, _ in finals)), False


def _job(workflow, task):
    """One job as a generator of request lists, returning its WorkflowResult."""
    try:
        ast = parse(workflow) if isinstance(workflow, str) else workflow
        problems = validate(ast, task["domain"])
        if problems:
            raise problems[0]
    except WorkflowError as e:
        return WorkflowResult("", [], 0, f"invalid workflow: {e}")
    state = State(task["question"], task["domain"], task.get("entry_point", ""), tuple(task.get("tests", ())),
                  task.get("setup", ""))
    trace = []
    try:
        state, _ = yield from _run(ast, state, trace, "")
        error = None
    except JobFailed as e:
        error = str(e)
    calls = sum(step.prompt is not None for step in trace)
    return WorkflowResult("" if error else state.answer, trace, calls, error)


def _sandbox(run, timeout):
    if run.tests is None:
        return run_python(run.program, timeout=timeout)
    return run_tests(run.program, run.tests, timeout=timeout)


def run_workflows(jobs, executor, temperature=0.7, max_tokens=256, execution_timeout=5.0, workers=4):
    """
    Run jobs [(workflow, task)] together; returns their WorkflowResults in order. workflow: a text or a parsed
    AST (validated here either way; an invalid one gets an error result without a call). task: {"id", "domain",
    "question", "answer", and for code "entry_point", "tests" (assert snippets)}.

    executor.complete(prompts, temperature=..., max_tokens=...) -> one response per prompt (plain user messages;
    the executor applies the chat template) is called once per round with every call of every job. Sandbox runs
    get `execution_timeout` seconds each, up to `workers` at a time.
    """
    rounds = lockstep([_job(workflow, task) for workflow, task in jobs])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = None
        while True:
            try:
                requests = rounds.send(results)
            except StopIteration as stop:
                return stop.value
            runs = {i: pool.submit(_sandbox, r, execution_timeout) for i, r in enumerate(requests)
                    if isinstance(r, Run)}
            calls = [i for i, r in enumerate(requests) if isinstance(r, Call)]
            results = [None] * len(requests)
            if calls:  # while the sandbox runs go on
                responses = executor.complete([requests[i].prompt for i in calls], temperature=temperature,
                                              max_tokens=max_tokens)
                if len(responses) != len(calls):
                    raise ValueError(f"the executor returned {len(responses)} responses to {len(calls)} prompts")
                for i, response in zip(calls, responses):
                    results[i] = response
            for i, future in runs.items():
                try:
                    results[i] = future.result()
                except RuntimeError as e:  # the sandbox could not start: this job's failure, not the round's
                    results[i] = e
