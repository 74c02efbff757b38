"""
Broken inputs and a missing network as a user meets them on the command line: the tests run stages as
`python -m scripts.X` (and the distributed download as two gloo processes) on small files written here, and check
the exit status, the message and what is left on disk. Nothing here touches the network: URLs point at 127.0.0.1,
at a closed port or at a server the test runs.
"""

import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import ROOT

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, so a connection is refused at once
HH = "Anthropic/hh-rlhf"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def run_module(module, *args, timeout=60, **env):
    """Run `python -m module args` from the repo root, offline switches unset, with `env` added."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# bulk outputs are all or nothing

def test_download_pairs_with_no_kept_pair_exits_1_and_keeps_the_previous_files(tmp_path):
    # catches: a local copy of another schema (every row skipped) replacing the pairs files with empty ones, exit 0
    for subset in HH_SUBSETS:
        for split in ("train", "test"):
            path = tmp_path / "hub" / HH / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as f:  # the columns of another data set
                f.write(json.dumps({"prompt": "\n\nHuman: hi", "response": "hello"}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs_all.jsonl").write_text("previous train\n")
    (data / "pairs_test.jsonl").write_text("previous test\n")

    result = run_module("scripts.kat_download_pairs", "--only=hh", f"--from_dir={tmp_path / 'hub'}",
                        f"--pairs_path={data / 'pairs_all.jsonl'}", f"--test_pairs_path={data / 'pairs_test.jsonl'}",
                        f"--report_dir={tmp_path / 'outs'}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hh-rlhf gave no pair (8 rows skipped: missing_field=8" in result.stderr
    assert f"{tmp_path / 'hub' / HH}/harmless-base/test.jsonl.gz line 1: field 'chosen'" in result.stderr
    assert "Traceback" not in result.stderr
    assert (data / "pairs_all.jsonl").read_text() == "previous train\n"
    assert (data / "pairs_test.jsonl").read_text() == "previous test\n"
    assert sorted(os.listdir(data)) == ["pairs_all.jsonl", "pairs_test.jsonl"]  # no temp file left behind


def test_make_prompts_names_a_missing_pairs_file_and_its_writer(tmp_path):
    # catches: a FileNotFoundError traceback (or an empty prompt set) instead of the path and the command to run
    result = run_module("scripts.kat_make_prompts", f"--pairs_path={tmp_path / 'nope.jsonl'}",
                        f"--out_dir={tmp_path / 'data'}", f"--report_dir={tmp_path / 'outs'}")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"kat_make_prompts: --pairs_path {tmp_path / 'nope.jsonl'} not found; write it "
                                     f"with python -m scripts.kat_download_pairs")
    assert not (tmp_path / "data").exists()


# -----------------------------------------------------------------------------
# the network fails fast

def test_fineweb_without_network_fails_in_seconds_naming_the_offline_ways(tmp_path):
    # catches: no reachability check before downloading, so the run sits through ~2 minutes of retries first
    start = time.time()
    result = run_module("scripts.tok_train", "--source=fineweb", f"--data_dir={tmp_path / 'fineweb'}",
                        f"--out_dir={tmp_path / 'tok'}", HF_ENDPOINT=CLOSED)
    assert time.time() - start < 30
    assert result.returncode != 0
    assert f"cannot reach {CLOSED}/" in result.stderr
    assert "--source=synthetic" in result.stderr and "--source=local --data_dir DIR" in result.stderr
    assert "retry" not in result.stdout + result.stderr


# -----------------------------------------------------------------------------
# distributed I/O: one download, by rank 0

WORKER = """
import json, sys
from nanochat.common import dist_cleanup, dist_init
from nanochat.data import pretrain_documents
rank, world_size, _ = dist_init("cpu")
docs = pretrain_documents("fineweb", "train", data_dir=sys.argv[1], num_shards=2)
json.dump(docs, open(f"{sys.argv[2]}.{rank}", "w"))
dist_cleanup()
"""


def test_fineweb_under_two_ranks_is_downloaded_once_by_rank_0(tmp_path):
    # catches: every rank downloading the same shards at once (twice the traffic, two writers on each .part file)
    shards = []
    for i in range(2):
        pq.write_table(pa.table({"text": [f"shard {i} doc {j}" for j in range(3)]}), tmp_path / f"src{i}.parquet")
        shards.append((tmp_path / f"src{i}.parquet").read_bytes())
    gets = []

    class Shards(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            time.sleep(0.3)  # slow enough that a rank not waiting for rank 0 would ask too
            body = shards[int(self.path.rsplit("_", 1)[1].split(".")[0])]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Shards)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_ENDPOINT=f"http://127.0.0.1:{httpd.server_address[1]}",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    try:
        procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "fineweb"), str(tmp_path / "docs")],
                                  cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE,
                                  text=True) for r in range(2)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(gets) == [f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet"
                            for i in range(2)]
    expected = [f"shard 0 doc {j}" for j in range(3)]  # train is every shard but the last
    assert [json.loads((tmp_path / f"docs.{r}").read_text()) for r in range(2)] == [expected, expected]
