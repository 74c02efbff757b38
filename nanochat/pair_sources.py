"""
Preference-pair sources: the public datasets in their hub schemas (Anthropic/hh-rlhf, HuggingFaceH4's
ultrafeedback_binarized and stack-exchange-preferences) and the synthetic world, each turned into rows of the one
format nanochat/pairs.py defines, then written to the train and held-out files. Its own module because only
scripts/kat_download_pairs.py talks to the hub; every later stage reads the files through nanochat/pairs.py.

Sources (`*_stream` functions) read a hub id or a local copy of the hub repository (`--from_dir`) by one code path,
streaming, nothing cached: uf and SE through `datasets.load_dataset` (SE, about 20 GB, is read only as far as the
cap), hh's gzipped jsonl line by line through fsspec (`hf://` or a local path), so that a line that is not UTF-8
or not JSON is one counted skip with its line number instead of the end of the whole source. A local hh copy may
lack some subsets: those present are read, `hh_missing` names the others. Each stream yields (where, pair) or
(where, SkipRow); `write_pairs` checks every pair with nanochat.pairs.check_pair, drops duplicates, routes it to
the train or test file, and counts everything it skips, by source and reason, with the first few places (file and
line, or row) of each reason, and the kept pairs by whether the chosen reply is the shorter (`shorter_wins`).

Held-out rule: the official test splits (hh `test`, uf `test_prefs`) go to the test file, and so does a seeded
hash share of the prompts of the sources without one (SE, synthetic). A training pair whose conversation is in the
test file is dropped (`prompt_in_test`), so no prompt is in both files.
"""

import hashlib
import itertools
import os
import random
import re
from collections import namedtuple
from html.parser import HTMLParser

from nanochat.data import hf_endpoint, hf_offline, host_unreachable
from nanochat.pairs import SkipLog, check_pair, encode_row, jsonl_lines, length_order, shorter_wins
from nanochat.synthetic import conversation_id, make_world, pair_id

HH_ID = "Anthropic/hh-rlhf"
UF_ID = "HuggingFaceH4/ultrafeedback_binarized"
SE_ID = "HuggingFaceH4/stack-exchange-preferences"
# red-team-attempts is left out: its files hold rated transcripts, not pairs (so a copy without it lacks nothing)
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
# explicit, because the repo root also holds stack_exchanges.json, which the default "**" pattern would pick up
SE_FILES = "data/**/*.parquet"

SRC_NAMES = {"hh": "hh-rlhf", "uf": "ultrafeedback-binarized", "se": "stack-exchange-preferences",
             "synthetic": "synthetic"}
HUB_IDS = {"hh": HH_ID, "uf": UF_ID, "se": SE_ID}


# -----------------------------------------------------------------------------
# skipped rows and broken sources

class SkipRow(Exception):
    """A source row (or `count` pairs of it) left out, and why. Converters raise it; streams yield it."""

    def __init__(self, reason, detail="", count=1):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.count = reason, detail, count


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing files, a broken download, a file of another schema)."""


# -----------------------------------------------------------------------------
# building rows

def make_pair(src, messages, chosen, rejected, **extras):
    """A row of the pairs format (nanochat/pairs.py); SkipRow when its text cannot be hashed."""
    try:
        ids = pair_id(src, messages, chosen, rejected), conversation_id(messages)
    except UnicodeEncodeError:  # a lone surrogate: hashing encodes all the text as UTF-8, and so will the file
        raise SkipRow("invalid_utf8", "a lone surrogate in the text") from None
    prompt = messages[-1]["content"] if messages else ""
    return {"id": ids[0], "prompt": prompt, "messages": messages, "chosen": chosen, "rejected": rejected, "src": src,
            "prompt_id": ids[1], **extras}


def is_heldout(prompt_id, seed, share):
    """Seeded, per-conversation coin: every pair of one conversation lands on the same side."""
    h = int(hashlib.sha256(f"heldout-{seed}-{prompt_id}".encode()).hexdigest()[:15], 16)
    return h < share * 16 ** 15


# -----------------------------------------------------------------------------
# Anthropic/hh-rlhf

_HH_MARK = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text):
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [{"role", "content"}], stripped. Raises SkipRow if malformed."""
    pieces = _HH_MARK.split(text)
    if pieces[0].strip():
        raise SkipRow("bad_transcript", "text before the first 'Human:' turn")
    turns = [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]
    for i, turn in enumerate(turns):
        if turn["role"] != ("user", "assistant")[i % 2]:
            raise SkipRow("bad_transcript", f"turn {i} is {turn['role']}: Human and Assistant must alternate")
    if not turns or turns[-1]["role"] != "assistant":
        raise SkipRow("bad_transcript", "does not end on an Assistant turn")
    return turns


def hh_pair(row, subset):
    """One hh-rlhf row -> a pair: the shared turns are the conversation, the two final replies chosen/rejected."""
    for name in ("chosen", "rejected"):
        if not isinstance(row.get(name), str):
            raise SkipRow("missing_field" if row.get(name) is None else "not_a_string", f"field '{name}'")
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("prefix_mismatch", "chosen and rejected differ before their final replies")
    return make_pair(SRC_NAMES["hh"], chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], subset=subset)


def _round_robin(iterators):
    """One item from each in turn, so a cap samples every subset instead of the first one only."""
    iterators = list(iterators)
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def _hh_file(subset, split):
    return f"{subset}/{split}.jsonl.gz"


def hh_missing(location):
    """The subset files ("helpful-online/test.jsonl.gz", ...) a local copy lacks; [] for the hub, which has all."""
    if not os.path.isdir(location):
        return []
    return [_hh_file(subset, split) for subset in HH_SUBSETS for split in ("train", "test")
            if not os.path.isfile(os.path.join(location, _hh_file(subset, split)))]


def hh_rows(location, path):
    """
    (where, row dict or SkipRow) per non-blank line of one gzipped jsonl of the hub repo or of a local copy of it.
    Read line by line, not through datasets' json loader, which gives up on the whole file at its first bad line.
    """
    import fsspec  # ships with datasets; hf:// streams from the hub like datasets does

    url = os.path.join(location, path) if os.path.isdir(location) else f"hf://datasets/{location}/{path}"
    with fsspec.open(url, "rb", compression="gzip") as f:
        for where, _, row, problem in jsonl_lines(f, f"{location}/{path}"):
            if problem is not None:
                yield where, SkipRow(*problem)
            else:
                yield where, row if isinstance(row, dict) else SkipRow("not_an_object", f"a JSON {type(row).__name__}")


def hh_stream(location, split):
    """(where, pair or SkipRow) for hh split 'train' or 'test', the subsets present (see hh_missing) interleaved."""
    missing = set(hh_missing(location))

    def pairs_of(subset):
        for where, row in hh_rows(location, _hh_file(subset, split)):
            if not isinstance(row, SkipRow):
                try:
                    row = hh_pair(row, subset)
                except SkipRow as skip:
                    row = skip
            yield where, row

    yield from _round_robin(pairs_of(s) for s in HH_SUBSETS if _hh_file(s, split) not in missing)


# -----------------------------------------------------------------------------
# HuggingFaceH4/ultrafeedback_binarized

def _uf_messages(value, name):
    if not isinstance(value, list) or not value:
        raise SkipRow("bad_messages", f"field '{name}' is not a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise SkipRow("bad_messages", f"field '{name}[{i}]' needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"].strip()})
    if out[-1]["role"] != "assistant":
        raise SkipRow("bad_messages", f"field '{name}' does not end on an assistant message")
    return out


def uf_pair(row):
    """One ultrafeedback_binarized row -> a pair; ties (and a chosen scored lower) are skipped."""
    chosen, rejected = _uf_messages(row.get("chosen"), "chosen"), _uf_messages(row.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("prefix_mismatch", "chosen and rejected differ before their final replies")
    scores = row.get("score_chosen"), row.get("score_rejected")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise SkipRow("bad_score", f"score_chosen={scores[0]!r}, score_rejected={scores[1]!r}")
    if scores[0] == scores[1]:
        raise SkipRow("tie", f"both scored {scores[0]}")
    if scores[0] < scores[1]:
        raise SkipRow("chosen_scored_lower", f"score_chosen={scores[0]} < score_rejected={scores[1]}")
    return make_pair(SRC_NAMES["uf"], chosen[:-1], chosen[-1]["content"], rejected[-1]["content"],
                     score_chosen=float(scores[0]), score_rejected=float(scores[1]))


def uf_stream(location, split):
    """(where, pair or SkipRow) for split 'train_prefs' or 'test_prefs' (the README's metadata maps the files)."""
    import datasets
    ds = datasets.load_dataset(location, split=split, streaming=True)
    for n, row in enumerate(ds):
        where = f"{location} [{split}] row {n}"
        try:
            yield where, uf_pair(row)
        except SkipRow as skip:
            yield where, skip


# -----------------------------------------------------------------------------
# HuggingFaceH4/stack-exchange-preferences

_BLOCK_TAGS = {"p", "div", "blockquote", "ul", "ol", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
               "dl", "dd", "dt"}


class _HTMLText(HTMLParser):
    """
    Readable text from SE's post HTML: paragraphs, list markers, fenced code blocks, `inline code`, table cells
    split by " | ". Images are dropped: their alt text on SE is mostly "enter image description here".
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.pending, self.pre, self.lists = [], 0, 0, []
        self.pre_start = False  # HTML drops a newline right after <pre>
        self.fresh_item = False  # a list marker with nothing after it yet: <li><p> must not break the line

    def _at_line_start(self):
        return not self.parts or self.pending or self.parts[-1].endswith("\n")

    def _write(self, text):
        if self.pending and self.parts:
            self.parts[-1] = self.parts[-1].rstrip(" ")
            self.parts.append("\n" * self.pending)
        self.pending = 0
        self.parts.append(text)

    def _break(self, n):
        self.pending = max(self.pending, n)

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self._break(2)
            self._write("```\n")
            self.pre += 1
            self.pre_start = True
        elif tag == "code" and not self.pre:
            self._write("`")
        elif tag == "br":
            self._break(1)
        elif tag in ("ul", "ol"):
            self.lists.append(0 if tag == "ol" else None)
            self._break(2 if len(self.lists) == 1 else 1)
        elif tag == "li":
            self._break(1)
            depth = "  " * max(len(self.lists) - 1, 0)
            if self.lists and self.lists[-1] is not None:
                self.lists[-1] += 1
                self._write(f"{depth}{self.lists[-1]}. ")
            else:
                self._write(f"{depth}- ")
            self.fresh_item = True
        elif tag in ("td", "th") and not self._at_line_start():
            self._write(" | ")
        elif tag in _BLOCK_TAGS and not self.fresh_item:
            self._break(2)

    def handle_endtag(self, tag):
        if tag == "pre" and self.pre:
            self.pre -= 1
            self._write("```" if self.parts[-1].endswith("\n") else "\n```")
            self._break(2)
        elif tag == "code" and not self.pre:
            self._write("`")
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
            self._break(2 if not self.lists else 1)
        elif tag in _BLOCK_TAGS:
            self._break(2)

    def handle_data(self, data):
        if self.pre:
            if self.pre_start and data.startswith("\n"):
                data = data[1:]
            self.pre_start = False
            if data:
                self._write(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._at_line_start() or (self.parts and self.parts[-1].endswith(" ")):
            text = text.lstrip(" ")
        if text:
            self._write(text)
            self.fresh_item = False


def html_to_text(html):
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts).strip()


def se_pairs(row, min_gap, max_pairs):
    """
    One SE question -> (pairs, number of eligible pairs left out by max_pairs). Two answers pair when their
    pm_scores differ by at least min_gap, the higher one chosen; the widest gaps are taken first (ties broken by
    answer order), as the clearest preferences. Raises SkipRow when the question yields no pair.
    """
    question = row.get("question")
    if not isinstance(question, str):
        raise SkipRow("missing_field" if question is None else "not_a_string", "field 'question'")
    answers = []
    for i, a in enumerate(row.get("answers") or []):
        if not (isinstance(a, dict) and isinstance(a.get("text"), str) and isinstance(a.get("pm_score"), int)):
            raise SkipRow("bad_answer", f"field 'answers[{i}]' needs a string 'text' and an int 'pm_score'")
        answers.append((a["pm_score"], i, a["text"]))
    answers.sort(key=lambda a: (-a[0], a[1]))
    candidates = sorted(((hi[0] - lo[0], hi, lo) for hi, lo in itertools.combinations(answers, 2)
                         if hi[0] - lo[0] >= min_gap), key=lambda c: (-c[0], c[1][1], c[2][1]))
    if not candidates:
        raise SkipRow("question_no_pair", f"{len(answers)} answers, no two with a score gap >= {min_gap}")
    prompt = html_to_text(question)
    messages = [{"role": "user", "content": prompt}]
    texts = {}  # answers are converted once, and only when used

    def text(answer):
        if answer[1] not in texts:
            texts[answer[1]] = html_to_text(answer[2])
        return texts[answer[1]]

    pairs = [make_pair(SRC_NAMES["se"], messages, text(hi), text(lo), qid=row.get("qid"), score_chosen=hi[0],
                       score_rejected=lo[0]) for _, hi, lo in candidates[:max_pairs]]
    return pairs, max(len(candidates) - max_pairs, 0)


def se_stream(location, seed, min_gap, max_pairs, per_file):
    """
    (where, pair or SkipRow) from the SE parquet files, visited in a seeded random order and at most per_file pairs
    from each: the files are whole sites (or slices of big ones) sorted by name, so reading them in order up to
    a cap would give a handful of alphabetically-first sites.
    """
    import datasets
    ds = datasets.load_dataset(location, data_files={"train": SE_FILES}, split="train", streaming=True)
    order = list(range(ds.n_shards))
    random.Random(f"se-files-{seed}").shuffle(order)
    for shard in order:
        taken = 0
        for n, row in enumerate(ds.shard(num_shards=ds.n_shards, index=shard)):
            if taken >= per_file:
                break
            where = f"{location} file {shard} row {n} (qid {row.get('qid')})"
            try:
                pairs, over_cap = se_pairs(row, min_gap, max_pairs)
            except SkipRow as skip:
                yield where, skip
                continue
            for pair in pairs:
                yield where, pair
            taken += len(pairs)
            if over_cap:
                yield where, SkipRow("over_question_cap", f"max {max_pairs} pairs per question", over_cap)


# -----------------------------------------------------------------------------
# the synthetic world

def synthetic_stream(seed, size, n):
    for i, row in enumerate(make_world(seed=seed, size=size).preference_pairs(n, seed=seed)):
        yield f"synthetic(seed={seed}, size={size}) pair {i}", row


# -----------------------------------------------------------------------------
# writing the train and test files

# route: "test" (an official test split), "train" (an official train split) or "hashed" (split by is_heldout)
Stream = namedtuple("Stream", "src route cap items")
_ROUTE_ORDER = {"test": 0, "hashed": 1, "train": 2}


def write_pairs(streams, train_file, test_file, seed, test_share):
    """
    Read the streams and write each kept pair as a JSON line to the binary files train_file or test_file.
    A stream stops after `cap` kept pairs (None: no cap). Returns {src: {"train": n, "test": n, "skips": SkipLog,
    "chosen_shorter": n, "chosen_longer": n, "length_ties": n}}, the last three counting kept pairs by which reply
    has fewer characters (pairs.length_order, pairs.shorter_wins).

    Streams run test splits first, then hashed ones, then train splits: when a training pair is judged, every
    conversation of the test file is already known (a hashed stream sends all pairs of one conversation the same
    way, so it cannot put a conversation in both files either).
    """
    seen_ids, test_prompts, stats = set(), set(), {}
    for stream in sorted(streams, key=lambda s: _ROUTE_ORDER[s.route]):
        st = stats.setdefault(stream.src, {"train": 0, "test": 0, "skips": SkipLog(), "chosen_shorter": 0,
                                           "chosen_longer": 0, "length_ties": 0})
        kept, items = 0, iter(stream.items)
        while stream.cap is None or kept < stream.cap:
            try:
                where, item = next(items)
            except StopIteration:
                break
            except Exception as e:  # datasets raises many kinds (connection, missing file, arrow casts)
                raise SourceError(f"reading {stream.src} ({stream.route}) failed after {kept} kept pairs: "
                                  f"{type(e).__name__}: {e}") from e
            if isinstance(item, SkipRow):
                st["skips"].add(item.reason, where, item.detail, item.count)
                continue
            problem = check_pair(item)
            if problem is None and item["id"] in seen_ids:
                problem = "duplicate_pair", f"id {item['id']} seen before"
            to_test = stream.route == "test" or (stream.route == "hashed" and
                                                 is_heldout(item["prompt_id"], seed, test_share))
            if problem is None and not to_test and item["prompt_id"] in test_prompts:
                problem = "prompt_in_test", f"conversation {item['prompt_id']} is in the test file"
            if problem is not None:
                st["skips"].add(problem[0], where, problem[1])
                continue
            seen_ids.add(item["id"])
            if to_test:
                test_prompts.add(item["prompt_id"])
            (test_file if to_test else train_file).write(encode_row(item))
            st["test" if to_test else "train"] += 1
            st[length_order(item)] += 1
            kept += 1
    return stats


def source_table(stats):
    """The per-source table of kept and skipped rows, as printed and put in the report."""
    lines = ["| source | train | test | skipped | reasons | chosen shorter (length ties) |",
             "|---|---:|---:|---:|---|---:|"]
    for src, st in stats.items():
        share = shorter_wins(st)
        shorter = "-" if share is None else f"{share:.1%}"
        lines.append(f"| {src} | {st['train']} | {st['test']} | {st['skips'].total()} | {st['skips'].summary()} | "
                     f"{shorter} ({st['length_ties']}) |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the hub itself

def hub_unreachable(timeout=4.0):
    """None when the hub answers, else why not (offline mode set, or the connection failed)."""
    return hf_offline() or host_unreachable(hf_endpoint(), timeout)
