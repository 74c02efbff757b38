"""
Byte-level BPE tokenizer: trained with HuggingFace `tokenizers`, served with `tiktoken`.

HF `tokenizers` has a fast, well-tested BPE trainer; tiktoken has the faster encoder but
cannot train. So `train_tokenizer` runs the HF trainer, converts its vocabulary into
tiktoken's `mergeable_ranks` (token bytes -> rank, in merge order, the 256 single bytes
first) and every encode/decode afterwards goes through a `tiktoken.Encoding`.

Vocabulary layout: ids 0..255 are the single bytes (id == byte value), then the merged
tokens in the order they were learned, then the 9 special tokens of SPECIAL_TOKENS.

Split pattern: GPT-4's cl100k regex, except that digit runs are split into chunks of at
most 2 (`\\p{N}{1,2}`, as nanochat does) instead of 3: all 3-digit numbers would cost
~1000 vocab slots, too many for the small vocabularies trained here.

Chat format (see `render_conversation`):
    <|bos|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|><|user_start|>...

On disk (`save`/`load`) a tokenizer is a directory with two files:
    tokenizer.model  one `base64(token_bytes) rank` line per ordinary token (tiktoken's format)
    tokenizer.json   {"pattern": ..., "special_tokens": {name: id}}
"""

import base64
import json
import os

import tiktoken
import torch

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    # reserved for tool use (python calls and their output) so adding it later keeps vocab ids stable
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

# tiktoken releases the GIL while encoding, so batch encoding scales with cores
NUM_THREADS = min(8, os.cpu_count() or 1)


def _bytes_to_unicode():
    """The byte -> printable char table that HF's ByteLevel (like GPT-2) uses for its token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # the other bytes (controls, space, ...) map, in order, to chars 256, 257, ... so all are visible
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _make_encoding(mergeable_ranks, pattern):
    n = len(mergeable_ranks)
    special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


def train_tokenizer(text_iterator, vocab_size):
    """Train a byte-level BPE tokenizer with `vocab_size` tokens in total (special tokens included)."""
    # imported here because only training needs HF tokenizers
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size must be an int >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size!r}")
    n_ordinary = vocab_size - len(SPECIAL_TOKENS)

    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        # use_regex=False: the split above replaces GPT-2's regex; ByteLevel only maps bytes to chars
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = BpeTrainer(
        vocab_size=n_ordinary,
        min_frequency=0,
        show_progress=False,
        # all 256 bytes, even ones absent from the training text, so that any text can be encoded
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(text_iterator, trainer)

    vocab = hf.get_vocab()  # token string -> id; merged tokens get increasing ids in merge order
    if len(vocab) != n_ordinary:
        raise ValueError(f"training text too small: BPE stopped at {len(vocab) + len(SPECIAL_TOKENS)} tokens, "
                         f"asked for vocab_size={vocab_size}")
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    mergeable_ranks = {bytes([b]): b for b in range(256)}
    # HF numbers the 256 single bytes by their chars, not byte value: skip them and keep merge order
    merged = sorted((i, s) for s, i in vocab.items() if len(s) > 1)
    for rank, (_, s) in enumerate(merged, start=256):
        mergeable_ranks[bytes(char_to_byte[c] for c in s)] = rank
    return Tokenizer(_make_encoding(mergeable_ranks, SPLIT_PATTERN))


def _atomic_write(path, text):
    # a crash mid-save leaves the old file (or none), never a truncated one
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Tokenizer:
    """Encode/decode text and render chat conversations; wraps a `tiktoken.Encoding`."""

    def __init__(self, enc: tiktoken.Encoding):
        # tiktoken has no public accessor for the ranks; they're needed for save() and token_bytes()
        ranks = enc._mergeable_ranks
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..n-1")
        expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        if enc._special_tokens != expected:
            raise ValueError(f"special tokens must be {expected}, got {enc._special_tokens}")
        self.enc = enc
        self._special_ids = expected

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    @property
    def bos_token_id(self):
        return self._special_ids["<|bos|>"]

    def encode_special(self, name):
        if name not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special_ids[name]

    def _special_id(self, token):
        """A special token given as its id or its string, as an id."""
        if isinstance(token, str):
            return self.encode_special(token)
        if token not in self._special_ids.values():
            raise ValueError(f"prepend/append must be a special token or its id, got {token!r}")
        return token

    def encode(self, text, prepend=None, append=None):
        """str -> list[int], or list[str] -> list[list[int]]. Special-token strings in text stay plain text."""
        pre = [] if prepend is None else [self._special_id(prepend)]
        post = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=NUM_THREADS)
            return [pre + row + post for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        # invalid UTF-8 (e.g. a token sequence cut inside a character) becomes U+FFFD
        return self.enc.decode(ids)

    def token_bytes(self):
        """Length in UTF-8 bytes of every token id (0 for special tokens), for bits-per-byte metrics."""
        counts = [0] * self.vocab_size
        for token, rank in self.enc._mergeable_ranks.items():
            counts[rank] = len(token)
        return torch.tensor(counts, dtype=torch.long)

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda item: item[1])
        lines = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks)
        meta = {"pattern": self.enc._pat_str, "special_tokens": self._special_ids}
        _atomic_write(os.path.join(directory, MODEL_FILE), lines)
        _atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory):
        directory = os.fspath(directory)
        for name in (MODEL_FILE, META_FILE):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"no tokenizer in {directory!r}: {name} is missing")
        try:
            with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            mergeable_ranks = {}
            with open(os.path.join(directory, MODEL_FILE), encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    token_b64, rank = line.split()
                    token = base64.b64decode(token_b64, validate=True)
                    if token in mergeable_ranks:
                        raise ValueError(f"duplicate token on line {lineno}")
                    mergeable_ranks[token] = int(rank)
            tok = cls(_make_encoding(mergeable_ranks, meta["pattern"]))
            if meta["special_tokens"] != tok._special_ids:
                raise ValueError("special tokens do not match this version of nanochat")
        # json, base64, int() and UTF-8 errors are all ValueErrors; KeyError/TypeError are a malformed json
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt tokenizer in {directory!r}: {e!r}") from e
        return tok

    def _turns(self, messages):
        """
        Validate a conversation; return its (role, content) turns, a system message merged into the first user
        turn.
        """
        if not isinstance(messages, list) or not messages:
            raise ValueError("a conversation must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
            if not isinstance(message["content"], str):
                raise ValueError(f"message {i} content must be a str, got {type(message['content']).__name__}")
        start = 1 if messages[0]["role"] == "system" else 0
        turns = [(m["role"], m["content"]) for m in messages[start:]]
        if not turns:
            raise ValueError("conversation has a system message but no user message")
        for i, (role, _) in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"message {start + i} has role {role!r}, expected {expected!r}: after an optional first "
                    "system message, roles must alternate user, assistant, user, ..."
                )
        if start:
            # the chat format has no system tokens; prefixing the first user turn keeps the instruction
            # in view of the model without spending vocab on a role it would rarely see in training
            turns[0] = ("user", messages[0]["content"] + "\n\n" + turns[0][1])
        return turns

    def _render(self, turns):
        ids, mask = [self.bos_token_id], [0]
        for role, content in turns:
            body = self.enc.encode_ordinary(content)
            trained = int(role == "assistant")
            ids += [self._special_ids[f"<|{role}_start|>"], *body, self._special_ids[f"<|{role}_end|>"]]
            # the model learns to write assistant content and to stop (the end token), never to start a turn
            mask += [0] + [trained] * (len(body) + 1)
        return ids, mask

    def render_conversation(self, messages, max_tokens=2048):
        """Token ids of a chat and its training mask (1 on assistant content and <|assistant_end|>), cut to max_tokens.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; an optional system message
        first, then user and assistant alternating, starting with user. The system content becomes a
        prefix of the first user message: system + "\\n\\n" + user.
        """
        ids, mask = self._render(self._turns(messages))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, messages):
        """Prompt ids asking the model to answer the last user turn: the chat, then <|assistant_start|>.

        A trailing assistant message (e.g. the reference answer of an eval example) is dropped. Not
        truncated: cutting the end would remove the <|assistant_start|> the model must continue from.
        """
        turns = self._turns(messages)
        if turns[-1][0] == "assistant":
            turns = turns[:-1]
        ids, _ = self._render(turns)
        return ids + [self._special_ids["<|assistant_start|>"]]
