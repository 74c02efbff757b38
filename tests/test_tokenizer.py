"""Tests for nanochat/tokenizer.py: training, round trips, special tokens, chat rendering, save/load."""

import os
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

VOCAB_SIZE = 512

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She said: \"it's 3:45pm, we'll leave at 17:30 and they're late again!\"",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))",
    "Prices rose 12.5% in 2023, from $1,299 to $1,461.",
    "Café, naïve, façade, coöperate, jalapeño, Straße, smørrebrød.",
    "Привет, как дела? Всё хорошо, спасибо.",
    "東京は日本の首都です。今日はいい天気ですね。",
    "机器学习是人工智能的一个分支。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Emoji time 😀🎉🚀 and flags 🇫🇷 and families 👨‍👩‍👧.",
    "Tabs\tand   multiple   spaces\r\nand windows newlines\r\n",
    "for i in range(10): x[i] = i ** 2  # squares",
    "Combining marks: e\u0301 a\u0308 n\u0303 and zero-width\u200bjoiner.",
    "<html><body><p class=\"intro\">Hello, world!</p></body></html>",
    "Mathematics: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ>0, α β γ δ.",
]


def make_corpus(n_docs=60, seed=0):
    """A few KB of varied text: shuffled sentences plus random numbers and words."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        picked = rng.sample(SENTENCES, 4)
        words = ("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(8))
        noise = " ".join(words)
        docs.append(" ".join(picked) + f" {noise} {rng.randint(0, 10**6)}\n")
    return docs


TRICKY = [
    "",
    "\n",
    "\n\n\n",
    "\x00",
    "a\x00b",
    " ",
    "   leading and trailing   ",
    "😀",
    "👨‍👩‍👧‍👦🏳️‍🌈",
    "中文字符和日本語のテキスト",
    "e\u0301\u0301\u0301",
    "\ufeffBOM",
    "<|bos|>",
    "hello <|bos|> world <|assistant_end|>",
    "<|user_start|><|user_end|><|assistant_start|><|python_start|><|output_end|>",
    "<|bos",
    "\U0010ffff\U00010000",
    "x" * 1000,
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(make_corpus()), VOCAB_SIZE)


def ordinary_limit(tok):
    return tok.vocab_size - len(SPECIAL_TOKENS)


# ---------------------------------------------------------------------------- training


def test_vocab_size_honoured_exactly(tok):
    assert tok.vocab_size == VOCAB_SIZE
    small = train_tokenizer(make_corpus(20), 300)
    assert small.vocab_size == 300


def test_vocab_size_too_small_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(iter(make_corpus(5)), 256 + len(SPECIAL_TOKENS) - 1)


def test_training_text_too_small_raises():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["ab ab ab"], 1000)


def test_special_tokens_come_after_ordinary_vocab(tok):
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(ordinary_limit(tok), tok.vocab_size))
    assert tok.bos_token_id == tok.encode_special("<|bos|>")
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == s
    with pytest.raises(ValueError):
        tok.encode_special("<|nope|>")


# ---------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_roundtrip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=20)), max_size=10).map("".join))
def test_plain_text_never_yields_special_ids(tok, text):
    assert all(i < ordinary_limit(tok) for i in tok.encode(text))
    assert all(i < ordinary_limit(tok) for row in tok.encode([text, text + "<|bos|>"]) for i in row)


def test_batch_encode_matches_single(tok):
    texts = make_corpus(10, seed=1) + TRICKY
    assert tok.encode(texts) == [tok.encode(t) for t in texts]
    assert tok.encode([]) == []


def test_prepend_append(tok):
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    body = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>", append=end) == [bos, *body, end]
    assert tok.encode(["hi there", ""], prepend=bos) == [[bos, *body], [bos]]
    with pytest.raises(ValueError):
        tok.encode("x", prepend="<|bogus|>")
    with pytest.raises(ValueError):
        tok.encode("x", append=65)  # an ordinary token id is not allowed
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_token_bytes_sum_to_utf8_length(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,)
    assert tb.dtype == torch.long
    assert tb[ordinary_limit(tok):].sum() == 0
    assert (tb[:ordinary_limit(tok)] > 0).all()
    for text in make_corpus(5, seed=2) + TRICKY:
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------- chat rendering


def expected_render(tok, turns):
    """Reference layout built by encoding each piece on its own: bos, then <|role_start|> content <|role_end|> per
    turn."""
    sp = tok.encode_special
    ids, mask = [sp("<|bos|>")], [0]
    for role, content in turns:
        body = tok.encode(content)
        ids += [sp(f"<|{role}_start|>")] + body + [sp(f"<|{role}_end|>")]
        if role == "assistant":
            mask += [0] + [1] * len(body) + [1]
        else:
            mask += [0] * (len(body) + 2)
    return ids, mask


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? <|bos|>"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in 日本語?"},
    {"role": "assistant", "content": "四 😀\n\nDone."},
]


def test_render_conversation_layout_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    want_ids, want_mask = expected_render(tok, [
        ("user", "You are terse.\n\nWhat is 2+2? <|bos|>"),
        ("assistant", "4."),
        ("user", "And in 日本語?"),
        ("assistant", "四 😀\n\nDone."),
    ])
    assert ids == want_ids
    assert mask == want_mask
    start, end = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|assistant_end|>")
    assert ids.count(start) == 2 and ids.count(end) == 2
    assert all(m == 0 for i, m in zip(ids, mask) if i == start)
    assert all(m == 1 for i, m in zip(ids, mask) if i == end)
    assert mask[0] == 0 and ids[0] == tok.bos_token_id
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "4.<|assistant_end|>四 😀\n\nDone.<|assistant_end|>"


def test_render_conversation_without_system(tok):
    conv = CONVERSATION[1:3]
    ids, mask = tok.render_conversation(conv)
    assert (ids, mask) == expected_render(tok, [(m["role"], m["content"]) for m in conv])


def test_render_conversation_truncates(tok):
    full_ids, full_mask = tok.render_conversation(CONVERSATION)
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert len(ids) == len(mask) == 7
    assert ids == full_ids[:7] and mask == full_mask[:7]
    assert tok.render_conversation(CONVERSATION, max_tokens=10_000) == (full_ids, full_mask)


def test_render_for_completion(tok):
    start = tok.encode_special("<|assistant_start|>")
    full_ids, _ = tok.render_conversation(CONVERSATION)
    # a trailing assistant message is dropped, so both forms give the same prompt
    for messages in (CONVERSATION, CONVERSATION[:-1]):
        prompt = tok.render_for_completion(messages)
        assert prompt[-1] == start
        assert prompt == full_ids[:len(prompt)]
    last_reply = tok.encode(CONVERSATION[-1]["content"])
    assert len(tok.render_for_completion(CONVERSATION)) == len(full_ids) - len(last_reply) - 1


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "message 0"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "message 2"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1"),
    ([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}], "message 1"),
    ([{"role": "system", "content": "a"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1"),
    ([{"role": "user", "content": ["not", "a", "str"]}], "message 0 content"),
    ([{"role": "user"}], "message 0"),
])
def test_bad_conversations_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(messages)
    with pytest.raises(ValueError, match=match):
        tok.render_for_completion(messages)


# ---------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(tok, tmp_path):
    directory = tmp_path / "nested" / "tok"
    tok.save(directory)
    assert sorted(os.listdir(directory)) == ["tokenizer.json", "tokenizer.model"]  # no temp files left behind
    loaded = Tokenizer.load(directory)
    assert loaded.vocab_size == tok.vocab_size
    texts = make_corpus(10, seed=3) + TRICKY
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert (loaded.token_bytes() == tok.token_bytes()).all()
    tok.save(directory)  # overwriting an existing save works
    assert Tokenizer.load(directory).encode(texts) == tok.encode(texts)


def test_load_missing_directory(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        Tokenizer.load(missing)


@pytest.mark.parametrize("filename, content", [
    ("tokenizer.model", "not base64 at all!!\n"),
    ("tokenizer.model", "YQ== 0\nYQ== 1\n"),
    ("tokenizer.json", "{not json"),
    ("tokenizer.json", "{}"),
])
def test_load_corrupt_directory(tok, tmp_path, filename, content):
    tok.save(tmp_path)
    (tmp_path / filename).write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        Tokenizer.load(tmp_path)
