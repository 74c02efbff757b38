"""Tests for nanochat/density.py and scripts/kat_density.py: planted density structure, batch-independent
embeddings, blocked kNN against a numpy brute force, the weight rules, the embedding cache and the whole stage."""

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from nanochat import density
from nanochat.checkpoint import save_checkpoint
from nanochat.common import InputError
from nanochat.synthetic import conversation_id
from nanochat.tokenizer import train_tokenizer
from scripts import kat_density

WORDS = ("red green blue apple river stone cloud seven eleven north south city market island paper "
         "garden winter summer copper silver lantern violin harbour meadow").split()


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(400)]
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(vocab_size=300, sequence_len=64)


def user(text):
    return [{"role": "user", "content": text}]


def numpy_knn(x, k):
    """Reference: the full cosine distance matrix, self set to infinity, a stable full sort of each row."""
    x = np.asarray(x, dtype=np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    np.fill_diagonal(dist, np.inf)
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, axis=1), idx


# -----------------------------------------------------------------------------
# acceptance

def test_sparse_tail_outweighs_dense_cluster():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(32, generator=g)
    dense = centre + 0.02 * torch.randn(300, 32, generator=g)
    sparse = torch.randn(25, 32, generator=g)
    perm = torch.randperm(325, generator=g)  # interleaved, so clusters straddle the kNN blocks
    x, is_sparse = torch.cat([dense, sparse])[perm], perm >= 300
    distances, _ = density.knn(x, 10, block_size=64)
    for kwargs in ({}, {"max_ratio": 10.0}, {"max_ratio": 3.0, "mix": 0.2}, {"alpha": 0.5}):
        w = density.density_weights(density.densities(distances.mean(1)), **kwargs)
        assert w[is_sparse].min() > w[~is_sparse].max(), kwargs
        assert abs(w.mean().item() - 1) < 1e-6


def test_prompt_embedding_does_not_depend_on_its_batch(model, tok):
    short = user("red apple")
    long = user(" ".join(WORDS * 2))
    alone = density.embed_prompts(model, tok, [short])
    batched = density.embed_prompts(model, tok, [long, short, user("blue river stone")], batch_size=3)
    assert torch.allclose(alone[0], batched[1], atol=1e-5, rtol=0)
    # independent of the pooling code: the model on the prompt alone, averaged over its positions
    ids = torch.tensor(tok.render_for_completion(short))[None]
    with torch.no_grad():
        expected = model.hidden_states(ids)[0].mean(0)
    assert torch.allclose(alone[0], expected, atol=1e-5, rtol=0)


def test_blocked_knn_equals_brute_force():
    x = torch.randn(301, 16, generator=torch.Generator().manual_seed(1))
    ref_dist, ref_idx = numpy_knn(x.numpy(), 7)
    for block_size in (3, 64, 100, 4096):  # tiles narrower than k, ragged last block, a single block
        dist, idx = density.knn(x, 7, block_size=block_size)
        assert np.array_equal(idx.numpy(), ref_idx), block_size
        assert np.allclose(dist.numpy(), ref_dist, atol=1e-5), block_size


def test_knn_to_training_prompts_equals_brute_force():
    # catches: a held-out prompt measured against its own set instead of the training prompts, a tile merge that
    # drops candidates (block narrower than k, ragged last block), self-exclusion applied to unrelated indices
    g = torch.Generator().manual_seed(2)
    keys, queries = torch.randn(123, 16, generator=g), torch.randn(37, 16, generator=g)
    unit = lambda x: x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)  # noqa: E731
    dist = 1.0 - unit(queries) @ unit(keys).T
    ref_idx = np.argsort(dist, axis=1, kind="stable")[:, :5]
    for block_size in (3, 50, 4096):
        d, idx = density.knn_to(queries, keys, 5, block_size=block_size)
        assert np.array_equal(idx.numpy(), ref_idx), block_size
        assert np.allclose(d.numpy(), np.take_along_axis(dist, ref_idx, axis=1), atol=1e-5), block_size
    # a query equal to a key is at distance 0 from it: nothing is excluded as "self"
    d, idx = density.knn_to(keys[:4], keys, 1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3] and d.max() < 1e-5
    with pytest.raises(ValueError, match="k=124"):
        density.knn_to(queries, keys, 124)


def test_quartiles_follow_the_training_edges():
    # catches: quartiles re-taken among the queried densities, and a reversed order (q1 must be the sparsest)
    train = torch.arange(1.0, 101.0)
    edges = density.quartile_edges(train)
    assert edges == pytest.approx([25.75, 50.5, 75.25])
    assert density.density_quartiles(torch.tensor([1.0, 30.0, 60.0, 99.0, 1000.0]), edges) == \
        ["q1", "q2", "q3", "q4", "q4"]
    # a held-out set that is all sparse stays all q1: its own quartiles would spread it over q1..q4
    assert density.density_quartiles(torch.tensor([2.0, 3.0, 4.0, 5.0]), edges) == ["q1"] * 4


def test_weights_have_mean_one():
    d = torch.rand(1001, generator=torch.Generator().manual_seed(2)).mul(50).add(0.1)
    for kwargs in ({}, {"alpha": 2.0}, {"max_ratio": 5.0}, {"mix": 0.3}, {"alpha": 0.7, "max_ratio": 2.0, "mix": 0.5}):
        assert abs(density.density_weights(d, **kwargs).mean().item() - 1) < 1e-6, kwargs


# -----------------------------------------------------------------------------
# kNN details

def test_exact_duplicates_are_neighbours_at_distance_zero():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    x[25] = x[5]
    x[30] = 3 * x[12]  # same direction: cosine distance 0 too
    dist, idx = density.knn(x, 3, block_size=16)
    assert idx[5, 0] == 25 and idx[25, 0] == 5 and idx[12, 0] == 30 and idx[30, 0] == 12
    assert dist[5, 0] == 0 and dist[30, 0] < 1e-6 and (dist >= 0).all()
    assert not (idx == torch.arange(40)[:, None]).any()
    assert density.densities(dist[:, :1].mean(1))[5] == pytest.approx(1 / density.DENSITY_EPS)


def test_knn_rejects_impossible_k():
    with pytest.raises(ValueError, match="k <= N - 1"):
        density.knn(torch.randn(5, 4), 5)


# -----------------------------------------------------------------------------
# weights

def test_alpha_zero_is_uniform_and_weights_follow_the_power_law():
    d = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert torch.equal(density.density_weights(d, alpha=0.0), torch.ones(4, dtype=torch.float64))
    w = density.density_weights(d, alpha=1.0)
    # w ~ 1/d, mean 1: 1/d = [1, .5, .25, .125] sums to 1.875
    assert torch.allclose(w, torch.tensor([1, 0.5, 0.25, 0.125], dtype=torch.float64) * 4 / 1.875)


def test_max_ratio_caps_weights_at_a_multiple_of_the_median():
    d = torch.logspace(-3, 3, 501, dtype=torch.float64)
    w = density.density_weights(d, alpha=1.0, max_ratio=4.0)
    assert (w.max() / w.median()).item() == pytest.approx(4.0)  # the sparse half is capped
    mixed = density.density_weights(d, alpha=1.0, max_ratio=4.0, mix=0.25)
    assert 1 < mixed.max() / mixed.median() <= 4.0
    uncapped = density.density_weights(d, alpha=1.0)
    assert uncapped.max() / uncapped.median() > 100
    with pytest.raises(ValueError):
        density.density_weights(d, max_ratio=0.5)


def test_mix_blends_with_uniform():
    d = torch.tensor([1.0, 3.0])
    w0 = density.density_weights(d)
    assert torch.allclose(density.density_weights(d, mix=0.4), 0.6 * w0 + 0.4)
    assert torch.allclose(density.density_weights(d, mix=1.0), torch.ones(2, dtype=torch.float64))


def test_effective_sample_size():
    assert density.effective_sample_size(torch.ones(123)) == pytest.approx(123)
    assert density.effective_sample_size(torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1)
    assert density.effective_sample_size(torch.tensor([1.0, 3.0])) == pytest.approx(16 / 10)


def test_sample_indices_and_pair_weights():
    w = torch.tensor([1.0, 0.0, 3.0])
    a = density.sample_indices(w, 20000, torch.Generator().manual_seed(0))
    b = density.sample_indices(w, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a != 1).all()
    assert (a == 2).float().mean().item() == pytest.approx(0.75, abs=0.02)
    pw = density.pair_weights(["p", "q", "p"], {"p": 2.0, "q": 1.0})
    assert torch.equal(pw, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(InputError, match="no weight for 1 of the 2 prompts of these rows .first: r."):
        density.pair_weights(["p", "r"], {"p": 1.0})


def test_load_density_names_the_bad_line(tmp_path):
    path = tmp_path / "density.jsonl"
    path.write_text('{"prompt_id": "a", "weight": 0.5}\n\n{"prompt_id": "b"}\n')
    with pytest.raises(ValueError, match=r"line 3: missing field 'weight'"):
        density.load_density(path)
    path.write_text('{"prompt_id": "a", "weight": 0.5}\n["b", 1.5]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object"):
        density.load_density(path)
    with pytest.raises(InputError, match="not found; write it with python -m scripts.kat_density"):
        density.load_density(tmp_path / "missing.jsonl")
    path.write_text('{"prompt_id": "a", "weight": 0.5}\n{"prompt_id": "b", "weight": 1.5}\n')
    assert density.load_density(path) == {"a": 0.5, "b": 1.5}


def test_density_file_problems_name_the_file_and_line(tmp_path):
    # catches: a UnicodeDecodeError without a place, and weights that cannot be sampled reaching torch.multinomial
    path = tmp_path / "density.jsonl"
    path.write_bytes(b'{"prompt_id": "a", "weight": 1.0}\n{"prompt_id": "b\xff", "weight": 1.0}\n')
    with pytest.raises(InputError, match=f"^{path} line 2: byte 17 of the line .0xff. is not UTF-8"):
        density.load_density(path)
    path.write_text("\n")
    with pytest.raises(InputError, match=f"^{path} has no rows; write it again with python -m scripts.kat_density"):
        density.load_density(path)
    path.write_text('{"prompt_id": "a", "weight": 0}\n{"prompt_id": "b", "weight": 0.0}\n')
    with pytest.raises(InputError, match=f"^{path}: all 2 weights are 0, so no prompt can be sampled"):
        density.load_density(path)

    path.write_text('{"prompt_id": "a", "weight": 0}\n{"prompt_id": "b", "weight": 2.0}\n')
    weights = density.load_density(path)
    with pytest.raises(InputError, match=f"^{path} has a weight for none of the 2 prompts of these rows .it was "
                                         f"computed for other prompts.; rerun python -m scripts.kat_make_prompts"):
        density.pair_weights(["x", "y", "x"], weights)
    with pytest.raises(InputError, match=f"^{path}: the 1 prompt.s. of these rows all have weight 0"):
        density.pair_weights(["a", "a"], weights)
    assert density.pair_weights(["a", "b"], weights).tolist() == [0.0, 2.0]


# -----------------------------------------------------------------------------
# compute_density and its cache

def prompts_of(texts):
    return [{"id": f"{i:016x}", "prompt": t, "messages": user(t)} for i, t in enumerate(texts)]


def test_max_len_keeps_bos_and_the_end_of_the_prompt(tok):
    full = tok.render_for_completion(user(" ".join(WORDS)))
    assert density.render_prompts(tok, [user(" ".join(WORDS))], 5) == [[tok.bos_token_id] + full[-4:]]


def test_embedding_cache_reused_when_identical_and_rebuilt_when_prompts_change(tmp_path, model, tok, monkeypatch,
                                                                               capsys):
    calls = []
    real = density.embed_token_ids
    monkeypatch.setattr(density, "embed_token_ids", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    prompts = prompts_of([" ".join(WORDS[i:i + 4]) for i in range(12)])
    first = density.compute_density(model, tok, prompts, k=3, cache_dir=tmp_path)
    again = density.compute_density(model, tok, prompts, k=3, cache_dir=tmp_path)
    assert len(calls) == 1 and not first["cache_hit"] and again["cache_hit"]
    assert torch.equal(first["embeddings"], again["embeddings"]) and torch.equal(first["weight"], again["weight"])

    fewer = density.compute_density(model, tok, prompts[1:], k=3, cache_dir=tmp_path)
    assert len(calls) == 2 and not fewer["cache_hit"] and "rebuilding" in capsys.readouterr().out
    assert torch.allclose(fewer["embeddings"], first["embeddings"][1:], atol=1e-5)

    # same ids, different text (and so tokens): the ids alone must not vouch for the cache
    edited = [dict(p) for p in prompts[1:]]
    edited[0]["messages"] = user("violin harbour")
    assert not density.compute_density(model, tok, edited, k=3, cache_dir=tmp_path)["cache_hit"]
    assert len(calls) == 3

    (cache_file,) = tmp_path.glob("density_embeddings_*.pt")
    cache_file.write_bytes(b"truncated")
    assert not density.compute_density(model, tok, edited, k=3, cache_dir=tmp_path)["cache_hit"]
    assert len(calls) == 4


def test_too_few_prompts(model, tok, capsys):
    result = density.compute_density(model, tok, prompts_of(["a b", "c d", "e f"]), k=10)
    assert result["k"] == 2 and "warning" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least 2 prompts"):
        density.compute_density(model, tok, prompts_of(["a b"]), k=10)


# -----------------------------------------------------------------------------
# the script

def test_script_end_to_end(tmp_path, model, tok):
    tok.save(tmp_path / "tok")
    save_checkpoint(tmp_path / "sft", model, step=0, tokenizer_dir=str(tmp_path / "tok"))
    rng = np.random.default_rng(1)
    dense = [f"what colour is the {w} apple" for w in ("red", "green", "blue", "red", "green", "blue")] * 3
    sparse = [" ".join(rng.choice(WORDS, 9)) for _ in range(4)]
    prompts = prompts_of(dense + sparse)
    for p in prompts[1:]:
        p["src"] = "synthetic"
    prompts_path = tmp_path / "prompts_all.jsonl"
    prompts_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    pairs_path = tmp_path / "pairs_all.jsonl"
    pairs_path.write_text("".join(json.dumps({"prompt_id": p["id"], "cluster": "colour" if i < 18 else "tail"})
                                  + "\n" for i, p in enumerate(prompts)) + "not json\n")
    # held out: a copy of a dense question (rare nowhere) and a random word salad (rare in training)
    heldout = prompts_of(["what colour is the red apple", " ".join(rng.choice(WORDS, 9))])
    test_pairs_path = tmp_path / "pairs_test.jsonl"
    test_pairs_path.write_text("".join(json.dumps({"id": f"t{i}", "prompt_id": conversation_id(p["messages"]),
                                                   "prompt": p["messages"][-1]["content"], "messages": p["messages"],
                                                   "chosen": "yes", "rejected": "no", "src": "synthetic"}) + "\n"
                                       for i, p in enumerate(heldout)))
    out, out_test = tmp_path / "density.jsonl", tmp_path / "density_test.jsonl"
    argv = [f"--prompts_path={prompts_path}", f"--pairs_path={pairs_path}", f"--sft_ckpt_path={tmp_path / 'sft'}",
            "--density_k=3", "--density_max_ratio=0", f"--cache_dir={tmp_path}", f"--density_path={out}",
            f"--test_pairs_path={test_pairs_path}", f"--test_density_path={out_test}",
            f"--report_dir={tmp_path / 'outs' / 'density'}", "--device=cpu"]
    kat_density.main(argv)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [p["id"] for p in prompts]
    weights = torch.tensor([r["weight"] for r in rows], dtype=torch.float64)
    assert abs(weights.mean().item() - 1) < 1e-6
    # the repeated questions are exact duplicates of each other: the densest prompts, the lowest weights
    assert weights[18:].min() > weights[:18].max()
    assert all(r["density"] == pytest.approx(1 / (r["knn_mean_distance"] + density.DENSITY_EPS)) for r in rows)
    assert density.load_density(out) == {r["prompt_id"]: r["weight"] for r in rows}
    assert [r["quartile"] for r in rows[18:]] == ["q1"] * 4 and "q1" not in {r["quartile"] for r in rows[:18]}

    # held-out prompts: density among the TRAINING prompts (brute force here), quartile by the training edges
    test_rows = [json.loads(line) for line in out_test.read_text().splitlines()]
    assert [r["prompt_id"] for r in test_rows] == [conversation_id(p["messages"]) for p in heldout]
    assert [r["quartile"] for r in test_rows] == ["q4", "q1"]
    train_emb = density.embed_prompts(model, tok, [p["messages"] for p in prompts], max_len=256)
    test_emb = density.embed_prompts(model, tok, [p["messages"] for p in heldout], max_len=256)
    unit = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)  # noqa: E731
    nearest = (1 - unit(test_emb) @ unit(train_emb).T).sort(dim=1).values[:, :3].mean(1)
    assert [r["knn_mean_distance"] for r in test_rows] == pytest.approx(nearest.tolist(), abs=1e-5)

    # the sidecar names the model; weights built from another model are refused
    meta = density.read_density_meta(out)
    assert meta["k"] == 3 and meta["sft_ckpt_path"].endswith("ckpt.pt")
    assert density.check_density_model(out, model, "sft")["model_fingerprint"] == meta["model_fingerprint"]
    with pytest.raises(InputError, match="was built from the embeddings of .* whose weights differ from other"):
        density.check_density_model(out, make_tiny_model(seed=5, vocab_size=300, sequence_len=64), "other")

    report = (tmp_path / "outs" / "density" / "report.md").read_text()
    for expected in ("Weight histogram", "Densest prompts", "Sparsest prompts", "| colour | 18 |", "| tail | 4 |",
                     "ess_fraction", "1 lines of"):
        assert expected in report, expected
    assert (tmp_path / "outs" / "report.md").exists()

    result = kat_density.main(argv)  # unchanged prompts and model: embeddings come from the cache
    assert result["cache_hit"] and out.read_text().splitlines() == [json.dumps(r) for r in rows]


def test_script_errors_name_the_line(tmp_path):
    path = tmp_path / "prompts_all.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": user("x")}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(SystemExit, match="line 2: field 'messages'"):
        kat_density.main([f"--prompts_path={path}"])
    path.write_text("".join(json.dumps({"id": "a", "messages": user(t)}) + "\n" for t in ("x", "y")))
    with pytest.raises(SystemExit, match="line 2: id a already on line 1"):
        kat_density.main([f"--prompts_path={path}"])
    path.write_text(json.dumps({"id": "a", "messages": user("x")}) + "\n{\"id\": \n")
    with pytest.raises(SystemExit, match="kat_density: .* line 2: invalid JSON"):
        kat_density.main([f"--prompts_path={path}"])
    path.write_bytes(json.dumps({"id": "a", "messages": user("x")}).encode() + b"\n\xff\n")
    with pytest.raises(SystemExit, match=f"kat_density: {path} line 2: byte 1 of the line .0xff. is not UTF-8"):
        kat_density.main([f"--prompts_path={path}"])
