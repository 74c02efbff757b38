"""
GSM8K (openai/gsm8k): grade-school math word problems with a numeric answer.

Reads the `main` config; hub repo layout (and so a local copy at `from_dir/openai/gsm8k/`):

    main/train-00000-of-00001.parquet
    main/test-00000-of-00001.parquet

with columns question (str) and answer (str: worked reasoning ending in "#### <number>",
the number possibly written with thousands commas).
Items: {"messages", "answer": "1234" (the reference number, commas removed), "solution"}.

Scoring: the response's answer is the first number after its last "####" if it has one,
else the last number in it; it is correct if numerically equal to the reference
("42.0" == "42", "1,234" == "1234").
"""

import re
from decimal import Decimal

from nanochat.tasks import common

HUB_ID = "openai/gsm8k"
DEFAULT_SPLIT = "test"
KIND = "generative"

# Commas only count inside proper thousands groups, so a list like "1,2,3" stays three
# numbers; a minus only counts when it can't be a subtraction ("10-2" is 10 and 2).
NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_number(text):
    """The answer number in a text as a Decimal, or None if there is none."""
    if "####" in text:
        found = NUMBER.findall(text.rsplit("####", 1)[1])
        return Decimal(found[0].replace(",", "")) if found else None
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def load(split=DEFAULT_SPLIT, from_dir=None, limit=None):
    """The first `limit` items (all if None) of a split, in file order."""
    rows, where = common.load_rows(HUB_ID, f"main/{split}-*.parquet", split, from_dir, ["question", "answer"], limit)
    items = []
    for i, row in enumerate(rows):
        reference = parse_number(row["answer"]) if "####" in row["answer"] else None
        if reference is None:
            problem = f"field 'answer' does not end in '#### <number>': {row['answer'][-80:]!r}"
            raise common.row_error(where, split, i, problem)
        items.append({
            "messages": [{"role": "user", "content": row["question"]}],
            "answer": str(reference),
            "solution": row["answer"],
        })
    return items


def score(item, response):
    """1.0 if the response's answer number equals the reference."""
    return float(parse_number(response) == Decimal(item["answer"]))
