"""
Tests for nanochat/mcqa.py: loaders read tiny local copies of cais/mmlu (parquet) and openai/MMMLU (CSV) in the
hubs' own layout, written into tmp_path; extraction, scoring, splitting and the degeneration check run on
hand-written text. Each test says in a comment which plausible bug it catches. Nothing here touches the network.
"""

import csv
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import mcqa
from nanochat.mcqa import extract_answer, is_degenerate, load_mcqa, split_items


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


MMLU_SCHEMA = pa.schema([
    ("question", pa.string()), ("subject", pa.string()),
    ("choices", pa.list_(pa.string())), ("answer", pa.int64()),
])


def write_mmlu(root, split="test", answers=(1, 3), subjects=("anatomy", "virology")):
    path = f"{root}/cais/mmlu/all/{split}-00000-of-00001.parquet"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({
        "question": ["What is 2 + 2?", "Which is a virus?"],
        "subject": list(subjects),
        "choices": [["3", "4", "5", "22"], ["E. coli", "Yeast", "Amoeba", "Influenza"]],
        "answer": list(answers),
    }, schema=MMLU_SCHEMA), path)


# as pandas' to_csv wrote the hub's files: a leading unnamed index column, then the named ones
MMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer", "Subject"]
YO_ROWS = [
    ["Kí ni 2 + 2?", "3", "4", "5", "22", "B", "elementary_mathematics"],
    ['Ewo ni "kòkòrò àrùn", tàbí virus?', "None", "NA", "0.50", "Influenza", "D", "virology"],
] + [[f"Ìbéèrè {i}?", "a", "b", "d", "e", "ABCD"[i % 4], "misc"] for i in range(2, 40)]


def write_mmmlu(root, rows, locale="YO-NG", header=MMMLU_HEADER):
    path = f"{root}/openai/MMMLU/test/mmlu_{locale}.csv"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, row in enumerate(rows):
            writer.writerow([i, *row] if header[0] == "" else row)


# ---------------------------------------------------------------------------------------------------------------
# loaders


def test_mmlu_load(tmp_path):
    # catches: answer index not turned into its letter, or items missing/renaming a field of the common format
    write_mmlu(tmp_path)
    items = load_mcqa("mmlu", "test", from_dir=tmp_path)
    assert items == [
        {"id": "mmlu/test/0", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "B",
         "subject": "anatomy", "language": "en"},
        {"id": "mmlu/test/1", "question": "Which is a virus?", "choices": ["E. coli", "Yeast", "Amoeba", "Influenza"],
         "answer": "D", "subject": "virology", "language": "en"},
    ]
    assert len(load_mcqa("mmlu", "test", from_dir=tmp_path, limit=1)) == 1


def test_mmlu_auxiliary_train_and_bad_split(tmp_path):
    # catches: rejecting auxiliary_train's empty subjects, or a typo'd split turning into a confusing file error
    write_mmlu(tmp_path, split="auxiliary_train", subjects=("", ""))
    assert [item["subject"] for item in load_mcqa("mmlu", "auxiliary_train", from_dir=tmp_path)] == ["", ""]
    with pytest.raises(ValueError, match="auxiliary_train, dev, validation, test, not 'train'"):
        load_mcqa("mmlu", "train", from_dir=tmp_path)


@pytest.mark.parametrize("bad", [4, -1])
def test_mmlu_malformed_row_names_file_row_field(tmp_path, bad):
    # catches: an out-of-range answer passed through (-1 would silently become "D") or an error that does not
    # say where the bad row is
    write_mmlu(tmp_path, answers=(1, bad))
    with pytest.raises(ValueError, match=rf"mmlu/all/test-\*\.parquet \(split 'test'\) row 1: field 'answer' is {bad}"):
        load_mcqa("mmlu", "test", from_dir=tmp_path)


def test_mmmlu_load_keeps_cells_as_text(tmp_path):
    # catches: pandas' defaults reading the option "None"/"NA" as missing and "0.50" as the number 0.5, the
    # unnamed index column breaking the reader, and a wrong language code from the locale
    write_mmmlu(tmp_path, YO_ROWS)
    items = split_items(load_all_parts(tmp_path), mcqa.MMMLU_SHARES, 0)
    by_id = {item["id"]: item for part in items.values() for item in part}
    assert by_id["mmlu_YO-NG/1"] == {
        "id": "mmlu_YO-NG/1", "question": 'Ewo ni "kòkòrò àrùn", tàbí virus?',
        "choices": ["None", "NA", "0.50", "Influenza"], "answer": "D", "subject": "virology", "language": "yo",
    }
    assert by_id["mmlu_YO-NG/0"]["question"] == "Kí ni 2 + 2?" and by_id["mmlu_YO-NG/0"]["answer"] == "B"


def test_mmmlu_numeric_options_stay_text(tmp_path):
    # catches: a column whose cells all look numeric read as numbers, which turns "0.50" into 0.5 and "007" into 7
    write_mmmlu(tmp_path, [["Q0?", "a", "b", "c", "0.50", "D", "s"], ["Q1?", "a", "b", "c", "007", "A", "s"]])
    assert sorted(item["choices"][3] for item in load_all_parts(tmp_path)) == ["0.50", "007"]


def test_mmmlu_file_without_index_column(tmp_path):
    # catches: a loader that depends on the leading index column (a later revision of the files drops it)
    write_mmmlu(tmp_path, YO_ROWS, header=MMMLU_HEADER[1:])
    assert len(load_all_parts(tmp_path)) == len(YO_ROWS)


def load_all_parts(root, locale="YO-NG", seed=0):
    return [item for split in mcqa.MMMLU_SHARES for item in load_mcqa(f"mmlu_{locale}", split, root, seed=seed)]


def test_mmmlu_parts_cover_the_file_and_limit_applies_after_the_cut(tmp_path):
    # catches: parts that overlap or drop rows, and a limit applied before the cut (which would move items
    # between train and test depending on the limit)
    write_mmmlu(tmp_path, YO_ROWS)
    parts = {split: load_mcqa("mmlu_YO-NG", split, from_dir=tmp_path) for split in mcqa.MMMLU_SHARES}
    ids = [item["id"] for part in parts.values() for item in part]
    assert sorted(ids) == sorted(f"mmlu_YO-NG/{i}" for i in range(len(YO_ROWS)))
    limited = load_mcqa("mmlu_YO-NG", "train", from_dir=tmp_path, limit=3)
    assert limited == parts["train"][:3]
    with pytest.raises(ValueError, match="train, validation, test, not 'dev'"):
        load_mcqa("mmlu_YO-NG", "dev", from_dir=tmp_path)


@pytest.mark.parametrize("row, field, value", [
    (["Q?", "a", "b", "c", "d", "E", "s"], "Answer", "'E'"),
    (["Q?", "a", "b", "", "d", "A", "s"], "C", "''"),
    (["", "a", "b", "c", "d", "A", "s"], "Question", "''"),
])
def test_mmmlu_malformed_row_names_file_row_field(tmp_path, row, field, value):
    # catches: a bad answer letter or an empty cell accepted (an unanswerable item), or an error without location
    write_mmmlu(tmp_path, [YO_ROWS[0], row])
    expected = rf"openai/MMMLU/test/mmlu_YO-NG\.csv \(split 'test'\) row 1: field '{field}' is {value}"
    with pytest.raises(ValueError, match=expected):
        load_mcqa("mmlu_YO-NG", "test", from_dir=tmp_path)


def test_mmmlu_missing_column_and_missing_file(tmp_path):
    # catches: a file without a Subject column read as if it had one, and a missing local copy reported as a
    # hub (network) error instead of naming the file to fetch
    with pytest.raises(FileNotFoundError, match=r"openai/MMMLU/test/mmlu_SW-KE\.csv.*huggingface-cli download"):
        load_mcqa("mmlu_SW-KE", "test", from_dir=tmp_path)
    write_mmmlu(tmp_path, [row[:-1] for row in YO_ROWS], header=MMMLU_HEADER[:-1])
    with pytest.raises(ValueError, match=r"mmlu_YO-NG\.csv \(split 'test'\): missing column 'Subject'"):
        load_mcqa("mmlu_YO-NG", "test", from_dir=tmp_path)


def test_unknown_dataset_lists_known_names():
    # catches: a KeyError (or a silent fallback to mmlu) for a typo such as the config-style "mmlu_YO_NG"
    with pytest.raises(ValueError, match=r"unknown multiple-choice data set 'mmlu_YO_NG'; known: mmlu, mmlu_AR-XY"):
        load_mcqa("mmlu_YO_NG", "test")


# ---------------------------------------------------------------------------------------------------------------
# splitting


def fake_items(count, prefix="x"):
    return [{"id": f"{prefix}/{i}"} for i in range(count)]


def test_split_disjoint_covering_ordered_and_seeded():
    # catches: items landing in two parts or none, parts reordered, and a seed that is ignored or not reproducible
    items = fake_items(2000)
    parts = split_items(items, mcqa.MMMLU_SHARES, seed=0)
    ids = [item["id"] for part in parts.values() for item in part]
    assert len(ids) == len(set(ids)) == len(items)
    for part in parts.values():
        assert part == sorted(part, key=lambda item: int(item["id"].split("/")[1]))
    assert split_items(items, mcqa.MMMLU_SHARES, seed=0) == parts
    assert split_items(items, mcqa.MMMLU_SHARES, seed=1)["test"] != parts["test"]
    # shares hold roughly (binomial sd at 2000 items is about 0.7% for the 10% parts)
    assert abs(len(parts["train"]) / 2000 - 0.8) < 0.04 and abs(len(parts["test"]) / 2000 - 0.1) < 0.04


def test_split_membership_ignores_other_items():
    # catches: a split by shuffling the whole list, where dropping or adding items (a limit, a new file revision)
    # moves the rest between parts, leaking held-out questions into training
    items = fake_items(300)
    full = split_items(items, mcqa.MMMLU_SHARES, seed=3)
    half = split_items(items[::2], mcqa.MMMLU_SHARES, seed=3)
    kept = {item["id"] for item in items[::2]}
    for name in full:
        assert half[name] == [item for item in full[name] if item["id"] in kept]


def test_split_rejects_bad_shares():
    # catches: shares that do not sum to 1 silently dumping the remainder into the last part
    with pytest.raises(ValueError, match="sum to 1"):
        split_items(fake_items(3), {"train": 0.8, "test": 0.1}, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# rendering


ITEM = {"id": "t/0", "question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "B",
        "subject": "math", "language": "en"}


def test_render_question():
    # catches: options missing or misnumbered, the meta-prompt dropped, or blocks in the wrong order
    text = mcqa.render_question(ITEM, meta_prompt="Check your arithmetic.")
    assert text == (mcqa.PREAMBLES["en"] + "\n\nCheck your arithmetic.\n\nWhat is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 22")
    assert mcqa.render_question(ITEM, preamble="P") == "P\n\nWhat is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 22"


@pytest.mark.parametrize("language, label", [("en", "Answer"), ("yo", "Ìdáhùn"), ("fr", "Answer")])
def test_preamble_format_line_is_what_extraction_reads(language, label):
    # catches: a localised preamble asking for a format the extractor does not read, or the wrong language's
    # preamble (French has none yet, so it gets the English one)
    text = mcqa.render_question({**ITEM, "language": language})
    assert text.startswith(mcqa.PREAMBLES.get(language, mcqa.PREAMBLES["en"])) and f'"{label}: X"' in text
    line = text.split('"')[1].replace("X", "C")
    assert extract_answer(line, language) == "C"


# ---------------------------------------------------------------------------------------------------------------
# extraction and scoring


@pytest.mark.parametrize("response, expected", [
    ("Answer: B", "B"),
    ("First I thought Answer: A, but no.\nAnswer: C", "C"),     # the last label wins, not the first
    ("Answer: A\nAnswer: D", "D"),
    ("**Answer: B**", "B"),
    ("**Answer:** B", "B"),
    ("__Answer__: B", "B"),                                      # "_" is markdown, not part of a word
    ("Answer: **B**", "B"),
    ("Answer: (B)", "B"),
    ("Answer: [B]", "B"),
    ("Answer: \\boxed{B}", "B"),
    ("Answer: $\\boxed{B}$", "B"),
    ("Answer: $\\text{B}$", "B"),
    ("Answer: \\(B\\)", "B"),
    ("Answer - B", "B"),
    ("Answer — B", "B"),
    ("answer: b", "B"),                                          # case ignored in label and letter
    ("ANSWER: d.", "D"),
    ("Answer:\nB", "B"),
    ("Answer: B because 4 is even", "B"),
    ("Answerable: A", None),                                     # the label must be a whole word ...
    ("reanswer: C", None),                                       # ... on both sides
    ("Answer: Because 2 + 2 = 4", None),                         # the letter must be a whole word
    ("Answer: a cell wall", None),                               # a lowercase "a" before a word is the article
    ("Answer: Dog", None),
    ("The answer is B", None),                                   # no separator, no answer line
    ("B", None),
    ("", None),
])
def test_extract_answer_english(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response, expected", [
    ("Ìdáhùn: C", "C"),
    ("Idahun: C", "C"),                                          # without diacritics
    ("ÌDÁHÙN: c", "C"),
    ("I\u0300da\u0301hu\u0300n: D", "D"),                        # decomposed diacritics (NFD) as some tokenizers emit
    ("Idáhùn - **A**", "A"),                                     # partly accented
    ("Ìdáhùn: A ... Answer: B", "B"),                            # English accepted too; still the last wins
    ("Ìdáhùnkan: A", None),
])
def test_extract_answer_yoruba(response, expected):
    # catches: Yoruba labels not read, diacritics compared exactly, English fallback missing
    assert extract_answer(response, "yo") == expected


def test_labels_are_per_language_and_extendable(monkeypatch):
    # catches: one global label list (Yoruba labels answering English items) and labels fixed at import time,
    # which would ignore the world helper's addition for its second language
    assert extract_answer("Ìdáhùn: C", "en") is None
    monkeypatch.setitem(mcqa.ANSWER_LABELS, "l2", ["Zorp"])
    assert extract_answer("zorp: B", "l2") == "B"
    assert extract_answer("Answer: A", "l2") == "A"


def test_score_and_no_answer_rate():
    # catches: a missing answer scored as anything but 0, the item's language ignored, the rate's denominator
    yo_item = {**ITEM, "language": "yo"}
    assert mcqa.score(ITEM, "Answer: B") == 1.0
    assert mcqa.score(ITEM, "Answer: C") == 0.0
    assert mcqa.score(ITEM, "I am not sure.") == 0.0
    assert mcqa.score(yo_item, "Ìdáhùn: B") == 1.0
    assert mcqa.no_answer_rate(["Answer: B", "hmm", "Answer: Because"]) == 2 / 3
    assert mcqa.no_answer_rate([]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# degeneration


def test_is_degenerate():
    # catches: a loop missed when the length limit cut its last word, a period longer than 1 missed, loops
    # flagged where the text recovers, and ordinary prose flagged
    assert is_degenerate("Ìbéèrè yìí ṣòro. " + "ṣe " * 30)
    assert is_degenerate("Ìbéèrè yìí ṣòro. " + "ṣe " * 30 + "ṣ")           # cut mid-word by the limit
    assert is_degenerate("So " + "the answer is " * 10)                      # period 3
    assert not is_degenerate("So " + "the answer is " * 10, n=2)
    assert not is_degenerate("ṣe " * 30 + "Ìdáhùn: B")                      # it recovered and answered
    assert not is_degenerate("ṣe " * 3 + "Ìdáhùn " + "ṣe " * 4)              # the whole tail must loop
    assert not is_degenerate("ṣe " * 7)                                       # fewer than min_repeats
    assert is_degenerate("ṣe " * 7, min_repeats=7)
    prose = "Two plus two is four, so the answer is the second option. It is even, and it is small. Answer: B"
    assert not is_degenerate(prose)
    assert not is_degenerate("")
    assert mcqa.degenerate_rate(["ṣe " * 30, prose]) == 0.5
