"""
Data sources: where the pretraining text and the chat conversations come from, read and checked, as plain Python
lists. How they become batches is nanochat/loaders.py's business; this module knows nothing of tokens or tensors.

Pretraining sources (`pretrain_documents`), each giving a list of document strings for split "train" or "val":
  synthetic  documents sampled from the synthetic world (offline default); train and val use disjoint seeds.
  local      a directory of .txt (one document per file), .jsonl (a "text" field per line) and .parquet (a "text"
             column) files, read in sorted path order. Every 100th document, counting from the first, is held out
             as val: this is independent of how the text is split into files, and one file still gives a val split.
  fineweb    FineWeb-Edu parquet shards downloaded into .cache/data/fineweb (resumable, with retries; $HF_ENDPOINT
             picks a mirror), read by the same parquet reader. The last shard is val, as in nanochat: shards are
             large and already shuffled. Missing shards and an unreachable host fail within seconds (InputError),
             not after minutes of retries. Under torchrun rank 0 downloads while the other ranks wait.

Chat sources (`chat_conversations`): the synthetic world, or SmolTalk (`HuggingFaceTB/smol-smoltalk`, from the hub
or from a local copy of the hub repo in parquet or jsonl). Every row is validated; a bad one raises InputError
naming the file, the line (jsonl, counted from 1) or row (parquet, counted from 0, as datasets indexes it) and
the field. So do bytes that are not UTF-8, in every text file read here.

The jsonl reader (`jsonl_rows`), the conversation check (`validate_messages`) and the network checks (`hf_endpoint`,
`hf_offline`, `host_unreachable`) are shared with the preference-pair and density stages.
"""

import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from nanochat.common import InputError, rank0_first

FINEWEB_PATH = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"  # on HF_ENDPOINT
FINEWEB_DIR = Path(".cache/data/fineweb")
SMOLTALK_ID = "HuggingFaceTB/smol-smoltalk"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_EVERY = 100  # local source: documents 0, 100, 200, ... are val
CHAT_ROLES = ("system", "user", "assistant")
_MISSING = object()  # tells a missing field from a JSON null

# synthetic sizes when num_docs / num is not given: enough for a few epochs of a tiny model, quick to generate
SYNTHETIC_PRETRAIN_DOCS = {"train": 20_000, "val": 500}
SYNTHETIC_CHATS = {"train": 5_000, "val": 200}


def _check_split(split):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _split_seed(seed, split):
    # even seeds for train, odd for val: the two streams never share a seed, for any user seed
    return 2 * seed + (split == "val")


# -----------------------------------------------------------------------------
# reading text files

def _not_utf8(path, data, error, lineno=None):
    """InputError for bytes that are not UTF-8: the file, the line (counted in `data` unless given) and the byte."""
    if lineno is None:
        lineno = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1)
    else:
        column = error.start
    return InputError(f"{path} line {lineno}: byte {column + 1} of the line (0x{data[error.start]:02x}) is not UTF-8; "
                      f"re-encode the file as UTF-8")


def jsonl_rows(path):
    """
    Yield (line number from 1, parsed object) for each non-blank line; a line that is not UTF-8, not JSON or not an
    object raises InputError naming the file and line. Lines are decoded one by one, so the error has its line.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e, lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _parquet_column(path, column):
    """Yield (row number from 0, value) of one column, decoding a record batch at a time so num_docs stops early."""
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise InputError(f"{path}: column '{column}' missing (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield row, value
            row += 1


def read_documents(path):
    """Yield the documents of one .txt, .jsonl or .parquet file, checking that every one is a string."""
    path = Path(path)
    if path.suffix == ".txt":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, data, e) from None
        yield text
        return
    if path.suffix == ".jsonl":
        rows = ((f"line {n}", row.get("text", _MISSING)) for n, row in jsonl_rows(path))
    elif path.suffix == ".parquet":
        rows = ((f"row {n}", value) for n, value in _parquet_column(path, "text"))
    else:
        raise InputError(f"{path}: unsupported file type (expected one of {', '.join(TEXT_SUFFIXES)})")
    for where, text in rows:
        if text is _MISSING:
            raise InputError(f"{path} {where}: field 'text' missing")
        if not isinstance(text, str):
            raise InputError(f"{path} {where}: field 'text' is not a string (got {type(text).__name__})")
        yield text


def text_files(data_dir):
    """The .txt/.jsonl/.parquet files under data_dir (recursively), in sorted path order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data dir {data_dir} does not exist or is not a directory")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"data dir {data_dir} has no {', '.join(TEXT_SUFFIXES)} files")
    return files


# -----------------------------------------------------------------------------
# the network: fail fast when it is not there

def hf_endpoint():
    """The Hugging Face hub's address: $HF_ENDPOINT (a mirror) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_offline():
    """Why the Hugging Face hub must not be used ("HF_HUB_OFFLINE is set"), or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    return None


def host_unreachable(url, timeout=4.0):
    """
    None when the server of `url` answers a HEAD request for its root (with any status), else why not. A few
    seconds at most offline, where a download's retries would take minutes to give up.
    """
    parts = urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        urllib.request.urlopen(urllib.request.Request(root, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status: the network is there
    except (OSError, ValueError, http.client.HTTPException) as e:
        return f"cannot reach {root}: {getattr(e, 'reason', e)}"
    return None


# -----------------------------------------------------------------------------
# FineWeb-Edu shards

def download_file(url, path, retries=6, backoff=2.0, timeout=60):
    """
    Download url to path unless it is already there. Bytes go to path + ".part", an interrupted download continues
    from there with an HTTP Range request, and only a complete file is renamed onto path, so path never holds a
    truncated shard. Network errors and 5xx/429 answers are retried after backoff * 2**attempt seconds.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # the server ignored the range and sends the whole file
                    have = 0
                total = _expected_size(response, have)
                with open(part, "ab" if have else "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
            size = part.stat().st_size
            if total is not None and size != total:
                raise ConnectionError(f"connection closed at {size} of {total} bytes")
            os.replace(part, path)
            return path
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the range starts past the end: the .part is unusable, start over
                part.unlink(missing_ok=True)
            elif e.code < 500 and e.code != 429:
                raise  # 404 and friends will not get better by retrying
            error = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, IncompleteRead
            error = e
        if attempt < retries:
            delay = backoff * 2 ** attempt
            print(f"download {url} failed ({error}); retry {attempt + 1}/{retries} in {delay:.1f}s", flush=True)
            time.sleep(delay)
    raise RuntimeError(f"download {url} failed after {retries + 1} attempts: {error}")


def _expected_size(response, have):
    """Total file size announced by a 206 (Content-Range) or 200 (Content-Length) answer, if any."""
    content_range = response.headers.get("Content-Range")
    if have and content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return have + int(length) if length is not None else None


def download_shards(num_shards, dest_dir=FINEWEB_DIR, base_url=None, retries=6):
    """
    Make sure shards 0..num_shards-1 are in dest_dir (downloading the missing ones from base_url, by default
    FineWeb-Edu on the hub); returns their paths. Missing shards and no way to fetch them (offline, or the host
    does not answer) raise InputError within seconds.
    """
    paths = [Path(dest_dir) / f"shard_{i:05d}.parquet" for i in range(num_shards)]
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return paths
    reason = hf_offline() if base_url is None else None  # the offline switches are about the hub only
    base_url = base_url or hf_endpoint() + FINEWEB_PATH
    reason = reason or host_unreachable(base_url)
    if reason is not None:
        raise InputError(f"cannot download {len(missing)} missing FineWeb-Edu shard(s) into {dest_dir} (e.g. "
                         f"{missing[0].name}): {reason}. To work offline, train on --source=synthetic, or on your own "
                         f".txt/.jsonl/.parquet files with --source=local --data_dir DIR, or copy the shards into "
                         f"{dest_dir}")
    for i, p in enumerate(paths):
        download_file(base_url.format(index=i), p, retries=retries)
    return paths


# -----------------------------------------------------------------------------
# pretraining documents

def pretrain_documents(source, split, data_dir=None, num_docs=None, seed=0, synthetic_size=1, num_shards=2):
    """
    Documents (a list of str) of a pretraining source for split "train" or "val".
    data_dir: the directory for "local" (required) and "fineweb" (default .cache/data/fineweb).
    num_docs: keep only the first num_docs documents of the split (synthetic: how many to sample).
    seed, synthetic_size: the synthetic world's seed and size; the documents use a seed of their own per split.
    num_shards: fineweb shards to use (at least 2: the last one is val).
    """
    _check_split(split)
    if source == "synthetic":
        from nanochat.synthetic import make_world
        n = num_docs if num_docs is not None else SYNTHETIC_PRETRAIN_DOCS[split]
        return make_world(seed=seed, size=synthetic_size).pretrain_documents(n, seed=_split_seed(seed, split))
    if source == "local":
        if data_dir is None:
            raise InputError("source 'local' needs a directory of text files: pass --data_dir DIR")
        files = text_files(data_dir)
        docs = _local_split(files, split, num_docs)
        if not docs:
            raise InputError(f"data dir {data_dir}: no {split} documents (every {VAL_EVERY}th document, from the "
                             f"first, is val, so train needs at least 2 documents)")
        return docs
    if source == "fineweb":
        if num_shards < 2:
            raise InputError(f"fineweb needs --num_shards >= 2 (got {num_shards}): the last shard is the val split")
        with rank0_first():  # under torchrun rank 0 downloads while the others wait, then they find the shards
            paths = download_shards(num_shards, data_dir if data_dir is not None else FINEWEB_DIR)
        return _take(paths[:-1] if split == "train" else paths[-1:], num_docs)
    raise ValueError(f"unknown pretraining source {source!r} (expected synthetic, local or fineweb)")


def _local_split(files, split, num_docs):
    want_val = split == "val"
    docs = []
    index = 0
    for path in files:
        for doc in read_documents(path):
            if (index % VAL_EVERY == 0) == want_val:
                if num_docs is not None and len(docs) >= num_docs:
                    return docs
                docs.append(doc)
            index += 1
    return docs


def _take(files, num_docs):
    docs = []
    for path in files:
        for doc in read_documents(path):
            if num_docs is not None and len(docs) >= num_docs:
                return docs
            docs.append(doc)
    return docs


# -----------------------------------------------------------------------------
# chat conversations

def chat_conversations(source, split, from_dir=None, num=None, seed=0, synthetic_size=1, stream=0,
                       artifact_rate=0.15, free_clause_rate=0.0):
    """
    Conversations (lists of {"role", "content"} dicts) for split "train" or "val".
    source "synthetic": sampled from the world (seed, synthetic_size as in pretrain_documents). `stream` picks
    another sample of conversations from the same world (mid-training and SFT see different conversations about
    the same facts); `artifact_rate` is the share of answers carrying planted mode-collapse artifacts, a float for
    every cluster or a {cluster: rate} dict (the positive control's rare-cluster artifacts); `free_clause_rate` the
    share ending in a free clause ("..., as far as I know.": AutoDeco's data; 0 leaves the conversations as they were).
    source "smoltalk": SmolTalk's train or test split; from the hub, or, with from_dir, from local files in the hub
    layout: DIR/HuggingFaceTB/smol-smoltalk/data/{train,test}-*.parquet (or .jsonl), or those files in DIR itself.
    num: keep the first num conversations (synthetic: how many to sample).
    """
    _check_split(split)
    if source == "synthetic":
        from nanochat.synthetic import make_world
        n = num if num is not None else SYNTHETIC_CHATS[split]
        return make_world(seed=seed, size=synthetic_size).chat_conversations(
            n, seed=_split_seed(seed, split) + 10_000 * stream, artifact_rate=artifact_rate,
            free_clause_rate=free_clause_rate)
    if source != "smoltalk":
        raise ValueError(f"unknown chat source {source!r} (expected synthetic or smoltalk)")
    hub_split = "train" if split == "train" else "test"
    if from_dir is None:
        rows = _smoltalk_hub_rows(hub_split)
    else:
        rows = (row for path in smoltalk_files(from_dir, hub_split) for row in _chat_file_rows(path))
    conversations = []
    for where, messages in rows:
        if num is not None and len(conversations) >= num:
            break
        conversations.append(validate_messages(messages, where))
    return conversations


def smoltalk_files(from_dir, hub_split):
    """The {hub_split}-*.parquet / .jsonl files of a local copy of the SmolTalk repo, in sorted order."""
    root = Path(from_dir)
    if (root / SMOLTALK_ID).is_dir():
        root = root / SMOLTALK_ID
    files = sorted(p for p in root.rglob(f"{hub_split}*") if p.is_file() and p.suffix in (".parquet", ".jsonl")
                   and p.stem.split("-")[0] == hub_split)
    if not files:
        raise InputError(f"no SmolTalk {hub_split} files ({hub_split}-*.parquet or .jsonl) under {from_dir}")
    return files


def _chat_file_rows(path):
    """Yield ("<file> line/row N", messages) for each row of a local SmolTalk file."""
    if path.suffix == ".jsonl":
        for lineno, row in jsonl_rows(path):
            yield f"{path} line {lineno}", row.get("messages", _MISSING)
    else:
        for n, messages in _parquet_column(path, "messages"):
            yield f"{path} row {n}", messages


def _smoltalk_hub_rows(hub_split):
    import datasets  # slow to import, and only this path needs it
    with rank0_first():  # under torchrun rank 0 downloads into the datasets cache, then the others read it there
        ds = datasets.load_dataset(SMOLTALK_ID, split=hub_split)
    for n, messages in enumerate(ds["messages"]):
        yield f"{SMOLTALK_ID}[{hub_split}] row {n}", messages


def validate_messages(messages, where):
    """
    Check one conversation: an optional system message, then user and assistant alternating from user (the chat
    template's rule, checked here so that a bad row is reported with its file and row at load time, not mid-run).
    Returns it as a list of plain {"role", "content"} dicts.
    """
    if messages is _MISSING:
        raise InputError(f"{where}: field 'messages' missing")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: field 'messages' must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"{where}: field 'messages[{i}]' is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InputError(f"{where}: field 'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {role!r}")
        if not isinstance(content, str):
            raise InputError(f"{where}: field 'messages[{i}].content' is not a string")
        turn = i - (messages[0].get("role") == "system")
        expected = "system" if turn < 0 else ("user", "assistant")[turn % 2]
        if role != expected:
            raise InputError(f"{where}: field 'messages[{i}].role' is {role!r}, expected {expected!r} (an optional "
                             f"system message first, then user and assistant alternating)")
        clean.append({"role": role, "content": content})
    return clean
