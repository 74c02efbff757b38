"""
Preference-pair files: the one row format, the check every reader and writer applies, reading pairs_all.jsonl /
pairs_test.jsonl, and extracting the deduplicated prompts the later stages sample from. The hub adapters that
write these files are nanochat/pair_sources.py.

One row per pair (one JSON object per line of pairs_all.jsonl / pairs_test.jsonl):

    id         pair_id(src, messages, chosen, rejected): a hash of the source and the exact content
    prompt     the final user message (== messages[-1]["content"])
    messages   the whole conversation before the reply: [{"role", "content"}], optional system message first, then
               user and assistant alternating, ending on a user turn
    chosen     the preferred reply;  rejected  the other one (non-empty, and different from chosen)
    src        hh-rlhf | ultrafeedback-binarized | stack-exchange-preferences | synthetic
    prompt_id  conversation_id(messages): a hash of the whole whitespace-normalised conversation
    extras     per source: hh `subset`; uf and se `score_chosen`/`score_rejected` (se also `qid`); synthetic
               `cluster`/`rejected_kind`

The hashes are the ones nanochat/synthetic.py defines, so ids agree across sources, runs and machines.

Readers of the files (`read_pairs`, `iter_pairs`) apply `check_pair`, the rule the writer applied, again, and
raise InputError for a missing file or one without a usable row, naming the path and the command that writes it.
Skipped lines are counted in a `SkipLog`, by reason, with the first few places of each reason.
"""

import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict

from nanochat.common import InputError
from nanochat.data import validate_messages
from nanochat.synthetic import conversation_id

REQUIRED_FIELDS = ("id", "prompt", "messages", "chosen", "rejected", "src", "prompt_id")
PAIRS_WRITER = "python -m scripts.kat_download_pairs"
PLACES_PER_REASON = 20  # skipped rows listed by place in the report, per reason; the rest are only counted


# -----------------------------------------------------------------------------
# skip accounting

class SkipLog:
    """Skipped rows counted by reason, with the first few places of each reason kept for the report."""

    def __init__(self, keep=PLACES_PER_REASON):
        self.counts = Counter()
        self.places = defaultdict(list)
        self.keep = keep

    def add(self, reason, where, detail="", count=1):
        self.counts[reason] += count
        if len(self.places[reason]) < self.keep:
            self.places[reason].append(f"{where}: {detail}" if detail else where)

    def total(self):
        return sum(self.counts.values())

    def summary(self):
        """'reason=n, ...', most frequent first; '-' when nothing was skipped."""
        return ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"

    def first(self):
        """The place of the first row skipped (the first of its reason's places), or None."""
        return next((places[0] for places in self.places.values() if places), None)

    def note(self, what):
        """'what: N lines skipped (reasons), first at <place>' for a log line; '' when nothing was skipped."""
        if not self.counts:
            return ""
        first = self.first()
        return f"{what}: {self.total()} lines skipped ({self.summary()})" + (f", first at {first}" if first else "")

    def markdown(self, title):
        if not self.counts:
            return ""
        lines = [f"#### {title}\n"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"- `{reason}`: {n}")
            lines += [f"  - {place}" for place in self.places[reason]]
            if len(self.places[reason]) < n:
                lines.append(f"  - ... and {n - len(self.places[reason])} more")
        return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the row format

def _norm_ws(text):
    return " ".join(text.split())


def check_pair(row):
    """None for a usable row, else (reason, detail). The one rule both stages apply, so neither trusts the other."""
    if not isinstance(row, dict):
        return "not_an_object", f"a JSON {type(row).__name__}"
    for name in REQUIRED_FIELDS:
        if name not in row:
            return "missing_field", f"field '{name}' missing"
        if name != "messages" and not isinstance(row[name], str):
            return "not_a_string", f"field '{name}' is a {type(row[name]).__name__}, not a string"
    messages = row["messages"]
    try:
        validate_messages(messages, "field 'messages'")
    except ValueError as e:
        return "bad_messages", str(e)
    if messages[-1]["role"] != "user":
        return "ends_on_assistant" if messages[-1]["role"] == "assistant" else "bad_messages", \
            f"field 'messages' ends on a {messages[-1]['role']} turn, not a user turn"
    if row["prompt"] != messages[-1]["content"]:
        return "prompt_mismatch", "field 'prompt' is not the final user message"
    if not row["prompt"].strip():
        return "empty_prompt", "the final user message is empty"
    if not row["chosen"].strip() or not row["rejected"].strip():
        return "empty_reply", f"field '{'chosen' if not row['chosen'].strip() else 'rejected'}' is empty"
    if _norm_ws(row["chosen"]) == _norm_ws(row["rejected"]):
        return "identical_replies", "fields 'chosen' and 'rejected' are the same text"
    if row["prompt_id"] != conversation_id(messages):
        return "prompt_id_mismatch", "field 'prompt_id' is not the hash of field 'messages'"
    return None


def encode_row(row):
    """One row as a line of a pairs file: UTF-8 JSON, non-ASCII kept as is."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


# -----------------------------------------------------------------------------
# reading pairs files and extracting prompts

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def jsonl_lines(f, name):
    """
    (where, line, row, problem) per non-blank line of a binary jsonl file object, where = "<name> line N": the
    parsed row and problem None, or row None and problem (reason, detail) for a line that is not UTF-8 or not JSON.
    """
    for lineno, raw in enumerate(f, 1):
        where = f"{name} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, None, None, ("invalid_utf8", f"byte {e.start} is not UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield where, line, json.loads(line), None
        except json.JSONDecodeError as e:
            yield where, line, None, ("invalid_json", f"{e.msg} (column {e.colno})")


def iter_pairs(path, log, what="pairs file"):
    """
    Yield the usable rows of a pairs jsonl in file order; each line left out goes into the SkipLog `log` as
    "<path> line N". Blank lines are ignored. A missing file raises InputError naming `what` (the file's role or
    flag, e.g. "--pairs_path"), the path and the command that writes it.
    """
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} not found; write it with {PAIRS_WRITER}")
    seen = set()
    with open(path, "rb") as f:
        for where, line, row, problem in jsonl_lines(f, path):
            # a lone "\ud800" escape is legal JSON, but no hash or file holds it
            if problem is None and _SURROGATE_ESCAPE.search(line):
                try:
                    encode_row(row)
                except UnicodeEncodeError:
                    problem = "invalid_utf8", "a lone surrogate escape"
            problem = problem or check_pair(row)
            if problem is None and row["id"] in seen:
                problem = "duplicate_pair", f"id {row['id']} seen before"
            if problem is not None:
                log.add(problem[0], where, problem[1])
                continue
            seen.add(row["id"])
            yield row


def no_pairs_error(path, log, what="pairs file"):
    """The InputError for a pairs file that gave no usable row: empty, or every line skipped (with the first ones)."""
    if not log.counts:
        return InputError(f"{what} {path} is empty; write it again with {PAIRS_WRITER}")
    firsts = "; ".join(places[0] for places in log.places.values() if places)
    return InputError(f"{what} {path} has no usable pair: {log.total()} lines skipped ({log.summary()}); first "
                      f"problems: {firsts}. Fix the file or write it again with {PAIRS_WRITER}")


def read_pairs(path, what="pairs file"):
    """
    (rows, SkipLog) of a pairs jsonl: iter_pairs for stages that want the rows in memory. Every stage reads its
    pairs here, so all share one rule: a missing or empty file, or one whose every line is skipped, raises
    InputError naming `what` and the path; skipped lines are the caller's to report (`log.note(path)`).
    """
    log = SkipLog()
    rows = list(iter_pairs(path, log, what))
    if not rows:
        raise no_pairs_error(path, log, what)
    return rows, log


def length_order(row):
    """Which reply of a pair row has fewer characters: "chosen_shorter", "chosen_longer" or "length_ties"."""
    gap = len(row["chosen"]) - len(row["rejected"])
    return "chosen_shorter" if gap < 0 else "chosen_longer" if gap > 0 else "length_ties"


def shorter_wins(*counts):
    """
    Share of pairs whose chosen reply is the shorter one (in characters), among pairs whose two replies differ in
    length, over one or more {length_order: count} mappings; None when every pair is a tie. Near 0.5 means a reward
    model cannot get ahead by preferring brevity (or length).
    """
    shorter = sum(c["chosen_shorter"] for c in counts)
    differ = shorter + sum(c["chosen_longer"] for c in counts)
    return shorter / differ if differ else None


def extract_prompts(rows):
    """
    (prompts, pairs per src) of an iterable of rows, which is read once and not kept. One prompt per distinct
    conversation (prompt_id hashes the whole normalised conversation, so the same first message followed by
    different turns gives two prompts), in order of first appearance; `src` and `messages` are those of its first
    pair, n_pairs counts all of them.
    """
    prompts, per_src = {}, Counter()
    for row in rows:
        per_src[row["src"]] += 1
        p = prompts.get(row["prompt_id"])
        if p is None:
            prompts[row["prompt_id"]] = {"id": row["prompt_id"], "prompt": row["prompt"], "messages": row["messages"],
                                         "src": row["src"], "n_pairs": 1}
        else:
            p["n_pairs"] += 1
    return list(prompts.values()), per_src


def heldout_sample(prompts, n, seed):
    """
    n of `prompts` (all when there are fewer) for a held-out evaluation: a seeded sample stratified by `src`, each
    source getting its share of n by largest remainder, in input order. pairs_test.jsonl is written source by
    source, so its first n lines would all come from one source.
    """
    if n >= len(prompts):
        return list(prompts)
    by_src = {}
    for i, p in enumerate(prompts):
        by_src.setdefault(p["src"], []).append(i)
    quotas = {src: n * len(ids) / len(prompts) for src, ids in by_src.items()}
    counts = {src: int(q) for src, q in quotas.items()}
    for src in sorted(quotas, key=lambda s: counts[s] - quotas[s])[:n - sum(counts.values())]:
        counts[src] += 1
    rng = random.Random(f"heldout-{seed}")
    chosen = sorted(i for src, ids in by_src.items() for i in rng.sample(ids, counts[src]))
    return [prompts[i] for i in chosen]


def escape_tsv(text):
    """One TSV field: backslash, tab, newline and carriage return as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def prompt_set_id(ids):
    """A fingerprint of a list of prompt ids, in order: the three prompt files of one kat_make_prompts run share it."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def prompts_stats(prompts, per_src, log):
    """stats.txt's entries: totals, the prompt set's fingerprint, pairs per source, and dropped lines per reason."""
    stats = {"total_pairs": sum(per_src.values()), "unique_prompts": len(prompts),
             "prompt_set": prompt_set_id([p["id"] for p in prompts])}
    stats.update({f"src_{src}": n for src, n in sorted(per_src.items())})
    stats["dropped_total"] = log.total()
    stats.update({f"dropped_{reason}": n for reason, n in sorted(log.counts.items())})
    return stats


def prompt_set_mismatch(prompts_path, ids):
    """
    None when the stats.txt and prompt_id_map.tsv beside a prompts_all.jsonl (those present) describe the prompt
    set `ids` read from it, else what differs. kat_make_prompts renames the three into place one after the other,
    so a kill between two renames leaves files of two runs; readers check this instead of trusting the mix.
    """
    folder = os.path.dirname(os.fspath(prompts_path))
    want = prompt_set_id(ids)
    stats_path, map_path = os.path.join(folder, "stats.txt"), os.path.join(folder, "prompt_id_map.tsv")
    found = []  # (file, its prompt set) where it differs
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8", errors="replace") as f:
            stats = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
        if stats.get("prompt_set", want) != want:  # a stats.txt from before fingerprints has none to compare
            found.append((stats_path, stats["prompt_set"]))
    if os.path.isfile(map_path):
        with open(map_path, "rb") as f:
            got = prompt_set_id([line.split(b"\t", 1)[0].decode("utf-8", "replace") for line in f if line.strip()])
        if got != want:
            found.append((map_path, got))
    if not found:
        return None
    return ", ".join(f"{path} is of prompt set {got}" for path, got in found) + f", but {prompts_path} is of {want}"
