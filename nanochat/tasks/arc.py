"""
ARC (allenai/ai2_arc): grade-school science multiple-choice questions, in two configs,
ARC-Easy and ARC-Challenge, each a task of its own (ARC_EASY, ARC_CHALLENGE below).

Hub repo layout (and so a local copy at `from_dir/allenai/ai2_arc/`):

    ARC-Easy/{train,validation,test}-00000-of-00001.parquet
    ARC-Challenge/{train,validation,test}-00000-of-00001.parquet

with columns id (str), question (str), choices ({"text": [str], "label": [str]}),
answerKey (str). Labels are usually A-D but some rows use 1-4, and a few have 3 or 5
options. Options are always shown relettered A, B, C, ... in their original order, so a
model only ever answers with letters; answerKey "3" becomes "C".
Items: {"messages", "letters", "answer", "id"}.
"""

from nanochat.tasks import common


class Arc:
    """One ARC config, with the same attributes and functions as a task module."""

    HUB_ID = "allenai/ai2_arc"
    DEFAULT_SPLIT = "test"
    KIND = "choice"

    def __init__(self, config):
        self.config = config

    def load(self, split=DEFAULT_SPLIT, from_dir=None, limit=None):
        """The first `limit` items (all if None) of a split, in file order."""
        data_file = f"{self.config}/{split}-*.parquet"
        columns = ["id", "question", "choices", "answerKey"]
        rows, where = common.load_rows(self.HUB_ID, data_file, split, from_dir, columns, limit)
        items = []
        for i, row in enumerate(rows):
            texts, labels = row["choices"]["text"], row["choices"]["label"]
            if len(texts) != len(labels) or not 2 <= len(texts) <= len(common.LETTERS):
                problem = f"field 'choices' is {row['choices']!r}, expected matching text and label lists"
                raise common.row_error(where, split, i, problem)
            if row["answerKey"] not in labels:
                problem = f"field 'answerKey' is {row['answerKey']!r}, not one of the labels {labels}"
                raise common.row_error(where, split, i, problem)
            items.append(common.choice_item(row["question"], texts, labels.index(row["answerKey"]), id=row["id"]))
        return items

    def score(self, item, response):
        """1.0 if the first standalone uppercase option letter in the response is the answer."""
        return common.score_choice(item, response)


ARC_EASY = Arc("ARC-Easy")
ARC_CHALLENGE = Arc("ARC-Challenge")
