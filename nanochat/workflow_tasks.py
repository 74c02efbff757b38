"""
Tasks and the five-tier reward of Workflow GRPO: a policy writes operator workflows, an executor runs them, and
the final answer is scored here, in {0, 0.25, 0.5, 0.75, 1}, across three domains (math, QA, code).

Every source becomes tasks of one shape:

    {"id": str, "dataset": str, "domain": "math" | "qa" | "code", "question": str,
     "answer": str | [str], "entry_point": str, "tests": [str], "setup": str, "solution": str}

- answer: math, the reference as a string (a number, or for MATH the last \\boxed{} content, which may be a LaTeX
  expression); qa, a list of acceptable answers (a multi-value answer is one entry, its values joined by ", ");
  code, a canonical program that defines entry_point and passes every test.
- entry_point, tests, setup: code only ("", [], "" elsewhere). tests are snippets run one by one in the program's
  namespace by nanochat.execution.run_tests (each counts for the pass rate); setup is code run before the
  candidate program (HumanEval's prompt, for its imports and helpers; MBPP's test_setup_code).
- solution: a worked reference where the source has one (GSM8K's reasoning, MATH's solution, the synthetic math
  program `def solve(): return 23 + 45 - 12`), else "".

Sources, read through `datasets` from the hub or from a local copy (`from_dir=DIR` reads `DIR/<hub id>/<file>`,
as `huggingface-cli download <hub id> --repo-type dataset --local-dir DIR/<hub id>` leaves it):

    gsm8k         openai/gsm8k, config main (nanochat/tasks/gsm8k.py reads it): question, answer ending "#### N".
    math          hendrycks/competition_math (taken off the hub in 2024; its parquet mirrors keep the layout):
                  data/{train,test}-*.parquet with problem, level, type, solution; the answer is the solution's
                  last \\boxed{...} (or \\fbox{...}), nested braces included.
    math_qwedsacf qwedsacf/competition_math: the same columns, all 12.5k problems in data/train-*.parquet.
    squad_v2      rajpurkar/squad_v2: squad_v2/{train,validation}-*.parquet with id, title, context, question,
                  answers {text: [...], answer_start: [...]}. Unanswerable questions (no answer text) are left
                  out: "unanswerable" as a reference would make a one-word abstention the best answer to a third
                  of the set, and word-overlap tiers mean nothing on it. The question includes the whole passage.
    hotpotqa      hotpotqa/hotpot_qa, config fullwiki: fullwiki/{train,validation}-*.parquet with id, question,
                  answer, type, level, supporting_facts {title, sent_id}, context {title, sentences}. The question
                  includes the supporting paragraphs (each cut to HOTPOT_PARAGRAPH_CHARS), or the first two
                  context paragraphs where none of them was retrieved.
    humaneval     HumanEval through nanochat/tasks/humaneval.py. The asserts of `check` become one test each
                  where its body is nothing but asserts (those not calling the candidate, e.g. `assert True`,
                  are dropped so that they cannot pay for a wrong program); otherwise `check(f)` is one test.
    mbpp          google-research-datasets/mbpp, config full: full/{train,validation,test}-*.parquet with task_id,
                  text, code, test_list, test_setup_code, challenge_test_list (unused). The entry point is the
                  first function the first test calls that the reference code defines. The question shows the
                  first test only (it names the function and its call); the rest stay held out.

Splits are "train", "val" and "test" for every source (SPLITS): a hub split is used as it is where one fits, and
cut by mcqa.split_items (a hash of seed and task id, so a task keeps its part whatever else is loaded) where the
source has none: a hub train split without a validation split gives train 0.9 / val 0.1, a lone split
0.8 / 0.1 / 0.1; SQuAD's and HotpotQA's validation splits serve as test (their test answers are not public).

Offline tasks come from the synthetic world (synthetic_tasks), with the structure that makes the right workflow
differ by domain: math word problems with three-digit numbers (a program gets them right where a tiny model's
direct answer does not), QA about the world's facts with single- and multi-value answers, and small functions
with asserts.

The reward (reward) in tiers, accuracy being reward >= ACCURATE (0.75):

    math  relative error |p - r| / max(|r|, 1e-9) of the predicted number p (parse_number of the final answer):
          < 1e-4 -> 1, < 0.1 -> 0.75, < 0.3 -> 0.5, < 0.5 -> 0.25, else 0; no number -> 0. With r = 0 the
          error is |p| * 1e9: 1 needs |p| < 1e-13 and anything at all |p| < 5e-10, so a zero must be hit exactly.
          Computed in exact fractions, so a boundary is where it says. A reference that is no number (MATH's
          "\\frac{\\sqrt3}{2}", "(1, 2)") scores 1 for the same LaTeX after normalise_latex, else 0.
    code  the candidate is the first fenced block of the prediction (else all of it), a whole program that
          defines entry_point, run after setup in the sandbox with the task's tests: pass rate >= 0.99 -> 1,
          >= 0.75 -> 0.75, >= 0.25 -> 0.5, > 0 -> 0.25, else 0; a timeout or a killed run -> 0 whatever passed
          before it.
    qa    normalised exact match with any acceptable answer, or word recall >= 0.9 -> 1; recall >= 0.7 -> 0.75,
          >= 0.4 -> 0.5, >= 0.2 -> 0.25, else 0. Recall is the share of a reference's normalised words present in
          the prediction, best over the references. Recall alone pays for extra words: naming many candidates
          is not penalised, which a workflow judged by it could learn to exploit.

Math and QA predictions are first cut to their final answer when they mark one (extract_final).
"""

import ast
import hashlib
import random
import re
import string
from fractions import Fraction

from nanochat import execution
from nanochat.mcqa import check_text, split_items
from nanochat.synthetic import ASK, PETS
from nanochat.tasks import common, gsm8k, humaneval

DOMAINS = ("math", "qa", "code")
DEFAULT_RATIOS = {"math": 0.4, "qa": 0.3, "code": 0.3}
ACCURATE = 0.75  # a reward at least this counts as a correct answer

# tiers: (bound, reward), first match wins; math compares relative error < bound, code pass rate >= bound, qa
# word recall >= bound
MATH_TIERS = ((Fraction(1, 10_000), 1.0), (Fraction(1, 10), 0.75), (Fraction(3, 10), 0.5), (Fraction(1, 2), 0.25))
MATH_ZERO_SCALE = Fraction(1, 10**9)  # the denominator's floor, so that a reference of 0 needs an exact 0
CODE_TIERS = ((0.99, 1.0), (0.75, 0.75), (0.25, 0.5))  # and any pass rate above 0 -> 0.25
QA_TIERS = ((0.9, 1.0), (0.7, 0.75), (0.4, 0.5), (0.2, 0.25))

TWO_PARTS = {"train": 0.9, "val": 0.1}
THREE_PARTS = {"train": 0.8, "val": 0.1, "test": 0.1}
# data set -> our split -> (the hub split it comes from, the shares that hub split is cut into, or None: all of it)
SPLITS = {
    "gsm8k": {"train": ("train", TWO_PARTS), "val": ("train", TWO_PARTS), "test": ("test", None)},
    "math": {"train": ("train", TWO_PARTS), "val": ("train", TWO_PARTS), "test": ("test", None)},
    "math_qwedsacf": {split: ("train", THREE_PARTS) for split in THREE_PARTS},
    "squad_v2": {"train": ("train", TWO_PARTS), "val": ("train", TWO_PARTS), "test": ("validation", None)},
    "hotpotqa": {"train": ("train", TWO_PARTS), "val": ("train", TWO_PARTS), "test": ("validation", None)},
    "humaneval": {split: ("test", THREE_PARTS) for split in THREE_PARTS},
    "mbpp": {"train": ("train", None), "val": ("validation", None), "test": ("test", None)},
}
HOTPOT_PARAGRAPH_CHARS = 600


def make_task(id, dataset, domain, question, answer, entry_point="", tests=(), setup="", solution=""):
    return {"id": id, "dataset": dataset, "domain": domain, "question": question, "answer": answer,
            "entry_point": entry_point, "tests": list(tests), "setup": setup, "solution": solution}


# -----------------------------------------------------------------------------
# Final answers and numbers

BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# "Answer:", "Final Answer:", "the answer is", with markdown around; what follows on its line is the answer
ANSWER_LABEL = re.compile(r"(?i)(?<![a-z])(?:final\s+)?answer[\s*_]*(?::|\bis\b)[\s*_]*")
HASHES = re.compile(r"####")

# Commas count only in proper thousands groups ("1,2,3" stays three numbers); a minus only where it cannot be a
# subtraction ("10-2" is 10 and 2). A fraction is a\b or \frac{a}{b} (\dfrac, \tfrac), either side signed.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGN = r"(?:(?<![\w.])-)?"
NUMBER = re.compile(
    rf"(?P<tex>{_SIGN})\\[dt]?frac\s*\{{\s*(?P<tex_num>-?(?:{_NUM}))\s*\}}\s*\{{\s*(?P<tex_den>-?(?:{_NUM}))\s*\}}"
    rf"|(?P<num>{_SIGN}(?:{_NUM}))(?:\s*/\s*(?P<den>{_NUM}))?"
)
# LaTeX that dresses a number without changing it: "1{,}000", "\$5", "50\%", "30^\circ", thin spaces
NUMBER_DRESSING = re.compile(r"\{,\}|\\[$%!,;]|\^\s*\{?\\circ\}?|\$")


def last_boxed(text):
    """The content of the last \\boxed{...} or \\fbox{...} in text (nested braces kept), "\\boxed 5" giving "5";
    None if there is none or its braces never close."""
    matches = list(BOXED.finditer(text))
    if not matches:
        return None
    return _boxed_content(text, matches[-1].end())


def _boxed_content(text, start):
    rest = text[start:].lstrip()
    if not rest.startswith("{"):
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None


def _final_span(text):
    """The final answer a response marks: whichever comes last of a \\boxed{} content, a "#### ..." line and an
    "Answer: ..." line (an empty label line takes the next non-empty line); None if it marks none."""
    found = []  # (position, content)
    for match in BOXED.finditer(text):
        content = _boxed_content(text, match.end())
        if content is not None:
            found.append((match.start(), content))
    for pattern in (HASHES, ANSWER_LABEL):
        for match in pattern.finditer(text):
            lines = text[match.end():].split("\n")
            content = lines[0] if lines[0].strip() else next((line for line in lines if line.strip()), "")
            found.append((match.start(), content))
    if not found:
        return None
    _, content = max(found, key=lambda pair: pair[0])
    return content.strip().strip("$*_ ").rstrip(".").strip()


def extract_final(text):
    """The final answer of a free-form response: the last \\boxed{}, "####" line or "Answer:" / "Final Answer:" /
    "the answer is" line, whichever comes last, stripped of markdown, "$" and a closing period; the whole response,
    stripped, if it marks none."""
    span = _final_span(text)
    return text.strip() if span is None else span


def _to_fraction(match):
    if match.group("tex_num") is not None:
        numerator = Fraction(match.group("tex_num").replace(",", ""))
        denominator = Fraction(match.group("tex_den").replace(",", ""))
        sign = -1 if match.group("tex") else 1
    else:
        numerator = Fraction(match.group("num").replace(",", ""))
        denominator = Fraction(match.group("den").replace(",", "")) if match.group("den") else Fraction(1)
        sign = 1
    return None if denominator == 0 else sign * numerator / denominator


def parse_number(text):
    """The number a response answers with, as an exact Fraction, or None.

    With a marked final answer (extract_final) it is the first number of that answer after its last "=" (so
    "Answer: 23 + 45 - 12 = 56" gives 56 and "Answer: 56 apples" 56); without one, or where that answer holds no
    number ("the answer is as follows:"), the last number in the text. Numbers may carry thousands commas, a
    sign, decimals, be fractions "3/4" or "\\frac{3}{4}", and wear units, "$", "%" or a closing period.
    """
    span = _final_span(text)
    if span is not None:
        matches = list(NUMBER.finditer(_undress(span.rsplit("=", 1)[-1])))
        if matches:
            return _to_fraction(matches[0])
    matches = list(NUMBER.finditer(_undress(text)))
    return _to_fraction(matches[-1]) if matches else None


def _undress(text):
    return NUMBER_DRESSING.sub("", text.replace("\u2212", "-"))


def reference_number(reference):
    """A math reference as a Fraction if all of it is one number ("42", "-3/4", "\\frac{1}{2}", "1,000"), else
    None: a LaTeX expression is compared as text."""
    source = _undress(reference).strip().rstrip(".")
    match = NUMBER.fullmatch(source)
    return None if match is None else _to_fraction(match)


def normalise_latex(text):
    """LaTeX answer text without what does not change its meaning: spaces, $, \\left / \\right, thin spaces,
    \\displaystyle, a closing period; \\dfrac and \\tfrac written \\frac."""
    text = re.sub(r"\\(?:left|right|displaystyle)\b|\\[!,;]|\$|\s", "", text)
    return re.sub(r"\\[dt]frac", r"\\frac", text).rstrip(".")


def normalise_answer(text):
    """QA normalisation: lowercase, punctuation to spaces, the articles a / an / the dropped, whitespace collapsed.
    Punctuation becomes a space, not nothing, so that "Korta,Bilun" still reads as two words."""
    text = re.sub(rf"[{re.escape(string.punctuation)}]", " ", text.lower())
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


# -----------------------------------------------------------------------------
# The five-tier reward

def math_reward(reference, prediction):
    """Tiered by relative error (see the module docstring)."""
    r = reference_number(reference)
    if r is None:
        span = extract_final(prediction)
        return float(normalise_latex(span) == normalise_latex(reference))
    p = parse_number(prediction)
    if p is None:
        return 0.0
    error = abs(p - r) / max(abs(r), MATH_ZERO_SCALE)
    return next((value for bound, value in MATH_TIERS if error < bound), 0.0)


def qa_reward(answers, prediction):
    """Tiered by exact match and word recall (see the module docstring)."""
    predicted = normalise_answer(extract_final(prediction))
    words = set(predicted.split())
    best = 0.0
    for answer in answers:
        reference = normalise_answer(answer)
        if predicted == reference:
            return 1.0
        reference_words = reference.split()
        if reference_words:
            best = max(best, sum(word in words for word in reference_words) / len(reference_words))
    return next((value for bound, value in QA_TIERS if best >= bound), 0.0)


def candidate_code(prediction):
    """The program in a prediction: its first fenced code block (```python, ```py or bare), else all of it."""
    blocks = humaneval.FENCE.findall(prediction)
    return blocks[0] if blocks else prediction


def code_pass_rate(task, prediction, execution_timeout=5.0):
    """The share of the task's tests the prediction's program passes in the sandbox; 0.0 after a timeout or kill."""
    if not task["tests"]:
        raise ValueError(f"code task {task['id']!r} has no tests")
    program = f"{task['setup']}\n\n{candidate_code(prediction)}\n" if task["setup"] else candidate_code(prediction)
    result = execution.run_tests(program, task["tests"], timeout=execution_timeout)
    if result.status in ("timeout", "killed"):
        return 0.0
    return result.passed / result.total


def code_reward(task, prediction, execution_timeout=5.0):
    """Tiered by pass rate (see the module docstring)."""
    rate = code_pass_rate(task, prediction, execution_timeout)
    return next((value for bound, value in CODE_TIERS if rate >= bound), 0.25 if rate > 0 else 0.0)


def reward(task, prediction, execution_timeout=5.0):
    """The five-tier reward of a final answer, in {0, 0.25, 0.5, 0.75, 1}."""
    if task["domain"] == "math":
        return math_reward(task["answer"], prediction)
    if task["domain"] == "qa":
        return qa_reward(task["answer"], prediction)
    if task["domain"] == "code":
        return code_reward(task, prediction, execution_timeout)
    raise ValueError(f"task {task['id']!r} has unknown domain {task['domain']!r}; known: {', '.join(DOMAINS)}")


def accuracy(rewards):
    """The share of rewards that count as correct answers (>= ACCURATE)."""
    rewards = list(rewards)
    return sum(r >= ACCURATE for r in rewards) / len(rewards) if rewards else 0.0


# -----------------------------------------------------------------------------
# Hub data sets: each reader returns every task of one hub split, in file order

def read_gsm8k(hub_split, from_dir):
    return [make_task(f"gsm8k/{hub_split}/{i}", "gsm8k", "math", item["messages"][0]["content"], item["answer"],
                      solution=item["solution"])
            for i, item in enumerate(gsm8k.load(hub_split, from_dir=from_dir))]


def _read_competition_math(name, hub_id, hub_split, from_dir):
    columns = ["problem", "level", "type", "solution"]
    rows, where = common.load_rows(hub_id, f"data/{hub_split}-*.parquet", hub_split, from_dir, columns, None)
    tasks = []
    for i, row in enumerate(rows):
        check_text(row["problem"], where, hub_split, i, "problem")
        check_text(row["solution"], where, hub_split, i, "solution")
        answer = last_boxed(row["solution"])
        if not answer or not answer.strip():
            raise common.row_error(where, hub_split, i, "field 'solution' has no \\boxed{...} answer: "
                                   f"{row['solution'][-80:]!r}")
        tasks.append(make_task(f"{name}/{hub_split}/{i}", name, "math", row["problem"], answer.strip(),
                               solution=row["solution"]))
    return tasks


def read_math(hub_split, from_dir):
    return _read_competition_math("math", "hendrycks/competition_math", hub_split, from_dir)


def read_math_qwedsacf(hub_split, from_dir):
    return _read_competition_math("math_qwedsacf", "qwedsacf/competition_math", hub_split, from_dir)


def read_squad_v2(hub_split, from_dir):
    columns = ["id", "title", "context", "question", "answers"]
    rows, where = common.load_rows("rajpurkar/squad_v2", f"squad_v2/{hub_split}-*.parquet", hub_split, from_dir,
                                   columns, None)
    tasks = []
    for i, row in enumerate(rows):
        for field in ("id", "context", "question"):
            check_text(row[field], where, hub_split, i, field)
        answers = row["answers"]
        texts = answers.get("text") if isinstance(answers, dict) else None
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise common.row_error(where, hub_split, i, f"field 'answers' is {answers!r}, expected {{'text': [str]}}")
        texts = list(dict.fromkeys(text.strip() for text in texts if text.strip()))  # unique, in order
        if not texts:
            continue  # unanswerable: left out by design (module docstring)
        title = f" ({row['title']})" if isinstance(row["title"], str) and row["title"].strip() else ""
        question = f"Passage{title}:\n{row['context'].strip()}\n\nQuestion: {row['question'].strip()}"
        tasks.append(make_task(f"squad_v2/{row['id']}", "squad_v2", "qa", question, texts))
    return tasks


def _shorten(text, limit):
    """text cut at a word boundary to at most limit characters, "..." marking a cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def read_hotpotqa(hub_split, from_dir):
    columns = ["id", "question", "answer", "supporting_facts", "context"]
    rows, where = common.load_rows("hotpotqa/hotpot_qa", f"fullwiki/{hub_split}-*.parquet", hub_split, from_dir,
                                   columns, None)
    tasks = []
    for i, row in enumerate(rows):
        for field in ("id", "question", "answer"):
            check_text(row[field], where, hub_split, i, field)
        context, facts = row["context"], row["supporting_facts"]
        titles = context.get("title") if isinstance(context, dict) else None
        sentences = context.get("sentences") if isinstance(context, dict) else None
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise common.row_error(where, hub_split, i, "field 'context' is not {'title': [str], 'sentences': "
                                   "[[str]]} of equal lengths")
        if not isinstance(facts, dict) or not isinstance(facts.get("title"), list):
            raise common.row_error(where, hub_split, i, f"field 'supporting_facts' is {facts!r}, expected "
                                   "{'title': [str], 'sent_id': [int]}")
        paragraphs = dict(zip(titles, sentences))
        support = [title for title in dict.fromkeys(facts["title"]) if title in paragraphs]
        shown = support or titles[:2]  # fullwiki retrieval can miss every supporting paragraph
        text = "\n\n".join(f"{title}: {_shorten(' '.join(paragraphs[title]).strip(), HOTPOT_PARAGRAPH_CHARS)}"
                           for title in shown)
        question = f"Paragraphs:\n{text}\n\nQuestion: {row['question'].strip()}"
        tasks.append(make_task(f"hotpotqa/{row['id']}", "hotpotqa", "qa", question, [row["answer"].strip()]))
    return tasks


def humaneval_tests(test, entry_point):
    """HumanEval's test program as test snippets: one per assert of `check(candidate)` that calls the candidate,
    each after the program's other top-level statements (imports, METADATA) and `candidate = <entry point>`;
    a `check` with anything but asserts in its body stays one test, `check(<entry point>)`."""
    whole = [f"{test}\n\ncheck({entry_point})\n"]
    try:
        module = ast.parse(test)
    except SyntaxError:
        return whole
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        return whole
    check = checks[0]
    argument = check.args.args[0].arg
    if not all(isinstance(statement, ast.Assert) for statement in check.body):
        return whole
    prelude = "\n".join(ast.get_source_segment(test, node) for node in module.body if node is not check)
    asserts = [statement for statement in check.body
               if any(isinstance(node, ast.Name) and node.id == argument for node in ast.walk(statement))]
    if not asserts:
        return whole
    return [f"{prelude}\n{argument} = {entry_point}\n{ast.get_source_segment(test, statement)}\n"
            for statement in asserts]


def read_humaneval(hub_split, from_dir):
    tasks = []
    for item in humaneval.load(hub_split, from_dir=from_dir):
        question = f"Write the Python function {item['entry_point']}:\n\n{item['prompt']}"
        tasks.append(make_task(item["task_id"], "humaneval", "code", question,
                               item["prompt"] + item["canonical_solution"], entry_point=item["entry_point"],
                               tests=humaneval_tests(item["test"], item["entry_point"]), setup=item["prompt"]))
    return tasks


CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\s*\(")


def mbpp_entry_point(test, code):
    """The first function the test calls that the code defines, or None."""
    defined = set(re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", code, re.MULTILINE))
    return next((name for name in CALL.findall(test) if name in defined), None)


def read_mbpp(hub_split, from_dir):
    columns = ["task_id", "text", "code", "test_list", "test_setup_code"]
    rows, where = common.load_rows("google-research-datasets/mbpp", f"full/{hub_split}-*.parquet", hub_split,
                                   from_dir, columns, None)
    tasks = []
    for i, row in enumerate(rows):
        for field in ("text", "code"):
            check_text(row[field], where, hub_split, i, field)
        tests = row["test_list"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise common.row_error(where, hub_split, i, f"field 'test_list' is {tests!r}, expected non-empty asserts")
        entry_point = mbpp_entry_point(tests[0], row["code"])
        if entry_point is None:
            raise common.row_error(where, hub_split, i, "field 'test_list': its first test calls no function that "
                                   f"field 'code' defines: {tests[0]!r}")
        question = f"{row['text'].strip()}\nThe function is called like this:\n{tests[0].strip()}"
        tasks.append(make_task(f"mbpp/{row['task_id']}", "mbpp", "code", question, row["code"],
                               entry_point=entry_point, tests=tests, setup=row["test_setup_code"] or ""))
    return tasks


READERS = {"gsm8k": read_gsm8k, "math": read_math, "math_qwedsacf": read_math_qwedsacf, "squad_v2": read_squad_v2,
           "hotpotqa": read_hotpotqa, "humaneval": read_humaneval, "mbpp": read_mbpp}


def load_tasks(name, split, from_dir=None, limit=None, seed=0):
    """Tasks of one split ("train", "val", "test") of a named data set (see SPLITS), in file order. seed decides
    the cut where the split is cut from a hub split, and limit applies after it, so a part never depends on it."""
    if name not in READERS:
        raise ValueError(f"unknown workflow data set {name!r}; known: {', '.join(READERS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"{name} has splits {', '.join(SPLITS[name])}, not {split!r}")
    hub_split, shares = SPLITS[name][split]
    tasks = READERS[name](hub_split, from_dir)
    if shares is not None:
        tasks = split_items(tasks, shares, seed)[split]
    return tasks if limit is None else tasks[:limit]


# -----------------------------------------------------------------------------
# Domain ratios and mixes

def parse_domain_ratios(text):
    """"math=0.4,qa=0.3,code=0.3" -> {"math": 0.4, "qa": 0.3, "code": 0.3}: known domains, each once, weights
    non-negative and summing to 1 (a typo that leaves 0.9 is an error, not a silent renormalisation); a domain
    left out gets none."""
    ratios = {}
    for part in text.split(","):
        domain, sep, value = part.partition("=")
        domain = domain.strip()
        if not sep or not domain:
            raise ValueError(f"domain ratios {text!r}: expected domain=weight pairs like math=0.4, got {part!r}")
        if domain not in DOMAINS:
            raise ValueError(f"domain ratios {text!r}: unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        if domain in ratios:
            raise ValueError(f"domain ratios {text!r}: {domain!r} is given twice")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"domain ratios {text!r}: the weight of {domain!r} is {value!r}, not a number") from None
        if not 0 <= weight <= 1:  # also refuses nan
            raise ValueError(f"domain ratios {text!r}: the weight of {domain!r} is {weight}, expected 0..1")
        ratios[domain] = weight
    total = sum(ratios.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"domain ratios {text!r}: weights sum to {total:g}, expected 1")
    return ratios


def domain_counts(n, ratios):
    """{domain: count} for the domains of positive ratio, summing to n: shares of the ratios (as weights, so a sum
    off 1 by rounding changes nothing) by largest remainder, ties going to the domain listed first in DOMAINS."""
    for domain, ratio in ratios.items():
        if domain not in DOMAINS or not 0 <= ratio < float("inf"):
            raise ValueError(f"domain ratios {ratios}: {domain!r}: {ratio} is not a known domain's weight")
    positive = [domain for domain in DOMAINS if ratios.get(domain, 0) > 0]
    if not positive:
        raise ValueError(f"domain ratios {ratios} give no domain a positive weight")
    total = sum(ratios[domain] for domain in positive)
    exact = {domain: n * ratios[domain] / total for domain in positive}
    counts = {domain: int(exact[domain]) for domain in positive}
    by_remainder = sorted(positive, key=lambda domain: counts[domain] - exact[domain])  # stable: DOMAINS order
    for domain in by_remainder[: n - sum(counts.values())]:
        counts[domain] += 1
    return counts


def mix(domain_ratios, tasks_by_domain, n=None, seed=0):
    """n tasks drawn without replacement from per-domain lists {domain: [tasks]} in the ratios (domain_counts),
    shuffled together, by seed. n=None takes the largest mix the lists allow."""
    wanted = domain_counts(1, domain_ratios)  # validates the ratios; its keys are the domains drawn from
    pools = {domain: list(tasks_by_domain.get(domain, [])) for domain in wanted}
    if n is None:
        total = sum(domain_ratios[domain] for domain in wanted)
        n = min(int(len(pools[domain]) * total / domain_ratios[domain]) for domain in wanted)
        while n > 0 and any(count > len(pools[d]) for d, count in domain_counts(n, domain_ratios).items()):
            n -= 1
    rng = random.Random(f"workflow-mix-{seed}")
    mixed = []
    for domain, count in domain_counts(n, domain_ratios).items():
        if count > len(pools[domain]):
            raise ValueError(f"a mix of {n} needs {count} {domain} tasks, but only {len(pools[domain])} are given")
        mixed += rng.sample(pools[domain], count)
    rng.shuffle(mixed)
    return mixed


# -----------------------------------------------------------------------------
# Synthetic-world tasks

# (question, expression, answer, ranges of a b c): the expression is what a program operator would write; the
# answer is computed separately so that the tests can check one against the other. The ranges keep every answer
# at 100 or more: big enough that a tiny model's direct answer is often wrong, never negative
COUNTABLE = ("apples", "plums", "pears", "marbles", "shells", "stamps")
MATH_TEMPLATES = (
    ("{name} has {a} {item} and buys {b} more, then gives {c} to {friend}. How many {item} does {name} have now?",
     "{a} + {b} - {c}", lambda a, b, c: a + b - c, {"a": (100, 999), "b": (100, 999), "c": (10, 99)}),
    ("{name} the {job} earns {a} coins a day for {b} days and then spends {c} coins. How many coins does {name} "
     "have left?", "{a} * {b} - {c}", lambda a, b, c: a * b - c, {"a": (12, 99), "b": (21, 49), "c": (10, 99)}),
    ("{city} has {a} houses with {b} people in each, and {c} people move away. How many people live in {city} "
     "now?", "{a} * {b} - {c}", lambda a, b, c: a * b - c, {"a": (41, 99), "b": (4, 9), "c": (10, 60)}),
    ("{name} reads {a} pages on Monday, {b} pages on Tuesday and {c} times as many pages on Wednesday as on "
     "Tuesday. How many pages does {name} read in the three days?", "{a} + {b} + {c} * {b}",
     lambda a, b, c: a + b + c * b, {"a": (100, 499), "b": (100, 499), "c": (2, 5)}),
    ("{name} has {a} bags with {b} {item} in each and gives {c} of the bags to {friend}. How many {item} does "
     "{name} keep?", "({a} - {c}) * {b}", lambda a, b, c: (a - c) * b, {"a": (40, 99), "b": (12, 49), "c": (2, 29)}),
    ("{name} saves {a} coins and {friend} saves {b} coins more than {name}. Together they spend {c} coins on a "
     "{instrument}. How many coins do they have left?", "{a} + ({a} + {b}) - {c}",
     lambda a, b, c: a + (a + b) - c, {"a": (200, 999), "b": (10, 99), "c": (100, 299)}),
)

# single-fact clusters of the world whose questions (synthetic.ASK) ask about one subject
QA_FACT_CLUSTERS = ("colour", "home_city", "job", "food", "pet", "age", "pet_name", "flower", "instrument", "river",
                    "region")
QA_MULTI_RATE = 0.5  # QA tasks whose answer has several values
NUMBER_WORDS = dict(enumerate(("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                                 "twelve"), start=2))
LETTERS = "aeioulnrst"  # the letters world names are made of, so counting them is rarely 0

# (entry point, question, solution, function of the fields, argument kind). Fields: {k} and {m} numbers 2..12,
# {word} and {m_word} their names, {letter} one of LETTERS, {city} a city of the world and {lower_city} its name
# in lowercase, {pet} a pet species. The function computes the tests' expected values apart from the solution's
# text, so the tests check the two against each other. About 200 distinct questions in a size-1 world.
CODE_TEMPLATES = (
    ("add_{word}", "Write a Python function add_{word}(x) that returns x plus {k}.",
     "def add_{word}(x):\n    return x + {k}\n", lambda f: lambda x: x + f["k"], "int"),
    ("times_{word}_plus_{m_word}", "Write a Python function times_{word}_plus_{m_word}(x) that returns x "
     "multiplied by {k}, plus {m}.", "def times_{word}_plus_{m_word}(x):\n    return x * {k} + {m}\n",
     lambda f: lambda x: f["k"] * x + f["m"], "int"),
    ("is_multiple_of_{word}", "Write a Python function is_multiple_of_{word}(x) that returns True if the integer "
     "x is a multiple of {k}, else False.", "def is_multiple_of_{word}(x):\n    return x % {k} == 0\n",
     lambda f: lambda x: x == f["k"] * (x // f["k"]), "int"),
    ("repeat_{word}", "Write a Python function repeat_{word}(s) that returns the string s repeated {k} times.",
     "def repeat_{word}(s):\n    return s * {k}\n", lambda f: lambda s: "".join([s] * f["k"]), "name"),
    ("first_{word}_letters", "Write a Python function first_{word}_letters(s) that returns the first {k} "
     "characters of the string s (all of it if it is shorter).", "def first_{word}_letters(s):\n    return s[:{k}]\n",
     lambda f: lambda s: s[:min(len(s), f["k"])], "name"),
    ("count_{letter}", "Write a Python function count_{letter}(s) that returns how many times the letter "
     "'{letter}' appears in the string s, upper or lower case.",
     "def count_{letter}(s):\n    return s.lower().count('{letter}')\n",
     lambda f: lambda s: sum(ch in (f["letter"], f["letter"].upper()) for ch in s), "name"),
    ("welcome_to_{lower_city}", "Write a Python function welcome_to_{lower_city}(name) that returns the string "
     "'Welcome to {city}, ' followed by name and '!'.",
     "def welcome_to_{lower_city}(name):\n    return 'Welcome to {city}, ' + name + '!'\n",
     lambda f: lambda name: f"Welcome to {f['city']}, {name}!", "name"),
    ("last_{word}", "Write a Python function last_{word}(items) that returns a list of the last {k} elements of "
     "the list items (all of them if it has fewer).", "def last_{word}(items):\n    return list(items[-{k}:])\n",
     lambda f: lambda items: items[max(0, len(items) - f["k"]):], "list"),
    ("sum_above_{k}", "Write a Python function sum_above_{k}(numbers) that returns the sum of the numbers in the "
     "list that are greater than {k}.", "def sum_above_{k}(numbers):\n    return sum(x for x in numbers if x > {k})\n",
     lambda f: lambda numbers: sum(filter(lambda x: x > f["k"], numbers)), "list"),
    ("count_{pet}s", "Write a Python function count_{pet}s(animals) that returns how many of the strings in the "
     "list animals are '{pet}'.", "def count_{pet}s(animals):\n    return animals.count('{pet}')\n",
     lambda f: lambda animals: sum(animal == f["pet"] for animal in animals), "pets"),
)


def _stable_id(domain, question):
    return f"synthetic/{domain}/{hashlib.blake2b(question.encode(), digest_size=6).hexdigest()}"


def _math_task(world, rng):
    template, expression, compute, ranges = rng.choice(MATH_TEMPLATES)
    numbers = {key: rng.randint(low, high) for key, (low, high) in ranges.items()}
    person, friend = rng.sample(world.people, 2)
    fields = {"name": person.name, "friend": friend.name, "job": person.job, "city": person.city,
              "instrument": person.instrument, "item": rng.choice(COUNTABLE), **numbers}
    question = template.format(**fields)
    expression = expression.format(**numbers)
    return make_task(_stable_id("math", question), "synthetic", "math", question, str(compute(**numbers)),
                     solution=f"def solve():\n    return {expression}\n")


def _multi_value_question(world, rng):
    """(question, values in reference order) of a question whose answer has several values, or None where the
    draw has fewer than two (a region with one city). Lists of names are sorted."""
    kind = rng.choice(("region_cities", "city_people", "pet_owners", "pet_and_name"))
    if kind == "region_cities":
        region = rng.choice(world.regions)
        values = sorted(c.name for c in world.cities if c.region == region)
        question = f"Which cities are in the region of {region}?"
    elif kind == "city_people":
        city = rng.choice(world.cities).name
        values = sorted(p.name for p in world.people if p.city == city)
        question = f"Who lives in {city}? Name everyone."
    elif kind == "pet_owners":
        pet = rng.choice(PETS)
        values = sorted(p.name for p in world.people if p.pet == pet)
        question = f"Which people have a pet {pet}? Name them all."
    else:
        person = rng.choice(world.people)
        values = [person.pet, person.pet_name]
        question = f"What kind of pet does {person.name} have, and what is its name?"
    return (question, values) if len(values) >= 2 else None


def _qa_task(world, rng):
    if rng.random() < QA_MULTI_RATE:
        drawn = _multi_value_question(world, rng)
        if drawn is None:
            return None
        question, values = drawn
        # joined by commas only: "and" would be a reference word that a bare list lacks
        answer = ", ".join(values)
    else:
        cluster = rng.choice(QA_FACT_CLUSTERS)
        item = rng.choice(world.specs[cluster].items)
        question = rng.choice(ASK[cluster]).format(**item)
        answer = item["value"]
    return make_task(_stable_id("qa", question), "synthetic", "qa", question, [answer])


def _code_argument(kind, world, rng):
    if kind == "int":
        return rng.randint(-50, 300)
    if kind == "name":
        return rng.choice(world.people).name
    if kind == "pets":
        return [rng.choice(PETS[:4]) for _ in range(rng.randint(0, 6))]  # few species, so that some repeat
    return [rng.randint(0, 20) for _ in range(rng.randint(0, 6))]


def _code_task(world, rng):
    entry, question, solution, make_function, kind = rng.choice(CODE_TEMPLATES)
    k, m = rng.randint(2, 12), rng.randint(2, 12)
    city = rng.choice(world.cities).name
    fields = {"k": k, "word": NUMBER_WORDS[k], "m": m, "m_word": NUMBER_WORDS[m], "letter": rng.choice(LETTERS),
              "city": city, "lower_city": city.lower(), "pet": rng.choice(PETS[:4])}
    function = make_function(fields)
    entry = entry.format(**fields)
    arguments, count = [], rng.randint(2, 4)
    while len(arguments) < count:
        argument = _code_argument(kind, world, rng)
        if argument not in arguments:
            arguments.append(argument)
    tests = [f"assert {entry}({argument!r}) == {function(argument)!r}" for argument in arguments]
    question = question.format(**fields)
    return make_task(_stable_id("code", question), "synthetic", "code", question, solution.format(**fields),
                     entry_point=entry, tests=tests)


SYNTHETIC_MAKERS = {"math": _math_task, "qa": _qa_task, "code": _code_task}


def synthetic_tasks(world, n, seed, domain_ratios=None):
    """n distinct tasks about the world (a synthetic.World) in domain_ratios (default DEFAULT_RATIOS), shuffled
    together. Deterministic in (world, seed); ids hash the question, so one question has one id whatever seed
    drew it (a code task's test inputs may differ between seeds); mcqa.split_items cuts held-out parts by id.
    Raises ValueError if the world has too few distinct tasks of a domain (a size-1 world has about 2,900 QA
    questions, paraphrases counted apart, and about 200 code tasks)."""
    ratios = DEFAULT_RATIOS if domain_ratios is None else domain_ratios
    tasks = []
    for domain, count in domain_counts(n, ratios).items():
        rng = random.Random(f"workflow-{world.seed}-{world.size}-{seed}-{domain}")
        seen = {}
        for _ in range(100 + 50 * count):
            if len(seen) == count:
                break
            task = SYNTHETIC_MAKERS[domain](world, rng)
            if task is not None and task["id"] not in seen:
                seen[task["id"]] = task
        if len(seen) < count:
            raise ValueError(f"the world (seed {world.seed}, size {world.size}) gave only {len(seen)} distinct "
                             f"{domain} tasks of the {count} asked for")
        tasks += seen.values()
    random.Random(f"workflow-order-{world.seed}-{world.size}-{seed}").shuffle(tasks)
    return tasks
