"""
Tests for the preference-data stages (nanochat/pair_sources.py, nanochat/pairs.py, scripts/kat_download_pairs.py,
scripts/kat_make_prompts.py): small files written in each source's hub layout and schema (hh's gzipped jsonl
subsets, uf's parquet with message lists and a README naming the splits, SE's per-site parquet with answer
structs), read through the same `datasets` call as the hub, and checked against rows written out by hand. Nothing
here touches the network.
"""

import argparse
import errno
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import pair_sources, pairs
from nanochat.common import InputError
from nanochat.pair_sources import SkipRow, html_to_text, parse_hh_transcript
from nanochat.pairs import check_pair, escape_tsv, extract_prompts, read_pairs
from nanochat.synthetic import conversation_id, pair_id
from scripts import kat_density, kat_download_pairs, kat_make_prompts
from scripts.kat_download_pairs import selected_sources

HH = "Anthropic/hh-rlhf"
UF = "HuggingFaceH4/ultrafeedback_binarized"
SE = "HuggingFaceH4/stack-exchange-preferences"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def hh_line(prefix, chosen, rejected):
    return {"chosen": f"{prefix}\n\nAssistant: {chosen}", "rejected": f"{prefix}\n\nAssistant: {rejected}"}


def write_hh(root, files):
    """files: {"helpful-base/train": [row, ...]}; every subset gets both splits, empty when not given."""
    for subset in pair_sources.HH_SUBSETS:
        for split in ("train", "test"):
            path = root / HH / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in files.get(f"{subset}/{split}", []))
    (root / HH / "red-team-attempts").mkdir()
    with gzip.open(root / HH / "red-team-attempts" / "red_team_attempts.jsonl.gz", "wt") as f:
        f.write(json.dumps({"transcript": "\n\nHuman: hi\n\nAssistant: hello", "rating": 0}) + "\n")


MESSAGE_LIST = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
UF_README = """---
language:
- en
license: mit
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: train_sft
    path: data/train_sft-*
  - split: test_prefs
    path: data/test_prefs-*
---
# UltraFeedback Binarized (test fixture)
"""


def uf_table(rows):
    """rows: (prompt, chosen reply, rejected reply, score_chosen, score_rejected), in the hub's column types."""
    def convo(p, reply):
        return [{"content": p, "role": "user"}, {"content": reply, "role": "assistant"}]
    return pa.table({
        "prompt": pa.array([r[0] for r in rows], pa.string()),
        "prompt_id": pa.array([f"uf{i}" for i in range(len(rows))], pa.string()),
        "chosen": pa.array([convo(r[0], r[1]) for r in rows], MESSAGE_LIST),
        "rejected": pa.array([convo(r[0], r[2]) for r in rows], MESSAGE_LIST),
        "messages": pa.array([convo(r[0], r[1]) for r in rows], MESSAGE_LIST),
        "score_chosen": pa.array([r[3] for r in rows], pa.float64()),
        "score_rejected": pa.array([r[4] for r in rows], pa.float64()),
    })


def write_uf(root, splits):
    (root / UF / "data").mkdir(parents=True)
    (root / UF / "README.md").write_text(UF_README)
    for split, rows in splits.items():
        pq.write_table(uf_table(rows), root / UF / "data" / f"{split}-00000-of-00001.parquet")


ANSWER = pa.struct([("answer_id", pa.int64()), ("author", pa.string()), ("author_id", pa.int64()),
                    ("author_profile", pa.string()), ("pm_score", pa.int64()), ("selected", pa.bool_()),
                    ("text", pa.string())])


def write_se(root, sites):
    """sites: {"android": [(qid, question html, [(pm_score, answer html), ...]), ...]}, one parquet per site."""
    for site, questions in sites.items():
        folder = root / SE / "data" / site
        folder.mkdir(parents=True)
        answers = [[{"answer_id": 100 * q + i, "author": "someone", "author_id": i, "author_profile": "", "pm_score": s,
                     "selected": False, "text": t} for i, (s, t) in enumerate(a)] for q, _, a in questions]
        pq.write_table(pa.table({
            "qid": pa.array([q for q, _, _ in questions], pa.int64()),
            "question": pa.array([h for _, h, _ in questions], pa.string()),
            "answers": pa.array(answers, pa.list_(ANSWER)),
            "date": pa.array(["2020/01/01"] * len(questions), pa.string()),
            "metadata": pa.array([[f"https://{site}.stackexchange.com/questions/{q}"] for q, _, _ in questions],
                                 pa.list_(pa.string())),
        }), folder / "train-00000-of-00001.parquet")
    (root / SE / "stack_exchanges.json").write_text("{}")  # in the real repo's root; must not be read as data


def download(tmp_path, *flags):
    out = tmp_path / "data"
    kat_download_pairs.main([*flags, f"--pairs_path={out / 'pairs_all.jsonl'}",
                             f"--test_pairs_path={out / 'pairs_test.jsonl'}",
                             f"--report_dir={tmp_path / 'outs' / 'pairs'}"])
    return read_jsonl(out / "pairs_all.jsonl"), read_jsonl(out / "pairs_test.jsonl")


def make_prompts(tmp_path, pairs_path):
    kat_make_prompts.main([f"--pairs_path={pairs_path}", f"--out_dir={tmp_path / 'data'}",
                           f"--report_dir={tmp_path / 'outs' / 'prompts'}"])
    return read_jsonl(tmp_path / "data" / "prompts_all.jsonl")


# -----------------------------------------------------------------------------
# hh-rlhf

def test_hh_transcript_parses_into_alternating_turns():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\nHow can I help?\n\nHuman: What is 2+2?\n\nAssistant: 4."
    assert parse_hh_transcript(text) == [user("Hi there"), assistant("Hello!\nHow can I help?"),
                                         user("What is 2+2?"), assistant("4.")]
    with pytest.raises(SkipRow) as e:
        parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")
    assert e.value.reason == "bad_transcript"
    with pytest.raises(SkipRow):
        parse_hh_transcript("preamble\n\nHuman: a\n\nAssistant: b")


MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is  2+2?"


def test_hh_rows_multi_turn_skips_and_test_split(tmp_path):
    write_hh(tmp_path, {
        "helpful-base/train": [
            hh_line(MULTI, "4.", "5."),                                              # line 1: kept, multi-turn
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"},  # 2: prefixes
            hh_line("\n\nHuman: Same?", "Yes.", "Yes."),                             # 3: identical replies
            {"chosen": "\n\nHuman: Empty?\n\nAssistant: Fine.", "rejected": "\n\nHuman: Empty?\n\nAssistant:"},  # 4
            hh_line("\n\nHuman: Held out?", "Maybe.", "No."),                         # 5: its prompt is in test
        ],
        "helpful-base/test": [hh_line("\n\nHuman: Held out?", "Yes.", "No.")],
        "harmless-base/train": [hh_line("\n\nHuman: How do I pick a lock?", "I can't help with that.", "Sure!")],
    })
    train, test = download(tmp_path, "--only=hh", f"--from_dir={tmp_path}")

    messages = [user("Hi there"), assistant("Hello! How can I help?"), user("What is  2+2?")]
    expected = {"id": pair_id("hh-rlhf", messages, "4.", "5."), "prompt": "What is  2+2?", "messages": messages,
                "chosen": "4.", "rejected": "5.", "src": "hh-rlhf", "prompt_id": conversation_id(messages),
                "subset": "helpful-base"}
    # subsets are interleaved: harmless-base comes first in HH_SUBSETS, helpful-base second
    assert train == [
        {"id": pair_id("hh-rlhf", [user("How do I pick a lock?")], "I can't help with that.", "Sure!"),
         "prompt": "How do I pick a lock?", "messages": [user("How do I pick a lock?")],
         "chosen": "I can't help with that.", "rejected": "Sure!", "src": "hh-rlhf",
         "prompt_id": conversation_id([user("How do I pick a lock?")]), "subset": "harmless-base"},
        expected]
    # ids are fixed values, the same on every machine
    assert expected["id"] == "544a3904bef1fbb7" and expected["prompt_id"] == "54f12b3be0e964ae"
    assert [(r["prompt"], r["chosen"], r["subset"]) for r in test] == [("Held out?", "Yes.", "helpful-base")]

    report = (tmp_path / "outs" / "pairs" / "report.md").read_text()
    source = f"{tmp_path / HH}/helpful-base/train.jsonl.gz"
    for reason, line in [("prefix_mismatch", 2), ("identical_replies", 3), ("empty_reply", 4), ("prompt_in_test", 5)]:
        assert f"- `{reason}`: 1\n  - {source} line {line}: " in report, reason
    assert "| hh-rlhf | 2 | 1 | 4 |" in report


# -----------------------------------------------------------------------------
# ultrafeedback_binarized

def test_uf_message_lists_scores_ties_and_test_prefs(tmp_path):
    write_uf(tmp_path, {
        "train_prefs": [("Name a colour.", " Blue. ", "Seven.", 8.5, 3.0),
                        ("Tie?", "A", "B", 7.0, 7.0),
                        ("Lower?", "A", "B", 2.0, 6.0)],
        "test_prefs": [("Count to two.", "1, 2", "2, 1", 9.0, 1.5)],
        "train_sft": [("Never read.", "x", "y", 9.0, 1.0)],
    })
    train, test = download(tmp_path, "--only=uf", f"--from_dir={tmp_path}")
    messages = [user("Name a colour.")]
    assert train == [{"id": pair_id("ultrafeedback-binarized", messages, "Blue.", "Seven."), "prompt": "Name a colour.",
                      "messages": messages, "chosen": "Blue.", "rejected": "Seven.", "src": "ultrafeedback-binarized",
                      "prompt_id": conversation_id(messages), "score_chosen": 8.5, "score_rejected": 3.0}]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"]) for r in test] == [
        ("Count to two.", "1, 2", "2, 1", 9.0)]
    report = (tmp_path / "outs" / "pairs" / "report.md").read_text()
    assert f"{tmp_path / UF} [train_prefs] row 1: both scored 7.0" in report
    assert "| ultrafeedback-binarized | 1 | 1 | 2 | chosen_scored_lower=1, tie=1 |" in report


# -----------------------------------------------------------------------------
# stack-exchange-preferences

def test_html_to_text_keeps_posts_readable():
    html = ("<p>Use <code>ls</code> &amp; friends:</p>\n\n<pre><code>ls -la\n  cd ..\n</code></pre>\n\n"
            "<ul>\n<li>one <a href=\"https://x.org\">link</a></li>\n<li>two<br>lines</li>\n</ul>\n"
            "<ol><li>first</li><li>second</li></ol><p>Done &lt;3</p>")
    assert html_to_text(html) == ("Use `ls` & friends:\n\n```\nls -la\n  cd ..\n```\n\n- one link\n- two\nlines\n\n"
                                  "1. first\n2. second\n\nDone <3")
    html = ("<ul><li><p>Loose item</p></li><li>two</li></ul><pre>\nx = 1\n</pre>"
            "<table><tr><th>a</th><th>b</th></tr></table><p>See <img alt='enter image description here'></p>")
    assert html_to_text(html) == "- Loose item\n\n- two\n\n```\nx = 1\n```\n\na | b\n\nSee"


def test_se_pairs_by_score_gap_with_a_cap_per_question(tmp_path):
    write_se(tmp_path, {
        "android": [(1, "<p>How do I <em>reset</em> it?</p>",
                     [(5, "<p>Hold power.</p>"), (1, "<p>Buy a new one.</p>"), (3, "<p>Use settings.</p>"),
                      (3, "<p>Ask support.</p>")]),
                    (2, "<p>Lonely?</p>", [(9, "<p>Only answer.</p>")]),
                    (3, "<p>Close call?</p>", [(2, "<p>A</p>"), (1, "<p>B</p>")])],
        "apple": [(1, "<p>Which Mac?</p>", [(0, "<p>Any.</p>"), (4, "<p>The one you can afford.</p>")])],
    })
    train, test = download(tmp_path, "--only=se", f"--from_dir={tmp_path}", "--test_share=0")
    assert test == []
    got = sorted((r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"], r["qid"])
                 for r in train)
    # question 1: gaps >= 2 are 5-1, 5-3 (twice), 3-1 (twice); the widest three, ties in answer order
    assert got == sorted([
        ("How do I reset it?", "Hold power.", "Buy a new one.", 5, 1, 1),
        ("How do I reset it?", "Hold power.", "Use settings.", 5, 3, 1),
        ("How do I reset it?", "Hold power.", "Ask support.", 5, 3, 1),
        ("Which Mac?", "The one you can afford.", "Any.", 4, 0, 1)])
    row = next(r for r in train if r["chosen"] == "The one you can afford.")
    assert row["messages"] == [user("Which Mac?")] and row["src"] == "stack-exchange-preferences"
    report = (tmp_path / "outs" / "pairs" / "report.md").read_text()
    assert "over_question_cap=2, question_no_pair=2" in report


def test_se_total_cap_and_per_file_cap(tmp_path):
    write_se(tmp_path, {site: [(q, f"<p>{site} question {q}?</p>", [(3, "<p>good</p>"), (0, "<p>bad</p>")])
                              for q in range(5)] for site in ("a", "b", "c")})
    train, _ = download(tmp_path, "--only=se", f"--from_dir={tmp_path}", "--test_share=0", "--se_max_per_file=2",
                        "--se_max_pairs=5")
    sites = sorted(r["prompt"].split()[0] for r in train)
    assert len(train) == 5 and sites.count("a") <= 2 and sites.count("b") <= 2 and sites.count("c") <= 2


# -----------------------------------------------------------------------------
# all sources together, the synthetic world, and the held-out file

def test_from_dir_reads_all_three_hub_sources_by_default(tmp_path, capsys):
    write_hh(tmp_path, {"helpful-base/train": [hh_line("\n\nHuman: Hi", "Hello.", "Go away.")]})
    write_uf(tmp_path, {"train_prefs": [("Hi", "Hello.", "Go away.", 9.0, 1.0)],
                        "test_prefs": [("Bye", "Goodbye.", "Whatever.", 8.0, 2.0)], "train_sft": []})
    write_se(tmp_path, {"x": [(1, "<p>Hi</p>", [(3, "Hello."), (0, "Go away.")])]})
    train, test = download(tmp_path, f"--from_dir={tmp_path}", "--test_share=0")
    # the same conversation from three sources: one prompt, three pairs with distinct ids
    assert sorted(r["src"] for r in train) == ["hh-rlhf", "stack-exchange-preferences", "ultrafeedback-binarized"]
    assert len({r["prompt_id"] for r in train}) == 1 and len({r["id"] for r in train}) == 3
    assert [r["prompt"] for r in test] == ["Bye"]
    assert f"Wrote {tmp_path / 'data' / 'pairs_all.jsonl'} with 3 pairs" in capsys.readouterr().out
    prompts = make_prompts(tmp_path, tmp_path / "data" / "pairs_all.jsonl")
    assert [(p["prompt"], p["n_pairs"]) for p in prompts] == [("Hi", 3)]


def test_synthetic_held_out_share_never_shares_a_prompt_and_is_deterministic(tmp_path):
    train, test = download(tmp_path, "--only=synthetic", "--max_per_source=600", "--test_share=0.2")
    train_ids, test_ids = {r["prompt_id"] for r in train}, {r["prompt_id"] for r in test}
    assert not train_ids & test_ids
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert all(r["src"] == "synthetic" and {"cluster", "rejected_kind"} <= set(r) for r in train + test)
    first = (tmp_path / "data" / "pairs_all.jsonl").read_bytes()
    download(tmp_path, "--only=synthetic", "--max_per_source=600", "--test_share=0.2")
    assert (tmp_path / "data" / "pairs_all.jsonl").read_bytes() == first


def test_only_synthetic_end_to_end_through_both_stages(tmp_path, capsys):
    train, test = download(tmp_path, "--only", "synthetic", "--max_per_source=300")
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'data' / 'pairs_all.jsonl'} with {len(train)} pairs" in out
    assert len(train) + len(test) <= 300 and len(test) > 0
    prompts = make_prompts(tmp_path, tmp_path / "data" / "pairs_all.jsonl")
    data = tmp_path / "data"
    assert capsys.readouterr().out.strip() == (
        f"Wrote {data / 'prompts_all.jsonl'}, {data / 'prompt_id_map.tsv'}, and {data / 'stats.txt'}")
    assert [p["id"] for p in prompts] == list(dict.fromkeys(r["prompt_id"] for r in train))
    assert sum(p["n_pairs"] for p in prompts) == len(train)
    stats = dict(line.split(": ") for line in (data / "stats.txt").read_text().splitlines())
    # the length leak, counted independently here: shorter_wins among pairs whose replies differ in length
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in train)
    ties = sum(len(r["chosen"]) == len(r["rejected"]) for r in train)
    assert stats == {"total_pairs": str(len(train)), "unique_prompts": str(len(prompts)),
                     "prompt_set": pairs.prompt_set_id([p["id"] for p in prompts]),
                     "src_synthetic": str(len(train)), "dropped_total": "0",
                     "shorter_wins": str(round(shorter / (len(train) - ties), 4)), "length_ties": str(ties)}
    assert 0.4 < float(stats["shorter_wins"]) < 0.6
    assert os.path.exists(tmp_path / "outs" / "prompts" / "report.md")


def test_source_selection_flags():
    def sources(only=None, no_se=False):
        return selected_sources(argparse.Namespace(only=only, no_hh=False, no_uf=False, no_se=no_se))

    assert sources() == ["hh", "uf", "se"]
    assert sources(["hh,synthetic", "uf"]) == ["hh", "uf", "synthetic"]
    assert sources(no_se=True) == ["hh", "uf"]
    with pytest.raises(SystemExit, match="unknown source"):
        sources(["hh,wiki"])
    with pytest.raises(SystemExit, match="no source left"):
        sources(["se"], no_se=True)


def test_no_network_fails_fast_naming_the_offline_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        download(tmp_path, "--only=hh")
    assert "--only synthetic" in str(e.value) and "--from_dir" in str(e.value)
    assert not (tmp_path / "data").exists()
    # without the offline switch, a failed connection is reported the same way (a closed local port, no network)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert "cannot reach http://127.0.0.1:9" in pair_sources.hub_unreachable(timeout=2)


def test_interrupted_download_leaves_the_previous_files(tmp_path, monkeypatch):
    download(tmp_path, "--only=synthetic", "--max_per_source=50")
    before = (tmp_path / "data" / "pairs_all.jsonl").read_bytes()

    def interrupted(seed, size, n):
        yield from list(pair_sources.synthetic_stream(seed, size, n))[:10]
        raise KeyboardInterrupt

    monkeypatch.setattr(kat_download_pairs, "synthetic_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download(tmp_path, "--only=synthetic", "--max_per_source=60")
    assert (tmp_path / "data" / "pairs_all.jsonl").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "data")) == ["pairs_all.jsonl", "pairs_test.jsonl"]


# -----------------------------------------------------------------------------
# reading pairs files, prompts

def good_row(messages, chosen="Yes.", rejected="No.", src="hh-rlhf"):
    return pair_sources.make_pair(src, messages, chosen, rejected)


def test_read_pairs_skips_bad_lines_with_their_line_numbers(tmp_path):
    ok = good_row([user("Is it on?")])
    lines = [
        json.dumps(ok).encode(),                                                       # 1
        b'{"id": "x", "prompt": ',                                                     # 2 malformed JSON
        b'{"id": "\xff\xfe"}',                                                         # 3 invalid UTF-8
        json.dumps({k: v for k, v in ok.items() if k != "chosen"}).encode(),          # 4 missing field
        json.dumps({**ok, "rejected": 3}).encode(),                                   # 5 not a string
        json.dumps(good_row([user("A?")], rejected=" ")).encode(),                    # 6 empty reply
        json.dumps(good_row([user("B?")], "Same  text.", "Same text.")).encode(),     # 7 identical
        json.dumps(good_row([user("C?"), assistant("D.")])).encode(),                 # 8 ends on assistant
        b"",                                                                           # 9 blank: ignored
        json.dumps(ok).encode(),                                                       # 10 duplicate id
        b"[1, 2]",                                                                     # 11 not an object
        json.dumps({**good_row([user("E?")]), "prompt_id": "0" * 16}).encode(),       # 12 wrong prompt_id
        json.dumps(ok).replace("Is it on?", "Is it \\ud800on?").encode(),                # 13 lone surrogate
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, log = read_pairs(path)
    assert rows == [ok]
    expected = {"invalid_json": 2, "invalid_utf8": 3, "missing_field": 4, "not_a_string": 5, "empty_reply": 6,
                "identical_replies": 7, "ends_on_assistant": 8, "duplicate_pair": 10, "not_an_object": 11,
                "prompt_id_mismatch": 12}
    assert dict(log.counts) == {**{r: 1 for r in expected}, "invalid_utf8": 2}
    for reason, line in expected.items():
        assert log.places[reason][0].startswith(f"{path} line {line}: "), reason
    assert log.places["invalid_utf8"][1].startswith(f"{path} line 13: ")


def test_make_prompts_stops_on_an_unusable_file_and_keeps_old_outputs(tmp_path):
    (tmp_path / "pairs.jsonl").write_bytes(b"not json\n\x00\xff\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts_all.jsonl").write_text("old\n")
    with pytest.raises(SystemExit, match="has no usable pair"):
        make_prompts(tmp_path, tmp_path / "pairs.jsonl")
    assert (tmp_path / "data" / "prompts_all.jsonl").read_text() == "old\n"
    with pytest.raises(SystemExit, match="kat_download_pairs"):
        make_prompts(tmp_path, tmp_path / "missing.jsonl")


def test_prompts_dedup_on_the_whole_conversation(tmp_path):
    first = [user("Tell me a joke."), assistant("Why did the chicken cross the road?"), user("Why?")]
    other = [user("Tell me a joke."), assistant("Knock knock."), user("Who's there?")]
    spaced = [user("Tell me  a joke."), assistant("Why did the chicken\ncross the road?"), user("Why? ")]
    rows = [good_row(first), good_row(other), good_row(spaced, "To get to the\tother side.", "No idea.", "synthetic"),
            good_row([user("Tab\there,\nnewline and \\ backslash")])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompts = make_prompts(tmp_path, path)
    assert prompts == [
        {"id": conversation_id(first), "prompt": "Why?", "messages": first, "src": "hh-rlhf", "n_pairs": 2},
        {"id": conversation_id(other), "prompt": "Who's there?", "messages": other, "src": "hh-rlhf", "n_pairs": 1},
        {"id": rows[3]["prompt_id"], "prompt": "Tab\there,\nnewline and \\ backslash", "messages": rows[3]["messages"],
         "src": "hh-rlhf", "n_pairs": 1}]
    assert (tmp_path / "data" / "prompt_id_map.tsv").read_text().splitlines() == [
        f"{conversation_id(first)}\tWhy?", f"{conversation_id(other)}\tWho's there?",
        f"{rows[3]['prompt_id']}\tTab\\there,\\nnewline and \\\\ backslash"]
    stats = (tmp_path / "data" / "stats.txt").read_text()
    fingerprint = pairs.prompt_set_id([p["id"] for p in prompts])
    assert f"total_pairs: 4\nunique_prompts: 3\nprompt_set: {fingerprint}\nsrc_hh-rlhf: 3\nsrc_synthetic: 1\n" \
           "dropped_total: 0\nshorter_wins: 0.0\nlength_ties: 0\n" == stats


def test_check_pair_and_escape_tsv_edge_cases():
    row = good_row([{"role": "system", "content": "Be brief."}, user("Hi?")])
    assert check_pair(row) is None
    assert check_pair({**row, "prompt": "Other?"})[0] == "prompt_mismatch"
    assert check_pair({**row, "messages": [{"role": "system", "content": "x"}]})[0] == "bad_messages"
    assert check_pair({**row, "messages": []})[0] == "bad_messages"
    assert escape_tsv("a\\tb\t\r\n") == "a\\\\tb\\t\\r\\n"
    assert extract_prompts([]) == ([], {})


# -----------------------------------------------------------------------------
# broken inputs: all-or-nothing outputs, hh lines and subsets, missing and unusable pairs files

def test_a_source_without_a_kept_pair_stops_the_run_and_keeps_the_previous_files(tmp_path):
    # catches: judging only the total, so a uf copy of another schema silently drops out of a mixed download
    write_hh(tmp_path, {"helpful-base/train": [hh_line("\n\nHuman: Hi", "Hello.", "Go away.")]})
    (tmp_path / UF / "data").mkdir(parents=True)
    for split in ("train_prefs", "test_prefs"):
        pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["x", "y"]}),
                       tmp_path / UF / "data" / f"{split}-00000-of-00001.parquet")
    download(tmp_path, "--only=synthetic", "--max_per_source=20")
    before = {name: (tmp_path / "data" / name).read_bytes() for name in ("pairs_all.jsonl", "pairs_test.jsonl")}
    with pytest.raises(SystemExit) as e:
        download(tmp_path, "--only=hh,uf", f"--from_dir={tmp_path}")
    assert "ultrafeedback-binarized gave no pair (4 rows skipped: bad_messages=4; first: " in str(e.value)
    assert "hh-rlhf" not in str(e.value) and "left as they were" in str(e.value)
    assert {name: (tmp_path / "data" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path / "data")) == sorted(before)


def test_hh_bad_lines_are_counted_skips_with_file_and_line(tmp_path, capsys):
    # catches: reading hh through datasets' json loader, which ends the whole source at the first bad line
    write_hh(tmp_path, {"helpful-base/train": [hh_line("\n\nHuman: One?", "1.", "2."), "{not json", "[1, 2]",
                                               hh_line("\n\nHuman: Two?", "2.", "3.")]})
    path = tmp_path / HH / "helpful-base" / "train.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    lines.insert(1, b'{"chosen": "caf\xe9"}')  # Latin-1, not UTF-8
    path.write_bytes(gzip.compress(b"\n".join(lines).replace(b'"{not json"', b"{not json")
                                   .replace(b'"[1, 2]"', b"[1, 2]")))
    train, _ = download(tmp_path, "--only=hh", f"--from_dir={tmp_path}")
    assert [r["prompt"] for r in train] == ["One?", "Two?"]
    report = (tmp_path / "outs" / "pairs" / "report.md").read_text()
    for reason, line in [("invalid_utf8", 2), ("invalid_json", 3), ("not_an_object", 4)]:
        assert f"- `{reason}`: 1\n  - {path} line {line}: " in report, reason
    assert "| hh-rlhf | 2 | 0 | 3 |" in capsys.readouterr().out


def test_hh_copy_without_some_subsets_reads_the_others_and_names_the_missing(tmp_path, capsys):
    # catches: a missing subset file ending the whole source (or being passed over without a word)
    for subset, split in [("helpful-base", "train"), ("helpful-base", "test"), ("harmless-base", "train")]:
        path = tmp_path / HH / subset / f"{split}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(json.dumps(hh_line(f"\n\nHuman: {subset} {split}?", "Yes.", "No.")) + "\n")
    train, test = download(tmp_path, "--only=hh", f"--from_dir={tmp_path}")
    assert sorted(r["prompt"] for r in train) == ["harmless-base train?", "helpful-base train?"]
    assert [r["prompt"] for r in test] == ["helpful-base test?"]
    note = (f"note: {tmp_path / HH} lacks 5 hh-rlhf subset file(s): harmless-base/test.jsonl.gz, "
            f"helpful-online/train.jsonl.gz, helpful-online/test.jsonl.gz, helpful-rejection-sampled/train.jsonl.gz, "
            f"helpful-rejection-sampled/test.jsonl.gz; the pairs come from the files present")
    assert note in capsys.readouterr().out
    assert note in (tmp_path / "outs" / "pairs" / "report.md").read_text()


def test_read_pairs_refuses_missing_empty_and_unusable_files_naming_path_and_writer(tmp_path):
    # catches: a stage starting on no pairs (an empty list) instead of naming the file and the command to run
    path = tmp_path / "pairs.jsonl"
    with pytest.raises(InputError, match=f"^--pairs_path {path} not found; write it with python -m "
                                         f"scripts.kat_download_pairs$"):
        read_pairs(path, "--pairs_path")
    path.write_text("\n\n")
    with pytest.raises(InputError, match=f"pairs file {path} is empty; write it again with python -m"):
        read_pairs(path)
    path.write_text('{"id": "x"}\nnot json\n')
    with pytest.raises(InputError, match=f"has no usable pair: 2 lines skipped .* first problems: {path} line 1: "
                                         f"field 'prompt' missing; {path} line 2: Expecting value"):
        read_pairs(path)
    ok = good_row([user("Is it on?")])
    path.write_text("not json\n" + json.dumps(ok) + "\n")
    rows, log = read_pairs(path)
    assert rows == [ok]
    assert log.note(path) == f"{path}: 1 lines skipped (invalid_json=1), first at {path} line 1: Expecting value " \
                             f"(column 1)"


def old_prompt_set(tmp_path):
    """A finished kat_make_prompts run in tmp_path/data, and a pairs file of another prompt set to make next."""
    old = [good_row([user(f"Old {i}?")]) for i in range(3)]
    new = [good_row([user(f"New {i}?")]) for i in range(4)]
    for name, rows in (("old.jsonl", old), ("new.jsonl", new)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_prompts(tmp_path, tmp_path / "old.jsonl")
    names = ("prompts_all.jsonl", "prompt_id_map.tsv", "stats.txt")
    return {name: (tmp_path / "data" / name).read_bytes() for name in names}


@pytest.mark.parametrize("failing_write", [2, 3])
def test_make_prompts_that_fails_writing_keeps_the_old_set_whole(tmp_path, monkeypatch, failing_write):
    # catches: committing each file as soon as it is written, so a full disk leaves two prompt sets mixed
    before = old_prompt_set(tmp_path)
    real, calls = kat_make_prompts.write_synced, []

    def disk_full_at_n(path, lines):
        calls.append(path)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, lines)

    monkeypatch.setattr(kat_make_prompts, "write_synced", disk_full_at_n)
    with pytest.raises(OSError, match="No space left"):
        make_prompts(tmp_path, tmp_path / "new.jsonl")
    assert {name: (tmp_path / "data" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path / "data")) == sorted(before)  # no temp file left behind
    ids = [p["id"] for p in read_jsonl(tmp_path / "data" / "prompts_all.jsonl")]
    assert pairs.prompt_set_mismatch(tmp_path / "data" / "prompts_all.jsonl", ids) is None


@pytest.mark.parametrize("failing_rename, renamed", [(2, ["stats.txt"]), (3, ["stats.txt", "prompt_id_map.tsv"])])
def test_a_kill_between_renames_is_caught_by_the_reader(tmp_path, monkeypatch, failing_rename, renamed):
    # catches: readers trusting prompt files of two runs (new stats.txt or map beside the old prompts_all.jsonl)
    old_prompt_set(tmp_path)
    real, calls = os.replace, []

    def killed_at_n(src, dst):
        calls.append(dst)
        if len(calls) == failing_rename:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_n)
    with pytest.raises(KeyboardInterrupt):
        make_prompts(tmp_path, tmp_path / "new.jsonl")
    monkeypatch.setattr(os, "replace", real)
    assert [os.path.basename(c) for c in calls] == ["stats.txt", "prompt_id_map.tsv", "prompts_all.jsonl"][
        :failing_rename]
    data = tmp_path / "data"
    new_set = pairs.prompt_set_id([r["prompt_id"] for r in read_jsonl(tmp_path / "new.jsonl")])
    old_set = pairs.prompt_set_id([r["id"] for r in read_jsonl(data / "prompts_all.jsonl")])
    differ = ", ".join(f"{data / name} is of prompt set {new_set}" for name in renamed)
    with pytest.raises(SystemExit) as e:
        kat_density.read_prompts(str(data / "prompts_all.jsonl"))
    assert str(e.value) == (f"kat_density: the prompt files disagree: {differ}, but {data / 'prompts_all.jsonl'} is "
                            f"of {old_set} (kat_make_prompts was interrupted while replacing them?); write them "
                            f"again with python -m scripts.kat_make_prompts")
    make_prompts(tmp_path, tmp_path / "new.jsonl")  # a rerun mends it
    assert len(kat_density.read_prompts(str(data / "prompts_all.jsonl"))) == 4


def test_heldout_sample_is_stratified_by_source_seeded_and_in_input_order():
    # catches: taking the first n prompts (pairs_test.jsonl is written source by source, so that sees only the
    # first source), a quota that ignores small sources, and a sample that changes between calls
    prompts = ([{"src": "hh", "i": i} for i in range(70)] + [{"src": "uf", "i": i} for i in range(25)]
               + [{"src": "synthetic", "i": i} for i in range(5)])
    sample = pairs.heldout_sample(prompts, 20, seed=0)
    assert [p["src"] for p in sample].count("hh") == 14
    assert [p["src"] for p in sample].count("uf") == 5
    assert [p["src"] for p in sample].count("synthetic") == 1
    assert sample == pairs.heldout_sample(prompts, 20, seed=0)
    assert sample != pairs.heldout_sample(prompts, 20, seed=1)
    assert [prompts.index(p) for p in sample] == sorted(prompts.index(p) for p in sample)
    assert pairs.heldout_sample(prompts[:3], 20, seed=0) == prompts[:3]


def test_synthetic_pairs_report_how_often_the_shorter_reply_wins(tmp_path, capsys):
    # catches: synthetic pairs whose rejected reply is mostly the longer one (artifact rejections were the chosen
    # reply plus artifacts, so the shorter reply won 84% of the time), and a report that does not measure it
    import re
    train, test = download(tmp_path, "--only", "synthetic")
    report = (tmp_path / "outs" / "pairs" / "report.md").read_text()
    metrics = dict(re.findall(r"^\| (\w+) \| ([^|]*) \|$", report, re.M))
    share = float(metrics["shorter_wins"])
    assert 0.45 <= share <= 0.55
    rows = train + test  # measured on the replies as written, in characters
    ties = sum(len(r["chosen"]) == len(r["rejected"]) for r in rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    assert int(metrics["length_ties"]) == ties and share == pytest.approx(shorter / (len(rows) - ties), abs=1e-5)
    assert metrics["synthetic_shorter_wins"] == metrics["shorter_wins"]
    assert f"shorter in {share:.1%} of the pairs whose replies differ in length ({ties} length ties)" in \
        capsys.readouterr().out
