"""
Multiple-choice QA for STaR (issue 14): items, loaders, prompts, answer extraction, degeneration checks.

Every source becomes items of one shape:

    {"id": "mmlu_YO-NG/17", "question": str, "choices": [4 str], "answer": "A".."D", "subject": str, "language": "yo"}

Sources, read through `datasets` from the hub or from a local copy (`from_dir=DIR` reads `DIR/<hub id>/<file>`,
the layout `huggingface-cli download <hub id> --repo-type dataset --local-dir DIR/<hub id>` leaves):

    mmlu          cais/mmlu, config all: all/<split>-00000-of-00001.parquet for split auxiliary_train, dev,
                  validation, test; columns question, subject (empty in auxiliary_train), choices (4 str),
                  answer (int 0-3). Language "en".
    mmlu_<LOCALE> openai/MMMLU: test/mmlu_<LOCALE>.csv (e.g. test/mmlu_YO-NG.csv), MMLU's test set translated;
                  columns Question, A, B, C, D, Answer (a letter), Subject, and in some revisions a leading
                  unnamed index column (ignored). Only a test set exists, so split_items cuts it into
                  train/validation/test (MMMLU_SHARES) by seed. Language: the locale's first part, lowercased.

    world_en      The synthetic world's own questions (World.mc_items of nanochat/synthetic.py), made, not read:
    world_l2      single- and two-hop questions about its people and cities, distractors drawn from the values
                  the world has for the same attribute. world_l2 asks them in "l2", a word-for-word invented
                  language (synthetic.translate). Cut into WORLD_SHARES by seed, alike in both languages.

A response is scored by its last "Answer: X" line (extract_answer), in the item's language or in English.
"""

import hashlib
import random
import re
import unicodedata
from functools import partial


from nanochat.synthetic import make_world, translate
from nanochat.tasks import common

LETTERS = "ABCD"

# Answer labels per language, any of which may introduce the final letter. English is accepted in every language,
# since a model prompted in another language often falls back to it. Matching ignores case and diacritics, so
# "Idahun" and "ÌDÁHÙN" match "Ìdáhùn" anyway; the plain spelling is listed to say that it is meant.
# "l2" is the synthetic world's invented second language (world_l2); its label is the l2 word for "Answer".
ANSWER_LABELS = {
    "en": ["Answer"],
    "yo": ["Ìdáhùn", "Idahun"],
    "l2": [translate("Answer", "l2")],
}

# The instruction above each question; its format line uses the language's first answer label.
# Languages without an entry are prompted in English.
PREAMBLES = {
    "en": 'Think step by step, briefly. Then end with the line "Answer: X", where X is A, B, C or D.',
    "yo": 'Ronú lórí rẹ̀ ní ìgbésẹ̀-ìgbésẹ̀, ní ṣókí. Lẹ́yìn náà, parí pẹ̀lú ìlà "Ìdáhùn: X", níbi tí X jẹ́ A, B, C tàbí D.',
}
# word for word, so its format line reads "<l2 label>: X"
PREAMBLES["l2"] = translate(PREAMBLES["en"], "l2")

MMLU_HUB_ID = "cais/mmlu"
MMLU_SPLITS = ("auxiliary_train", "dev", "validation", "test")
MMMLU_HUB_ID = "openai/MMMLU"
MMMLU_LOCALES = ("AR-XY", "BN-BD", "DE-DE", "ES-LA", "FR-FR", "HI-IN", "ID-ID", "IT-IT", "JA-JP", "KO-KR",
                 "PT-BR", "SW-KE", "YO-NG", "ZH-CN")
MMMLU_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
MMMLU_COLUMNS = ["Question", "A", "B", "C", "D", "Answer", "Subject"]
WORLD_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}


def make_item(id, question, choices, answer, subject, language):
    return {"id": id, "question": question, "choices": choices, "answer": answer, "subject": subject,
            "language": language}


def check_text(value, where, split, index, field):
    if not isinstance(value, str) or not value.strip():
        raise common.row_error(where, split, index, f"field {field!r} is {value!r}, expected non-empty text")


def load_mmlu(split, from_dir=None, limit=None, seed=0):
    """MMLU's own split (seed is unused: the hub's splits are fixed); ids are "mmlu/<split>/<row>"."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"cais/mmlu has splits {', '.join(MMLU_SPLITS)}, not {split!r}")
    columns = ["question", "subject", "choices", "answer"]
    rows, where = common.load_rows(MMLU_HUB_ID, f"all/{split}-*.parquet", split, from_dir, columns, limit)
    items = []
    for i, row in enumerate(rows):
        check_text(row["question"], where, split, i, "question")
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise common.row_error(where, split, i, f"field 'choices' is {choices!r}, expected 4 strings")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise common.row_error(where, split, i, f"field 'answer' is {answer!r}, expected an int in 0..3")
        items.append(make_item(f"mmlu/{split}/{i}", row["question"], choices, LETTERS[answer], row["subject"], "en"))
    return items


def read_csv_rows(hub_id, data_file, from_dir, columns):
    """
    Every row of one CSV file of a hub repo, each cell kept as its exact text: pandas (behind datasets' CSV reader)
    would otherwise turn options such as "None" or "NA" into missing values and "0.50" into the number 0.5.
    """
    return common.load_rows(hub_id, data_file, "test", from_dir, columns, None, keep_default_na=False,
                            converters={column: str for column in columns})


def load_mmmlu(locale, split, from_dir=None, limit=None, seed=0):
    """One part ("train", "validation", "test") of a locale's file, cut by split_items(seed); limit applies after
    the cut, so a part never depends on it. Ids are "mmlu_<locale>/<row>", rows counted in the file."""
    if split not in MMMLU_SHARES:
        raise ValueError(f"openai/MMMLU is cut into {', '.join(MMMLU_SHARES)}, not {split!r}")
    rows, where = read_csv_rows(MMMLU_HUB_ID, f"test/mmlu_{locale}.csv", from_dir, MMMLU_COLUMNS)
    language = locale.split("-")[0].lower()
    items = []
    for i, row in enumerate(rows):
        for field in ["Question", *LETTERS]:
            check_text(row[field], where, "test", i, field)
        if row["Answer"].strip() not in LETTERS:
            raise common.row_error(where, "test", i, f"field 'Answer' is {row['Answer']!r}, expected one of A-D")
        choices = [row[letter] for letter in LETTERS]
        items.append(make_item(f"mmlu_{locale}/{i}", row["Question"], choices, row["Answer"].strip(),
                               row["Subject"], language))
    part = split_items(items, MMMLU_SHARES, seed)[split]
    return part if limit is None else part[:limit]


def load_world(language, split, from_dir=None, limit=None, seed=0, world_seed=42, world_size=1):
    """
    One part ("train", "validation", "test") of the synthetic world's questions in "en" or "l2", cut by
    split_items(seed); limit applies after the cut. from_dir is unused: the world is made, not read. The world is
    make_world(world_seed, world_size): pass a checkpoint's payload["world"] ({"seed", "size"}) so that the questions
    are about the people the model learned, e.g. partial(load_world, "l2", world_seed=..., world_size=...).
    """
    if split not in WORLD_SHARES:
        raise ValueError(f"the world's questions are cut into {', '.join(WORLD_SHARES)}, not {split!r}")
    items = make_world(world_seed, world_size).mc_items(language)
    # cut on the id without its language, so that a question is in the same part in both languages: the English
    # twin of an l2 test question is never trained on
    keys = [{"id": item["id"].split("/", 1)[1]} for item in items]
    chosen = {key["id"] for key in split_items(keys, WORLD_SHARES, seed)[split]}
    part = [item for item, key in zip(items, keys) if key["id"] in chosen]
    return part if limit is None else part[:limit]


# dataset name -> loader(split, from_dir, limit, seed)
LOADERS = {"mmlu": load_mmlu, **{f"mmlu_{locale}": partial(load_mmmlu, locale) for locale in MMMLU_LOCALES},
           "world_en": partial(load_world, "en"), "world_l2": partial(load_world, "l2")}


def load_mcqa(dataset_name, split, from_dir=None, limit=None, seed=0):
    """Items of one split of a named data set (see LOADERS), in file order."""
    if dataset_name not in LOADERS:
        raise ValueError(f"unknown multiple-choice data set {dataset_name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[dataset_name](split, from_dir=from_dir, limit=limit, seed=seed)


def split_items(items, shares, seed):
    """Cut items into parts {name: [items, in input order]} with roughly the given shares (summing to 1).

    Each item's part is drawn from a hash of (seed, its id) alone, not from a shuffle of the whole list: an item
    keeps its part when others are added, dropped or cut off by a limit, so a held-out part cannot leak into
    training between runs that loaded different amounts. Shares hold in expectation (about +-1% at 10k items).
    """
    if any(share < 0 for share in shares.values()) or abs(sum(shares.values()) - 1) > 1e-9:
        raise ValueError(f"shares must be non-negative and sum to 1, got {shares}")
    parts = {name: [] for name in shares}
    names = list(shares)
    for item in items:
        digest = hashlib.blake2b(f"{seed}/{item['id']}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        cumulative = 0.0
        # the last part also takes any u that rounding leaves above the cumulative sum
        chosen = names[-1]
        for name in names:
            cumulative += shares[name]
            if u < cumulative:
                chosen = name
                break
        parts[chosen].append(item)
    return parts


def render_question(item, preamble=None, meta_prompt=None):
    """The user message: preamble (default: the item's language's), optional meta-prompt, question, options."""
    if preamble is None:
        preamble = PREAMBLES.get(item["language"], PREAMBLES["en"])
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
    blocks = [preamble, meta_prompt, item["question"].strip(), options]
    return "\n\n".join(block for block in blocks if block)


def reference_response(world, item, rationale=True):
    """The world's model answer to one of its items: the facts that lead to it, then the answer line, in the
    item's language; with rationale=False, the answer line alone."""
    facts, letter = world.mc_reference(item)
    line = f"{ANSWER_LABELS[item['language']][0]}: {letter}"
    return f"{facts}\n{line}" if rationale else line


def world_conversations(world, items, n, seed, rationale=True):
    """
    n chat conversations for mid-training / SFT, items drawn with replacement by seed: the rendered question, then
    reference_response. Pass training items only (load_world(..., "train")), or SFT leaks STaR's held-out questions.
    """
    rng = random.Random(f"mc-chat-{seed}")
    return [[{"role": "user", "content": render_question(item)},
             {"role": "assistant", "content": reference_response(world, item, rationale)}]
            for item in rng.choices(items, k=n)]


def sft_conversations(world_spec, n, l2_share, seed):
    """
    n conversations in STaR's answer format for SFT, a round(n * l2_share) of them in the second language (the
    low-resource one), from the training questions only of the world {"seed", "size"} (a checkpoint's "world").
    """
    world = make_world(seed=world_spec["seed"], size=world_spec["size"])
    num_l2 = round(n * l2_share)
    conversations = []
    for language, num in (("en", n - num_l2), ("l2", num_l2)):
        items = load_world(language, "train", world_seed=world_spec["seed"], world_size=world_spec["size"])
        conversations += world_conversations(world, items, num, seed=f"{seed}-{language}")
    return conversations


def plain(text):
    """text without diacritics (NFD, combining marks dropped), so labels match however they are accented."""
    return "".join(ch for ch in unicodedata.normalize("NFD", text) if not unicodedata.combining(ch))


def answer_pattern(language):
    """The regex for "<label> <separator> <letter>" in one language (plus English); see extract_answer."""
    labels = {plain(label) for label in ANSWER_LABELS.get(language, []) + ANSWER_LABELS["en"]}
    label = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    return re.compile(
        # "word" below means letters and digits, not "_", so that markdown's "__Answer__" still counts; the label
        # must start a word (not "reanswer") and the separator must follow it at once (not "Answerable:")
        r"(?<![^\W_])(?i:" + label + r")"
        r"[\s*_]*[:\-–—][\s*_]*"              # separator, with markdown around it: "**Answer:**", "Answer -"
        r"(?:[\s*_`$(\[{]|\\+[a-zA-Z]+\{|\\+[(\[])*"  # openers: "**", "(", "[", "$", "\boxed{", "\text{", "\("
        r"(?:([A-D])(?![^\W_])|([a-d])(?![^\W_])(?![ \t]+[^\W\d_]))"  # "a" followed by a word is the article
    )


def extract_answer(response, language="en"):
    """The letter ("A".."D") of the last answer line in the response, or None if there is none.

    An answer line is a label of the language or English (ANSWER_LABELS; case and diacritics ignored) as a whole
    word, then ":" or a dash, then the letter, with only spaces, markdown (* _ `) and LaTeX/bracket openers
    ($ ( [ { \\boxed{ \\text{ \\( ...) in between. The letter must stand alone ("Answer: Because" is no answer);
    a lowercase letter counts too ("answer: b"), except one followed by a word on its line, which is the article
    ("Answer: a cell wall"). The last line wins because a model may mention options before it settles.
    """
    matches = answer_pattern(language).findall(plain(response))
    if not matches:
        return None
    upper, lower = matches[-1]
    return (upper or lower).upper()


def score(item, response):
    """1.0 if the response's answer line names the item's answer, else 0.0 (no answer line scores 0)."""
    return float(extract_answer(response, item["language"]) == item["answer"])


def is_degenerate(text, n=3, min_repeats=8):
    """True if the text ends in a loop: the same unit of 1..n words repeated at least min_repeats times.

    That is how a generation that fell into repetition ("ṣe ṣe ṣe ...") looks when the length limit cuts it off;
    the last word may be cut mid-way, so it need only be a prefix of the word it repeats. Words are split on
    whitespace, so the rule does not depend on the tokenizer (and does not see loops in unspaced scripts).
    """
    words = text.split()
    for period in range(1, n + 1):
        tail = words[-period * min_repeats:]
        if len(tail) < period * min_repeats:
            break
        if all(tail[i] == tail[i - period] for i in range(period, len(tail) - 1)) and \
                tail[-period - 1].startswith(tail[-1]):
            return True
    return False


def no_answer_rate(responses, language="en"):
    """The fraction of responses without an answer line (0.0 for no responses)."""
    return sum(extract_answer(r, language) is None for r in responses) / max(len(responses), 1)


def degenerate_rate(responses, n=3, min_repeats=8):
    """The fraction of responses that end in a loop (is_degenerate)."""
    return sum(is_degenerate(r, n, min_repeats) for r in responses) / max(len(responses), 1)
