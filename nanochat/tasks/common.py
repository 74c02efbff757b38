"""
Shared pieces of the task adapters: reading one split of a hub dataset repository
(from the hub, or from a local copy of it), rendering multiple-choice questions, and
parsing the chosen letter out of a response.

A local copy is what `huggingface-cli download <hub id> --repo-type dataset
--local-dir DIR/<hub id>` leaves, so `from_dir=DIR` reads `DIR/<hub id>/<data file>`.
The same `datasets.load_dataset(source, data_files=...)` call serves both cases:
data_files patterns are resolved relative to the repo root, local or remote, which
also spares us relying on the README's config metadata being present in the copy.
"""

import glob
import os
import re

import datasets

LETTERS = "ABCDEFGHIJ"


def load_rows(hub_id, data_file, split, from_dir, columns, limit, **reader_options):
    """Rows of one split as a list of dicts, plus a description of where they came from.

    data_file is a pattern relative to the repo root, e.g. "all/test-*.parquet"; reader_options go to the file
    reader behind datasets.load_dataset (e.g. pandas' CSV options).
    Raises ValueError naming the file and split if a required column is missing.
    """
    source = hub_id if from_dir is None else os.path.join(from_dir, hub_id)
    where = f"{source}/{data_file}"
    # load_dataset treats a path that doesn't exist as a hub id, so a typo in from_dir
    # would otherwise turn into a confusing network error: fail here instead.
    if from_dir is not None and not glob.glob(where):
        raise FileNotFoundError(
            f"no file matches {where}; fetch the repo with: "
            f"huggingface-cli download {hub_id} --repo-type dataset --local-dir {source}"
        )
    ds = datasets.load_dataset(source, data_files={split: data_file}, split=split, **reader_options)
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"{where} (split {split!r}): missing column {column!r}, found {ds.column_names}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list(), where


def row_error(where, split, index, problem):
    """A ValueError for a malformed row, naming the file, split, row and field."""
    return ValueError(f"{where} (split {split!r}) row {index}: {problem}")


def choice_item(question, options, answer_index, **fields):
    """A multiple-choice item: options are lettered A, B, C, ... in the order given."""
    letters = list(LETTERS[: len(options)])
    lines = [question.strip(), ""]
    lines += [f"{letter}. {option}" for letter, option in zip(letters, options)]
    lines += ["", f"Answer with the letter of the correct option ({', '.join(letters)})."]
    return {
        "messages": [{"role": "user", "content": "\n".join(lines)}],
        "letters": letters,
        "answer": letters[answer_index],
        **fields,
    }


def parse_letter(response, letters):
    """The first uppercase option letter standing alone in the response, or None.

    "Alone" means no letter, digit or underscore on either side, so the "A" of "As" or
    "Answer" never counts while "A", "(B)", "C." and "answer is D" do. Lowercase letters
    are ignored because "a" is far more often the article than an answer.
    """
    pattern = r"(?<!\w)([" + "".join(letters) + r"])(?!\w)"
    match = re.search(pattern, response)
    return match.group(1) if match else None


def score_choice(item, response):
    """1.0 if the first standalone option letter in the response is the answer."""
    return float(parse_letter(response, item["letters"]) == item["answer"])
