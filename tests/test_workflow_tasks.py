"""
Tests for nanochat/workflow_tasks.py: the five-tier reward at each tier's boundary, answer extraction, the six hub
loaders on tiny local copies in the hubs' own layouts (written into tmp_path), the seeded splits, the synthetic
world's tasks and the domain mixes. Code rewards run real programs in the sandbox. Each test says in a comment
which plausible bug it catches. Nothing here touches the network.
"""

import gzip
import json
import os
import re
import time
from fractions import Fraction

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import workflow_tasks as wt
from nanochat.workflow_tasks import extract_final, load_tasks, parse_number, reward


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_parquet(path, columns, schema):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)


def math_task(answer):
    return wt.make_task("t", "test", "math", "?", answer)


def qa_task(*answers):
    return wt.make_task("t", "test", "qa", "?", list(answers))


def code_task(tests, setup=""):
    return wt.make_task("t", "test", "code", "?", "", entry_point="f", tests=tests, setup=setup)


# ---------------------------------------------------------------------------------------------------------------
# math: extraction and tiers

@pytest.mark.parametrize("prediction, expected", [
    (r"So the result is \boxed{\frac{3}{4}}.", Fraction(3, 4)),
    (r"\boxed{{12}} and later text", 12),  # nested braces
    (r"The answer is $\boxed{\dfrac{1}{8}}$", Fraction(1, 8)),
    ("Natalia sold 48 + 24 clips.\n#### 1,234", 1234),
    ("Final Answer: 42", 42),
    ("**Final Answer:** 42 apples.", 42),  # markdown, units, closing period
    ("Answer: $1,234.50", Fraction(246900, 200)),
    ("Answer: 3/4", Fraction(3, 4)),
    (r"Answer: -\frac{3}{4}", Fraction(-3, 4)),
    ("Answer: 23 + 45 - 12 = 56", 56),  # the value after the last "=", not the first operand
    ("Answer: 56 apples, since 23 + 45 - 12 = 56", 56),
    ("I think 12, then Answer: 7\nActually \\boxed{9}", 9),  # the marker that comes last wins
    ("We get 10-2 which is 8", 8),  # no marker: the last number; "-2" is a subtraction, not negative
    ("x = -5", -5),
    ("It costs 1,000,000 dollars", 1000000),
    ("The answer is as follows:\n 40 + 2 = 42", 42),  # a marked answer without a number falls back to the text
    ("no number in sight", None),
    ("Answer: none", None),
])
def test_parse_number(prediction, expected):
    # catches: boxed content cut at the first "}", commas read as separators of numbers, a fraction read as its
    # numerator, the first marker preferred over the last, a subtraction's minus taken as a sign
    assert parse_number(prediction) == expected


@pytest.mark.parametrize("text, expected", [
    (r"Thus \boxed{\frac{1}{\sqrt{2}}} is it", r"\frac{1}{\sqrt{2}}"),
    ("Answer: Paris.\n", "Paris"),
    ("Reasoning...\nFinal Answer:\n\n  Korta, Bilun\n", "Korta, Bilun"),  # an empty label line: the next line
    ("#### 17", "17"),
    ("Answer: 5\n\\boxed{6}\nAnswer: 7", "7"),
    ("  just the answer  ", "just the answer"),  # no marker: the whole text
])
def test_extract_final(text, expected):
    # catches: nested braces losing their closing part, the label's own line assumed non-empty, an earlier
    # marker winning over a later one
    assert extract_final(text) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("100", 1.0),
    ("100.0099", 1.0),   # relative error 0.000099
    ("100.01", 0.75),    # exactly 1e-4: not below it
    ("109.99", 0.75),
    ("110", 0.5),        # exactly 0.1
    ("90", 0.5),         # below the reference: the error is absolute
    ("129.99", 0.5),
    ("130", 0.25),       # exactly 0.3
    ("149.99", 0.25),
    ("150", 0.0),        # exactly 0.5
    ("50", 0.0),
    ("-100", 0.0),
])
def test_math_tier_boundaries(prediction, expected):
    # catches: <= for <, a signed error (90 scoring 1), floating error moving a tier at its exact boundary
    assert reward(math_task("100"), f"Answer: {prediction}") == expected


def test_math_reference_zero_and_negative():
    # catches: a ZeroDivisionError at r = 0, or an absolute error there (0.001 would score 1); sign dropped
    assert reward(math_task("0"), "Answer: 0") == 1.0
    assert reward(math_task("0"), "Answer: 0.00") == 1.0
    assert reward(math_task("0"), "Answer: 0.001") == 0.0
    assert reward(math_task("0"), "Answer: -0.001") == 0.0
    assert reward(math_task("-5"), "Answer: 5") == 0.0
    assert reward(math_task("-5"), "Answer: -5.2") == 0.75


def test_math_reference_forms_and_no_number():
    # catches: fraction or LaTeX references not read as numbers, a missing number scored by accident
    assert reward(math_task(r"\frac{3}{4}"), "Answer: 0.75") == 1.0
    assert reward(math_task("3/4"), r"\boxed{\frac{3}{4}}") == 1.0
    assert reward(math_task("1,000"), "#### 1000") == 1.0
    assert reward(math_task(r"5\%"), "Answer: 5%") == 1.0
    assert reward(math_task("42"), "I do not know.") == 0.0


def test_math_non_numeric_reference_compares_latex():
    # catches: a LaTeX reference parsed as its first number (sqrt{3} -> 3), \dfrac not equated with \frac
    task = math_task(r"\frac{\sqrt{3}}{2}")
    assert reward(task, r"So \boxed{\dfrac{\sqrt{3}}{2}}") == 1.0
    assert reward(task, r"So \boxed{\frac{\sqrt{2}}{2}}") == 0.0
    assert reward(task, "Answer: 3") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# QA

@pytest.mark.parametrize("text, expected", [
    ("The Eiffel-Tower!", "eiffel tower"),
    ("  A   cat ", "cat"),
    ("an apple, the PEAR; a plum.", "apple pear plum"),
    ("Theatre of Anna", "theatre of anna"),  # articles only as whole words
    ("Korta,Bilun", "korta bilun"),
])
def test_normalise_answer(text, expected):
    # catches: articles stripped inside words, punctuation deleted so that a comma glues two names together
    assert wt.normalise_answer(text) == expected


REFERENCE_10 = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
REFERENCE_20 = " ".join(f"v{i}" for i in range(20))


@pytest.mark.parametrize("reference, hits, expected", [
    (REFERENCE_10, 9, 1.0),    # recall exactly 0.9
    (REFERENCE_20, 17, 0.75),  # 0.85
    (REFERENCE_10, 7, 0.75),   # exactly 0.7
    (REFERENCE_20, 13, 0.5),   # 0.65
    (REFERENCE_10, 4, 0.5),    # exactly 0.4
    (REFERENCE_20, 7, 0.25),   # 0.35
    (REFERENCE_10, 2, 0.25),   # exactly 0.2
    (REFERENCE_20, 3, 0.0),    # 0.15
])
def test_qa_tier_boundaries(reference, hits, expected):
    # catches: > for >=, precision instead of recall (the extra words below would lower it), tiers shifted by one
    prediction = " ".join(reference.split()[:hits] + ["extra", "words", "here"])
    assert reward(qa_task(reference), prediction) == expected


def test_qa_exact_match_best_reference_and_final_answer():
    # catches: matching without normalisation, only the first reference tried, the reasoning before the final
    # answer line counted as the answer
    assert reward(qa_task("The Eiffel Tower"), "eiffel-tower.") == 1.0
    assert reward(qa_task("Korta, Bilun, Zemo, Pafi", "Nowhere"), "nowhere") == 1.0
    assert reward(qa_task("Korta, Bilun, Zemo, Pafi"), "Bilun and Korta") == 0.5
    assert reward(qa_task("Paris"), "I thought of Lyon.\nAnswer: Paris") == 1.0
    assert reward(qa_task("Paris"), "Lyon, surely") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# code, run in the sandbox

FOUR_TESTS = ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6", "assert f(4) == 8"]


def test_code_reward_pass_half_loop_and_crash():
    # catches: code run in-process or without a timeout (the loop would hang), a failed run scored by the tests
    # it never reached, the prose around a fenced block fed to the interpreter
    task = code_task(FOUR_TESTS)
    assert reward(task, "Here it is:\n```python\ndef f(x):\n    return 2 * x\n```\nDone.") == 1.0
    assert reward(task, "def f(x):\n    return 2 * x if x < 3 else 0\n") == 0.5
    assert reward(task, "def f(x):\n    return 2 * x if x < 4 else 0\n") == 0.75
    assert reward(task, "def f(x):\n    return 2 if x == 1 else 0\n") == 0.5  # 1 of 4 is >= 0.25
    assert reward(task, "def f(x):\n    raise ValueError\n") == 0.0
    assert reward(task, "def f(x) return 2 * x") == 0.0  # a syntax error: no test runs
    start = time.monotonic()
    looping = "def f(x):\n    if x == 3:\n        while True:\n            pass\n    return 2 * x\n"
    assert reward(task, looping, execution_timeout=1.0) == 0.0  # two tests passed before it hung: still 0
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("right, expected", [(99, 1.0), (98, 0.75), (75, 0.75), (74, 0.5), (25, 0.5), (24, 0.25),
                                             (1, 0.25), (0, 0.0)])
def test_code_tier_boundaries(right, expected):
    # catches: > for >= at 0.99 / 0.75 / 0.25, a zero pass rate scored 0.25
    tests = [f"assert f({i}) == {i}" for i in range(100)]
    assert reward(code_task(tests), f"def f(i):\n    return i if i < {right} else -1\n") == expected


def test_code_setup_runs_before_the_candidate():
    # catches: setup ignored (the candidate's use of OFFSET would fail), or run after the candidate
    task = code_task(["assert f(1) == 11"], setup="OFFSET = 10\n")
    assert reward(task, "def f(x):\n    return x + OFFSET\n") == 1.0
    with pytest.raises(ValueError, match="no tests"):
        reward(code_task([]), "def f(x):\n    return x\n")


def test_accuracy_and_unknown_domain():
    # catches: accuracy counting only full rewards, or a reward of 0.5 as correct
    assert wt.accuracy([1.0, 0.75, 0.5, 0.25, 0.0]) == 0.4
    assert wt.accuracy([]) == 0.0
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        reward(wt.make_task("t", "x", "poetry", "?", ""), "")


# ---------------------------------------------------------------------------------------------------------------
# hub data sets, read from tiny local copies in their own layouts

GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
MATH_SCHEMA = pa.schema([("problem", pa.string()), ("level", pa.string()), ("type", pa.string()),
                         ("solution", pa.string())])
SQUAD_SCHEMA = pa.schema([
    ("id", pa.string()), ("title", pa.string()), ("context", pa.string()), ("question", pa.string()),
    ("answers", pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))])),
])
HOTPOT_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("type", pa.string()),
    ("level", pa.string()),
    ("supporting_facts", pa.struct([("title", pa.list_(pa.string())), ("sent_id", pa.list_(pa.int32()))])),
    ("context", pa.struct([("title", pa.list_(pa.string())), ("sentences", pa.list_(pa.list_(pa.string())))])),
])
MBPP_SCHEMA = pa.schema([
    ("task_id", pa.int32()), ("text", pa.string()), ("code", pa.string()), ("test_list", pa.list_(pa.string())),
    ("test_setup_code", pa.string()), ("challenge_test_list", pa.list_(pa.string())),
])


def write_gsm8k(root, split, answers):
    write_parquet(f"{root}/openai/gsm8k/main/{split}-00000-of-00001.parquet", {
        "question": [f"Question {i}?" for i in range(len(answers))],
        "answer": [f"Some reasoning.\n#### {answer}" for answer in answers],
    }, GSM8K_SCHEMA)


def write_math(root, hub_id, file, solutions):
    write_parquet(f"{root}/{hub_id}/data/{file}", {
        "problem": [f"Problem {i}." for i in range(len(solutions))], "level": ["Level 2"] * len(solutions),
        "type": ["Algebra"] * len(solutions), "solution": solutions,
    }, MATH_SCHEMA)


def test_gsm8k_splits_and_record_shape(tmp_path):
    # catches: the hub's test split cut into train/val (leaking test), a train/val overlap, commas kept in answers
    write_gsm8k(tmp_path, "train", [f"{i},000" for i in range(1, 41)])
    write_gsm8k(tmp_path, "test", ["1,234", "-7"])
    test = load_tasks("gsm8k", "test", from_dir=tmp_path)
    assert test[0] == {"id": "gsm8k/test/0", "dataset": "gsm8k", "domain": "math", "question": "Question 0?",
                       "answer": "1234", "entry_point": "", "tests": [], "setup": "",
                       "solution": "Some reasoning.\n#### 1,234"}
    assert [task["answer"] for task in test] == ["1234", "-7"]
    train, val = (load_tasks("gsm8k", split, from_dir=tmp_path) for split in ("train", "val"))
    ids = [task["id"] for task in train + val]
    assert sorted(ids) == sorted(f"gsm8k/train/{i}" for i in range(40)) and train and val
    assert reward(train[0], f"#### {train[0]['answer']}") == 1.0


def test_math_hendrycks_and_qwedsacf(tmp_path):
    # catches: the first \boxed taken instead of the last, nested braces cut short, the one-split copy not cut
    solutions = [r"First \boxed{1}, then $\boxed{\frac{1}{\sqrt{2}}}$.", r"So it is \fbox{7}.", r"\boxed 5"]
    write_math(tmp_path, "hendrycks/competition_math", "test-00000-of-00001.parquet", solutions)
    tasks = load_tasks("math", "test", from_dir=tmp_path)
    assert [task["answer"] for task in tasks] == [r"\frac{1}{\sqrt{2}}", "7", "5"]
    assert tasks[0]["domain"] == "math" and tasks[0]["solution"] == solutions[0] and tasks[0]["id"] == "math/test/0"
    write_math(tmp_path, "qwedsacf/competition_math", "train-00000-of-00001-7320a6f3aba8ebd2.parquet",
               [rf"\boxed{{{i}}}" for i in range(60)])
    parts = {split: load_tasks("math_qwedsacf", split, from_dir=tmp_path, seed=3) for split in ("train", "val", "test")}
    ids = [task["id"] for part in parts.values() for task in part]
    assert sorted(ids) == sorted(f"math_qwedsacf/train/{i}" for i in range(60)) and all(parts.values())


def test_seeded_split_stable_disjoint_and_limit_after_cut(tmp_path):
    # catches: a cut drawn from a global shuffle (a limit or another seed's run moving tasks between parts),
    # the limit applied before the cut
    write_math(tmp_path, "qwedsacf/competition_math", "train-00000-of-00001.parquet",
               [rf"\boxed{{{i}}}" for i in range(200)])

    def ids(split, seed, limit=None):
        return [task["id"] for task in load_tasks("math_qwedsacf", split, from_dir=tmp_path, limit=limit, seed=seed)]
    train, val, test = ids("train", 0), ids("val", 0), ids("test", 0)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert 130 < len(train) < 190 and val and test
    assert ids("train", 0) == train and ids("test", 0, limit=3) == test[:3]
    assert ids("test", 1) != test


def test_squad_v2_drops_unanswerable_and_shows_passage(tmp_path):
    # catches: unanswerable questions kept with an empty reference (every answer would score 1 on recall 0/0),
    # duplicate answer texts kept, the passage left out of the question
    write_parquet(f"{tmp_path}/rajpurkar/squad_v2/squad_v2/validation-00000-of-00001.parquet", {
        "id": ["q1", "q2", "q3"], "title": ["Normans", "Normans", "Physics"],
        "context": ["The Normans were in Normandy, a region in France.", "Same passage.", "Force is mass times a."],
        "question": ["In what country is Normandy?", "Who ruled in 1066 on the moon?", "What is force?"],
        "answers": [{"text": ["France", "France", "in France"], "answer_start": [42, 42, 39]},
                    {"text": [], "answer_start": []},
                    {"text": ["mass times acceleration"], "answer_start": [9]}],
    }, SQUAD_SCHEMA)
    tasks = load_tasks("squad_v2", "test", from_dir=tmp_path)
    assert [task["id"] for task in tasks] == ["squad_v2/q1", "squad_v2/q3"]
    assert tasks[0]["answer"] == ["France", "in France"] and tasks[0]["domain"] == "qa"
    assert "The Normans were in Normandy" in tasks[0]["question"]
    assert tasks[0]["question"].endswith("Question: In what country is Normandy?")
    assert reward(tasks[0], "france") == 1.0


def test_hotpotqa_includes_supporting_paragraphs_truncated(tmp_path):
    # catches: every retrieved paragraph dumped into the prompt, long paragraphs not cut, a row whose supporting
    # paragraphs were not retrieved left without any context
    long_sentence = "Filler word " * 200
    write_parquet(f"{tmp_path}/hotpotqa/hotpot_qa/fullwiki/validation-00000-of-00001.parquet", {
        "id": ["5a8b", "5a8c"], "question": ["Which band formed first?", "Is it yes?"], "answer": ["Blur", "yes"],
        "type": ["comparison", "comparison"], "level": ["hard", "easy"],
        "supporting_facts": [{"title": ["Blur", "Oasis", "Blur"], "sent_id": [0, 0, 1]},
                             {"title": ["Missing"], "sent_id": [0]}],
        "context": [{"title": ["Pulp", "Oasis", "Blur"],
                     "sentences": [["Pulp is a band."], ["Oasis formed in 1991.", long_sentence],
                                   ["Blur formed in 1988.", "They are English."]]},
                    {"title": ["A", "B", "C"], "sentences": [["Alpha."], ["Beta."], ["Gamma."]]}],
    }, HOTPOT_SCHEMA)
    first, second = load_tasks("hotpotqa", "test", from_dir=tmp_path)
    assert first["id"] == "hotpotqa/5a8b" and first["answer"] == ["Blur"]
    assert "Blur: Blur formed in 1988. They are English." in first["question"]
    assert "Oasis formed in 1991." in first["question"] and "Pulp" not in first["question"]
    assert first["question"].index("Blur:") < first["question"].index("Oasis:")  # supporting-fact order
    oasis = re.search(r"Oasis: (.*)", first["question"]).group(1)
    assert oasis.endswith(" ...") and len(oasis) <= wt.HOTPOT_PARAGRAPH_CHARS + 4
    assert "A: Alpha." in second["question"] and "B: Beta." in second["question"] and "Gamma" not in second["question"]


HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0",
     "prompt": 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": ("METADATA = {'author': 'x'}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
              "    assert candidate([]) == 0\n    assert True\n    assert candidate([5]) == 5\n"
              "    assert candidate(\n        [-1, 1]\n    ) == 0\n"),
     "entry_point": "add_all"},
    {"task_id": "HumanEval/1", "prompt": 'def double(x):\n    """Twice x."""\n',
     "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    for x in range(3):\n        assert candidate(x) == 2 * x\n",
     "entry_point": "double"},
]


def test_humaneval_tests_per_assert_and_setup(tmp_path):
    # catches: `assert True` counted as a test (paying for wrong code), multi-line asserts cut, the prompt's
    # imports missing when the candidate's annotations need them, a non-assert check body split apart
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in HUMANEVAL_ROWS)
    tasks = {task["id"]: task for split in ("train", "val", "test")
             for task in load_tasks("humaneval", split, from_dir=tmp_path)}
    first, second = tasks["HumanEval/0"], tasks["HumanEval/1"]
    assert len(first["tests"]) == 4 and first["entry_point"] == "add_all" and first["domain"] == "code"
    assert len(second["tests"]) == 1 and second["tests"][0].rstrip().endswith("check(double)")
    assert reward(first, first["answer"]) == 1.0 and reward(second, second["answer"]) == 1.0
    wrong = "```python\ndef add_all(xs: List[int]) -> int:\n    return len(xs)\n```"
    assert reward(first, wrong) == 0.5  # passes only candidate([]) == 0: 1 of 4


def write_mbpp(root, split, rows):
    write_parquet(f"{root}/google-research-datasets/mbpp/full/{split}-00000-of-00001.parquet", {
        "task_id": [row[0] for row in rows], "text": [row[1] for row in rows], "code": [row[2] for row in rows],
        "test_list": [row[3] for row in rows], "test_setup_code": [row[4] for row in rows],
        "challenge_test_list": [[] for _ in rows],
    }, MBPP_SCHEMA)


def test_mbpp_entry_point_and_setup(tmp_path):
    # catches: the entry point taken as the first call in the test (set), test_setup_code dropped, the held-out
    # tests shown in the question
    write_mbpp(tmp_path, "test", [
        (2, "Write a function to find the shared elements of two lists.",
         "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b)) ",
         ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
          "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"], ""),
        (3, "Write a function that adds OFFSET.", "def add_offset(x):\n    return x + OFFSET\n",
         ["assert add_offset(1) == 11", "assert add_offset(-10) == 0"], "OFFSET = 10"),
    ])
    first, second = load_tasks("mbpp", "test", from_dir=tmp_path)
    assert first["id"] == "mbpp/2" and first["entry_point"] == "similar_elements" and len(first["tests"]) == 2
    assert "(5, 7, 4, 10)" in first["question"] and "(5, 4, 3, 7)" not in first["question"]
    assert second["entry_point"] == "add_offset" and second["setup"] == "OFFSET = 10"
    assert reward(first, first["answer"]) == 1.0 and reward(second, second["answer"]) == 1.0


@pytest.mark.parametrize("dataset, write, message", [
    ("gsm8k", lambda root: write_gsm8k(root, "test", ["5", "no number"]), r"row 1: field 'answer'"),
    ("math", lambda root: write_math(root, "hendrycks/competition_math", "test-00000-of-00001.parquet",
                                     [r"\boxed{1}", "No box here."]), r"row 1: field 'solution' has no \\boxed"),
    ("squad_v2", lambda root: write_parquet(
        f"{root}/rajpurkar/squad_v2/squad_v2/validation-00000-of-00001.parquet",
        {"id": ["a", "b"], "title": ["t", "t"], "context": ["c", ""], "question": ["q", "q"],
         "answers": [{"text": ["x"], "answer_start": [0]}] * 2}, SQUAD_SCHEMA), r"row 1: field 'context'"),
    ("hotpotqa", lambda root: write_parquet(
        f"{root}/hotpotqa/hotpot_qa/fullwiki/validation-00000-of-00001.parquet",
        {"id": ["a"], "question": ["q"], "answer": ["x"], "type": ["t"], "level": ["l"],
         "supporting_facts": [{"title": ["A"], "sent_id": [0]}],
         "context": [{"title": ["A", "B"], "sentences": [["s"]]}]}, HOTPOT_SCHEMA), r"row 0: field 'context'"),
    ("mbpp", lambda root: write_mbpp(root, "test", [(1, "t", "def g(x):\n    return x", ["assert f(1) == 1"], "")]),
     r"row 0: field 'test_list'"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, dataset, write, message):
    # catches: a malformed row skipped silently or failing later with a KeyError that names nothing
    write(tmp_path)
    with pytest.raises(ValueError, match=r"\(split '\w+'\) " + message):
        load_tasks(dataset, "test", from_dir=tmp_path)


def test_load_tasks_unknown_name_split_and_missing_copy(tmp_path):
    # catches: a typo in a data set name or split falling through to a confusing hub error
    with pytest.raises(ValueError, match="unknown workflow data set 'gsm9k'.*gsm8k"):
        load_tasks("gsm9k", "train")
    with pytest.raises(ValueError, match="mbpp has splits train, val, test, not 'validation'"):
        load_tasks("mbpp", "validation")
    with pytest.raises(FileNotFoundError, match="fullwiki/train-"):
        load_tasks("hotpotqa", "train", from_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# synthetic-world tasks

def test_synthetic_tasks_deterministic_with_stable_ids(world):
    # catches: global random state or set order in generation, ids that number tasks by position (the same task
    # getting another id under another seed), duplicate tasks, ratios not applied
    tasks = wt.synthetic_tasks(world, 60, seed=0)
    assert tasks == wt.synthetic_tasks(world, 60, seed=0)
    assert tasks != wt.synthetic_tasks(world, 60, seed=1)
    assert len({task["id"] for task in tasks}) == 60 and len({task["question"] for task in tasks}) == 60
    counts = {domain: sum(task["domain"] == domain for task in tasks) for domain in wt.DOMAINS}
    assert counts == {"math": 24, "qa": 18, "code": 18}
    other = {task["question"]: task["id"] for task in wt.synthetic_tasks(world, 300, seed=1, domain_ratios={"qa": 1})}
    shared = [task for task in tasks if task["question"] in other]
    assert shared and all(other[task["question"]] == task["id"] for task in shared)
    assert {task["dataset"] for task in tasks} == {"synthetic"}


def test_synthetic_math_answer_is_its_program(world):
    # catches: an answer computed from the wrong operands or template, numbers too small to need a program
    tasks = wt.synthetic_tasks(world, 40, seed=2, domain_ratios={"math": 1.0})
    for task in tasks:
        expression = re.fullmatch(r"def solve\(\):\n    return (.+)\n", task["solution"]).group(1)
        assert eval(expression) == int(task["answer"]) >= 100
        assert reward(task, f"Answer: {task['answer']}") == 1.0
    assert len({task["question"].split()[2] for task in tasks}) > 1  # templates vary


def test_synthetic_qa_answers_agree_with_the_world(world):
    # catches: a single fact answered from the wrong person, a multi-value list missing members or adding some
    tasks = wt.synthetic_tasks(world, 120, seed=3, domain_ratios={"qa": 1.0})
    multi = [task for task in tasks if ", " in task["answer"][0]]
    assert 30 < len(multi) < 90
    for task in tasks:
        match = re.fullmatch(r"Who lives in (\w+)\? Name everyone\.", task["question"])
        if match:
            assert task["answer"] == [", ".join(sorted(p.name for p in world.people if p.city == match.group(1)))]
        elif task not in multi:
            assert task["answer"] == [world.lookup(task["question"]).answer]
    long = next(task for task in multi if task["answer"][0].count(", ") >= 3)
    names = long["answer"][0].split(", ")
    assert 0 < reward(long, ", ".join(names[: len(names) // 2])) < 1  # a partial list earns a partial reward


def test_synthetic_code_canonical_solutions_pass_their_tests(world, monkeypatch):
    # catches: expected values in the tests computed differently from what the question asks, bad test syntax,
    # a wrong program passing the tests
    tasks = wt.synthetic_tasks(world, 150, seed=4, domain_ratios={"code": 1.0})
    assert all(2 <= len(task["tests"]) <= 4 and task["entry_point"] in task["question"] for task in tasks)
    for template in wt.CODE_TEMPLATES:
        monkeypatch.setattr(wt, "CODE_TEMPLATES", (template,))
        for task in wt.synthetic_tasks(world, 2, seed=5, domain_ratios={"code": 1.0}):
            assert reward(task, task["answer"]) == 1.0, task
        assert reward(task, f"def {task['entry_point']}(*args):\n    return None\n") < 0.75


# ---------------------------------------------------------------------------------------------------------------
# domain ratios and mixes

def test_parse_domain_ratios():
    # catches: weights that do not sum to 1 accepted silently, spaces around names rejected
    assert wt.parse_domain_ratios("math=0.4, qa=0.3,code=0.3") == {"math": 0.4, "qa": 0.3, "code": 0.3}
    assert wt.parse_domain_ratios("code=1") == {"code": 1.0}


@pytest.mark.parametrize("text, message", [
    ("", "expected domain=weight"),
    ("math0.4,qa=0.6", "expected domain=weight"),
    ("maths=0.4,qa=0.6", "unknown domain 'maths'"),
    ("math=0.5,math=0.5", "'math' is given twice"),
    ("math=abc,qa=1", "not a number"),
    ("math=-0.5,qa=1.5", "expected 0..1"),
    ("math=nan,qa=1", "expected 0..1"),
    ("math=0.4,qa=0.3,code=0.2", "sum to 0.9, expected 1"),
])
def test_parse_domain_ratios_errors(text, message):
    # catches: a malformed flag turning into a KeyError or a silently renormalised mix
    with pytest.raises(ValueError, match=re.escape(message)):
        wt.parse_domain_ratios(text)


def test_mix_ratios_seeded_and_bounded():
    # catches: counts rounded independently (a mix of 10 at thirds giving 9), sampling with replacement, an
    # unseeded shuffle, a short pool padded silently
    pools = {domain: [{"id": f"{domain}/{i}", "domain": domain} for i in range(100)] for domain in wt.DOMAINS}
    ratios = {"math": 0.4, "qa": 0.3, "code": 0.3}
    mixed = wt.mix(ratios, pools, n=50, seed=0)
    assert [sum(task["domain"] == d for task in mixed) for d in wt.DOMAINS] == [20, 15, 15]
    assert len({task["id"] for task in mixed}) == 50
    assert mixed == wt.mix(ratios, pools, n=50, seed=0) and mixed != wt.mix(ratios, pools, n=50, seed=1)
    assert wt.domain_counts(10, {"math": 1 / 3, "qa": 1 / 3, "code": 1 / 3}) == {"math": 4, "qa": 3, "code": 3}
    assert wt.domain_counts(7, {"qa": 0.5, "code": 0.5}) == {"qa": 4, "code": 3}
    short = {**pools, "qa": pools["qa"][:10]}
    assert len(wt.mix(ratios, short, seed=0)) == 33  # the largest mix 10 qa tasks allow at 0.3
    with pytest.raises(ValueError, match="needs 15 qa tasks, but only 10"):
        wt.mix(ratios, short, n=50, seed=0)
    with pytest.raises(ValueError, match="'poetry'"):
        wt.mix({"poetry": 1.0}, pools, n=5)
