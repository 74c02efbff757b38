"""
MMLU (cais/mmlu): 57-subject multiple-choice exam questions, four options each.

Reads the `all` config, whose files in the hub repo (and so in a local copy at
`from_dir/cais/mmlu/`) are laid out as:

    all/test-00000-of-00001.parquet
    all/validation-00000-of-00001.parquet
    all/dev-00000-of-00001.parquet
    all/auxiliary_train-00000-of-00001.parquet

with columns question (str), subject (str), choices (list of 4 str), answer (int 0-3).
Items: {"messages", "letters": ["A".."D"], "answer": "B", "subject"}.
"""

from nanochat.tasks import common

HUB_ID = "cais/mmlu"
DEFAULT_SPLIT = "test"
KIND = "choice"


def load(split=DEFAULT_SPLIT, from_dir=None, limit=None):
    """The first `limit` items (all if None) of a split, in file order."""
    columns = ["question", "subject", "choices", "answer"]
    rows, where = common.load_rows(HUB_ID, f"all/{split}-*.parquet", split, from_dir, columns, limit)
    items = []
    for i, row in enumerate(rows):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(common.LETTERS):
            raise common.row_error(where, split, i, f"field 'choices' is {choices!r}, expected a list of options")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            problem = f"field 'answer' is {answer!r}, expected an int in 0..{len(choices) - 1}"
            raise common.row_error(where, split, i, problem)
        items.append(common.choice_item(row["question"], choices, answer, subject=row["subject"]))
    return items


def score(item, response):
    """1.0 if the first standalone uppercase letter A-D in the response is the answer."""
    return common.score_choice(item, response)
