"""
Tests for nanochat/data.py and nanochat/loaders.py: the file readers and their error messages, packing, rank
sharding, exact resume, SFT masking, and the resumable shard download against a local HTTP server. Nothing here
touches the network.
"""

import http.server
import json
import threading
import time
import urllib.error

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import data
from nanochat.common import InputError
from nanochat.data import chat_conversations, pretrain_documents
from nanochat.loaders import PackedLoader, SFTLoader
from nanochat.tokenizer import train_tokenizer

WORDS = "the cat sat on a mat while seven dogs ran past the old red barn near the river".split()


def make_docs(n, seed=0):
    """Distinct documents of varied length (1 to ~40 words), so rows hold several documents and crop some."""
    docs = []
    for i in range(n):
        length = 1 + (i * 7 + seed) % 40
        docs.append(f"doc {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)))
    return docs


def make_chats(n):
    chats = []
    for i in range(n):
        chat = [{"role": "user", "content": f"question {i}: where is the cat?"},
                {"role": "assistant", "content": "on the mat " * (1 + i % 5)}]
        if i % 3 == 0:
            chat = [{"role": "system", "content": "be brief"}] + chat + [
                {"role": "user", "content": "and the dogs?"}, {"role": "assistant", "content": "near the barn"}]
        chats.append(chat)
    return chats


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(make_docs(200) + [m["content"] for c in make_chats(20) for m in c]), 300)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def collect(loader, n):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# -----------------------------------------------------------------------------
# pretraining readers

def test_local_reads_txt_jsonl_parquet_in_sorted_order_with_every_100th_as_val(tmp_path):
    docs = make_docs(250)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[1:150])])
    pq.write_table(pa.table({"text": docs[150:249]}), tmp_path / "c.parquet")
    (tmp_path / "sub" / "d.txt").write_text(docs[249], encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")

    train = pretrain_documents("local", "train", data_dir=tmp_path)
    val = pretrain_documents("local", "val", data_dir=tmp_path)
    assert val == [docs[0], docs[100], docs[200]]
    assert train == [d for i, d in enumerate(docs) if i % 100]
    assert not set(train) & set(val)
    assert pretrain_documents("local", "train", data_dir=tmp_path, num_docs=5) == train[:5]


def test_local_single_file_still_has_val(tmp_path):
    write_jsonl(tmp_path / "only.jsonl", [{"text": d} for d in make_docs(3)])
    assert pretrain_documents("local", "val", data_dir=tmp_path) == make_docs(3)[:1]
    assert pretrain_documents("local", "train", data_dir=tmp_path) == make_docs(3)[1:]


@pytest.mark.parametrize("line, message", [
    ('{"txt": "oops"}', "line 3: field 'text' missing"),
    ('{"text": 7}', "line 3: field 'text' is not a string"),
    ('{"text": null}', "line 3: field 'text' is not a string"),
    ('{"text": "unterminated', "line 3: invalid JSON"),
    ('["text"]', "line 3: expected a JSON object"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, ['{"text": "fine"}', "", line])  # the blank line still counts as line 2
    with pytest.raises(ValueError) as e:
        pretrain_documents("local", "train", data_dir=tmp_path)
    assert f"{path} {message}" in str(e.value)


def test_malformed_parquet_names_file_row_and_field(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None]}), path)
    with pytest.raises(ValueError, match=f"{path} row 2: field 'text' is not a string"):
        pretrain_documents("local", "train", data_dir=tmp_path)
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(ValueError, match=f"{path}: column 'text' missing"):
        pretrain_documents("local", "train", data_dir=tmp_path)


def test_empty_or_missing_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"data dir {tmp_path} has no"):
        pretrain_documents("local", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        pretrain_documents("local", "train", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown pretraining source"):
        pretrain_documents("webtext", "train")
    with pytest.raises(ValueError, match="split"):
        pretrain_documents("local", "test", data_dir=tmp_path)


def test_fineweb_reads_cached_shards_last_is_val(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i in range(3):
        pq.write_table(pa.table({"text": [f"shard {i} doc {j}" for j in range(4)], "score": [1.0] * 4}),
                       tmp_path / f"shard_{i:05d}.parquet")
    train = pretrain_documents("fineweb", "train", data_dir=tmp_path, num_shards=3)
    assert train == [f"shard {i} doc {j}" for i in range(2) for j in range(4)]
    assert (pretrain_documents("fineweb", "val", data_dir=tmp_path, num_shards=3)
            == [f"shard 2 doc {j}" for j in range(4)])
    assert pretrain_documents("fineweb", "train", data_dir=tmp_path, num_shards=3, num_docs=5) == train[:5]
    # a missing shard while offline fails at once instead of retrying a download for minutes
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set.*--source=synthetic"):
        pretrain_documents("fineweb", "train", data_dir=tmp_path, num_shards=4)


@pytest.mark.parametrize("name, content, line, read", [
    ("docs.jsonl", b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n', 3,
     lambda d: pretrain_documents("local", "train", data_dir=d)),
    ("doc.txt", b"first line\nsecond caf\xe9\n", 2, lambda d: pretrain_documents("local", "train", data_dir=d)),
    ("train-0.jsonl", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', 1,
     lambda d: chat_conversations("smoltalk", "train", from_dir=d)),
])
def test_bytes_that_are_not_utf8_are_named_with_file_and_line(tmp_path, name, content, line, read):
    # catches: decoding a whole file at once, whose UnicodeDecodeError names neither the file nor the line
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=f"^{tmp_path / name} line {line}: byte .* \\(0xe9\\) is not UTF-8; "
                                         f"re-encode the file as UTF-8$"):
        read(tmp_path)


def test_an_unreachable_download_host_fails_fast(tmp_path, capsys):
    # catches: downloading without first checking the host, which retries for ~2 minutes before giving up
    start = time.time()
    with pytest.raises(InputError, match="cannot download 2 missing FineWeb-Edu shard.*: cannot reach "
                                         "http://127.0.0.1:9/: .*--source=synthetic.*--source=local --data_dir DIR"):
        data.download_shards(2, tmp_path, base_url="http://127.0.0.1:9/shard_{index:05d}.parquet")
    assert time.time() - start < 10 and "retry" not in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_synthetic_sources_are_deterministic_with_disjoint_splits(tok):
    train = pretrain_documents("synthetic", "train", num_docs=200)
    val = pretrain_documents("synthetic", "val", num_docs=50)
    assert len(train) == 200 and len(val) == 50 and all(isinstance(d, str) and d for d in train + val)
    assert train == pretrain_documents("synthetic", "train", num_docs=200)
    assert not set(train) & set(val)
    assert pretrain_documents("synthetic", "train", num_docs=20, seed=1) != train[:20]
    chats = chat_conversations("synthetic", "train", num=30)
    val_chats = chat_conversations("synthetic", "val", num=30)
    assert len(chats) == 30 and chats != val_chats
    assert all(data.validate_messages(c, "synthetic") == c for c in chats + val_chats)
    # and both go through their loaders
    inputs, targets = next(iter(PackedLoader(train, tok, batch_rows=2, seq_len=64)))
    assert inputs.shape == (2, 64) and (inputs[:, 0] == tok.bos_token_id).all()
    inputs, targets = next(iter(SFTLoader(chats, tok, batch_size=4, max_len=128)))
    assert (targets >= 0).any()


# -----------------------------------------------------------------------------
# resumable download, against a local server

class _FlakyRangeServer(http.server.BaseHTTPRequestHandler):
    """
    Serves `payload`, honouring Range unless `ignore_range`; the first `cut_first` answers stop halfway through
    the body, as a dropped connection would.
    """
    payload = b""
    cut_first = 0
    ignore_range = False
    requests = []

    def do_GET(self):
        type(self).requests.append(self.headers.get("Range"))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and not self.ignore_range:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if len(type(self).requests) <= self.cut_first:
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_FlakyRangeServer,), {"payload": bytes(range(256)) * 400, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_with_range_after_a_cut(server, tmp_path):
    handler, url = server
    handler.cut_first = 2
    path = data.download_file(f"{url}/file.bin", tmp_path / "file.bin", backoff=0.01)
    assert path.read_bytes() == handler.payload
    assert not (tmp_path / "file.bin.part").exists()
    n = len(handler.payload)
    assert handler.requests == [None, f"bytes={n // 2}-", f"bytes={n // 2 + (n - n // 2) // 2}-"]


def test_download_continues_a_leftover_part_and_skips_finished_files(server, tmp_path):
    handler, url = server
    (tmp_path / "file.bin.part").write_bytes(handler.payload[:1000])
    data.download_file(f"{url}/file.bin", tmp_path / "file.bin", backoff=0.01)
    assert (tmp_path / "file.bin").read_bytes() == handler.payload
    data.download_file(f"{url}/file.bin", tmp_path / "file.bin", backoff=0.01)
    assert handler.requests == ["bytes=1000-"]


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    handler, url = server
    handler.ignore_range = True
    (tmp_path / "file.bin.part").write_bytes(b"stale bytes that must not stay in front")
    data.download_file(f"{url}/file.bin", tmp_path / "file.bin", backoff=0.01)
    assert (tmp_path / "file.bin").read_bytes() == handler.payload


def test_download_gives_up_after_the_retries(server, tmp_path):
    handler, url = server
    handler.cut_first = 10
    with pytest.raises(RuntimeError, match="failed after 3 attempts"):
        data.download_file(f"{url}/file.bin", tmp_path / "file.bin", retries=2, backoff=0.01)
    assert len(handler.requests) == 3 and not (tmp_path / "file.bin").exists()


def test_download_does_not_retry_a_404(server, tmp_path):
    handler, url = server
    with pytest.raises(urllib.error.HTTPError):
        data.download_file(f"{url}/missing.bin", tmp_path / "missing.bin", backoff=0.01)
    assert len(handler.requests) == 1


def test_download_shards_names_files_by_index(server, tmp_path):
    handler, url = server
    assert data.host_unreachable(url) is None  # it answers HEAD with 501: reachable all the same
    with pytest.raises(urllib.error.HTTPError, match="404"):
        data.download_shards(1, tmp_path, base_url=url + "/shard_{index:05d}.parquet")
    assert handler.requests == [None]


# -----------------------------------------------------------------------------
# packing

def split_at_bos(row, bos):
    """A packed row -> its documents' token lists (each starting with BOS)."""
    starts = [i for i, t in enumerate(row) if t == bos]
    assert starts and starts[0] == 0
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def test_packing_keeps_documents_whole_and_in_order(tok):
    docs = make_docs(60) + ["x " * 200]  # the last one is longer than a row
    bos, seq_len = tok.bos_token_id, 32
    encoded = tok.encode(docs, prepend=bos)
    batches = list(PackedLoader(docs, tok, batch_rows=4, seq_len=seq_len, train=False, tokenize_chunk=7))
    pieces = []
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, seq_len)
        for x, y in zip(inputs.tolist(), targets.tolist()):
            valid = [t for t in y if t != -1]
            row = x[:1] + valid  # the packed row of seq_len + 1 tokens (shorter in the last, padded batch)
            assert x[:len(valid)] == row[:-1]  # targets are the inputs shifted by one
            assert y[len(valid):] == [-1] * (seq_len - len(valid))
            if valid:
                assert x[0] == bos
                segments = split_at_bos(row, bos)
                assert all(len(s) == len(encoded[len(pieces) + i]) for i, s in enumerate(segments[:-1]))
                pieces += segments
    # every document, in order, each one whole or cropped at the end of its row
    assert len(pieces) == len(docs)
    for piece, ids in zip(pieces, encoded):
        assert piece == ids[:len(piece)]
    assert len(encoded[-1]) > seq_len + 1 and len(pieces[-1]) <= seq_len + 1  # the long one was cropped


class CountingTokenizer:
    """Documents are space-separated ints and encode to themselves: the first token after BOS names the document."""
    bos_token_id = 0

    def encode(self, docs, prepend=None):
        return [[prepend] + [int(w) for w in doc.split()] for doc in docs]


def test_training_rows_start_at_bos_and_cover_each_epoch_in_a_new_order():
    num_docs = 40
    docs = [" ".join(str(1000 * (i + 1) + j) for j in range(1 + i % 13)) for i in range(num_docs)]
    loader = PackedLoader(docs, CountingTokenizer(), batch_rows=2, seq_len=16, seed=3)
    seen = []  # document index per packed piece, None for a piece cropped to its BOS alone
    for inputs, targets in collect(loader, 200):
        assert (inputs[:, 0] == 0).all() and (targets >= 0).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            for piece in split_at_bos(row, 0):
                doc = piece[1] // 1000 - 1 if len(piece) > 1 else None
                if doc is not None:
                    assert piece[1:] == [1000 * (doc + 1) + j for j in range(len(piece) - 1)]
                seen.append(doc)
        if len(seen) >= 3 * num_docs:
            break
    epochs = [seen[e * num_docs:(e + 1) * num_docs] for e in range(3)]
    for epoch in epochs:  # each epoch takes every document once
        named = [d for d in epoch if d is not None]
        assert len(set(named)) == len(named) and set(named) <= set(range(num_docs))
    assert epochs[0] != list(range(num_docs)) and epochs[0] != epochs[1] != epochs[2]


def test_packed_two_ranks_see_the_single_rank_batch(tok):
    docs = make_docs(50)
    for train in (True, False):
        single = collect(PackedLoader(docs, tok, 4, 16, train=train, seed=1), 12)
        ranks = [collect(PackedLoader(docs, tok, 4, 16, rank=r, world_size=2, train=train, seed=1), 12)
                 for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(single)
        for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
            assert x0.shape == (2, 16)
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="divide evenly"):
        PackedLoader(docs, tok, 3, 16, rank=0, world_size=2)


def test_packed_resume_is_exact_across_epochs(tok):
    docs = make_docs(30)
    make = lambda: PackedLoader(docs, tok, batch_rows=2, seq_len=20, seed=7, tokenize_chunk=8)
    reference = collect(make(), 40)  # several epochs
    for k in (1, 6, 17):
        loader = make()
        collect(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(collect(resumed, 40 - k), reference[k:])
    assert state["epoch"] > 0
    # loading a state into a loader that is mid-iteration rewinds it too
    loader = make()
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = loader.state_dict()
    [next(it) for _ in range(5)]
    loader.load_state_dict(state)
    assert_same_batches([next(it) for _ in range(5)], reference[3:8])


def test_packed_val_resume_and_end(tok):
    docs = make_docs(25)
    make = lambda: PackedLoader(docs, tok, batch_rows=2, seq_len=20, train=False)
    reference = list(make())
    loader = make()
    collect(loader, 2)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(list(resumed), reference[2:])
    with pytest.raises(ValueError, match="no documents"):
        PackedLoader([], tok, 2, 20)


# -----------------------------------------------------------------------------
# chat data

def smoltalk_rows(chats):
    return [{"messages": c, "source": "test"} for c in chats]


def test_smoltalk_from_local_hub_copy_parquet_and_jsonl(tmp_path):
    chats = make_chats(6)
    repo = tmp_path / "HuggingFaceTB" / "smol-smoltalk" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(smoltalk_rows(chats[:4])), repo / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(smoltalk_rows(chats[4:])), repo / "test-00000-of-00001.parquet")
    assert chat_conversations("smoltalk", "train", from_dir=tmp_path) == chats[:4]
    assert chat_conversations("smoltalk", "val", from_dir=tmp_path) == chats[4:]
    assert chat_conversations("smoltalk", "train", from_dir=tmp_path, num=2) == chats[:2]

    flat = tmp_path / "flat"
    flat.mkdir()
    write_jsonl(flat / "train.jsonl", smoltalk_rows(chats))
    assert chat_conversations("smoltalk", "train", from_dir=flat) == chats
    with pytest.raises(ValueError, match="no SmolTalk test files"):
        chat_conversations("smoltalk", "val", from_dir=flat)


def test_smoltalk_from_the_hub_uses_the_test_split_for_val(monkeypatch):
    datasets = pytest.importorskip("datasets")
    chats = make_chats(3)
    calls = []

    def fake_load_dataset(name, split):  # stands in for the hub, which tests must not reach
        calls.append((name, split))
        return datasets.Dataset.from_list(smoltalk_rows(chats))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert chat_conversations("smoltalk", "val", num=2) == chats[:2]
    assert calls == [("HuggingFaceTB/smol-smoltalk", "test")]


@pytest.mark.parametrize("row, message", [
    ({"source": "x"}, "line 2: field 'messages' missing"),
    ({"messages": []}, "line 2: field 'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, "line 2: field 'messages[0]' is not an object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "line 2: field 'messages[0].role' must be one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]},
     "line 2: field 'messages[1].role' is 'user', expected 'assistant'"),
    ({"messages": [{"role": "system", "content": "hi"}, {"role": "assistant", "content": "hi"}]},
     "line 2: field 'messages[1].role' is 'assistant', expected 'user'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "line 2: field 'messages[1].content' is not a string"),
    ('{"messages": [', "line 2: invalid JSON"),
])
def test_malformed_smoltalk_jsonl_names_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "train-00000.jsonl"
    write_jsonl(path, smoltalk_rows(make_chats(1)) + [row])
    with pytest.raises(ValueError) as e:
        chat_conversations("smoltalk", "train", from_dir=tmp_path)
    assert f"{path} {message}" in str(e.value)


def test_malformed_smoltalk_parquet_names_file_row_and_field(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    rows = smoltalk_rows(make_chats(3))
    rows[2]["messages"][1]["content"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=f"{path} row 2: field 'messages\\[1\\].content' is not a string"):
        chat_conversations("smoltalk", "train", from_dir=tmp_path)


# -----------------------------------------------------------------------------
# SFT batches

def test_sft_targets_follow_the_render_mask_and_padding(tok):
    chats = make_chats(10)
    max_len = 40
    batches = list(SFTLoader(chats, tok, batch_size=4, max_len=max_len, train=False))
    assert len(batches) == 3
    bos = tok.bos_token_id
    for b, (inputs, targets) in enumerate(batches):
        rendered = [tok.render_conversation(c, max_tokens=max_len + 1) for c in chats[4 * b:4 * b + 4]]
        width = max(len(ids) for ids, _ in rendered) - 1
        assert inputs.shape == targets.shape == (4, width) and width <= max_len
        for row, (ids, mask) in enumerate(rendered):
            n = len(ids) - 1
            assert inputs[row, :n].tolist() == ids[:-1]
            assert targets[row, :n].tolist() == [ids[t + 1] if mask[t + 1] else -1 for t in range(n)]
            assert (inputs[row, n:] == bos).all() and (targets[row, n:] == -1).all()
        # the last batch has 2 conversations: the other rows are padding only
        assert (targets[len(rendered):] == -1).all() and (inputs[len(rendered):] == bos).all()
    assert (batches[0][1] >= 0).any()
    assert max(len(tok.render_conversation(c, max_tokens=10_000)[0]) for c in chats) > max_len + 1  # crop hit


def test_sft_two_ranks_and_resume(tok):
    chats = make_chats(14)
    make = lambda **kw: SFTLoader(chats, tok, batch_size=4, max_len=48, seed=5, **kw)
    single = collect(make(), 10)  # crosses epochs
    ranks = [collect(make(rank=r, world_size=2), 10) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    loader = make()
    collect(loader, 4)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert loader.state_dict()["epoch"] == 1
    assert_same_batches(collect(resumed, 6), single[4:])


def test_sft_step_rows_group_a_steps_conversations_by_length_and_keep_its_loss(tok):
    # catches: rows sorted across steps (a step would train on other conversations), ranks sorting differently,
    # a micro-batch padded to the step's longest row (no saving), or a resume that lands mid-step
    from conftest import make_tiny_model
    from nanochat.training import train_step
    chats = make_chats(14)
    make = lambda **kw: SFTLoader(chats, tok, batch_size=4, max_len=48, seed=5, **kw)
    plain, grouped = collect(make(), 6), collect(make(step_rows=8), 6)
    real = lambda y: (y >= 0).sum().item()
    for step in range(3):
        p, g = plain[2 * step:2 * step + 2], grouped[2 * step:2 * step + 2]
        def rows(batches):  # each row's tokens without the padding after it (pads are <|bos|>)
            out = []
            for x, _ in batches:
                for row in x.tolist():
                    while row and row[-1] == tok.bos_token_id:
                        row.pop()
                    out.append(tuple(row))
            return sorted(out)

        assert rows(p) == rows(g) and sum(real(y) for _, y in p) == sum(real(y) for _, y in g)
        widths = [(x != tok.bos_token_id).sum(1).max().item() for x, _ in g]
        assert widths[0] <= widths[1] and g[0][0].size(1) <= g[1][0].size(1)
        assert g[0][0].size(1) < max(x.size(1) for x, _ in p)  # the short half pads less
        losses = []
        for batches in (p, g):
            model = make_tiny_model(vocab_size=tok.vocab_size, sequence_len=64).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            losses.append(train_step(model, [optimizer], batches, 0.0)[0])
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    ranks = [collect(make(rank=r, world_size=2, step_rows=8), 6) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(grouped, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    loader = make(step_rows=8)
    collect(loader, 2)  # one whole step
    resumed = make(step_rows=8)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(collect(resumed, 4), grouped[2:])
