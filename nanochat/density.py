"""
Density-aware prompt weights: sample a prompt inversely to how crowded its neighbourhood is in embedding space, so a
long sparse tail of rare prompts is not drowned by a few dense clusters of near-duplicates.

Pipeline (`compute_density` runs it; scripts/kat_density.py writes its weights to density.jsonl, the one source of
weights that RM, DPO and GRPO read back with `load_density`, and `check_density_meta` refuses a file built from
another SFT model or prompt set):

1. `embed_prompts`: the model's own final normed hidden states, mean-pooled over the real tokens of the
   chat-rendered prompt (`tok.render_for_completion`, cut to max_len by nanochat/batching.py's `cut_left`, which
   keeps <|bos|>). Rows are right-padded; attention is causal, so a real token never sees the pads after it and a
   prompt's embedding does not depend on its batch.
2. `knn`: the k nearest neighbours of every prompt by cosine distance (1 - cos), in tiles of block x block, so
   memory is O(block^2 + N k), never N x N, and symmetry halves the work. Self is excluded by index, not by
   distance, so an exact duplicate still counts as a neighbour at distance 0.
3. `densities`: 1 / (mean distance to the k neighbours + eps).
4. `density_weights`: w proportional to density^-alpha, capped at max_ratio x median, mixed with uniform, mean 1.

Held-out prompts get the density of the training distribution, not of their own set: `knn_to` finds each one's k
nearest TRAINING prompts (same embedding, same k), and `density_quartiles` places it among the training prompts'
density quartiles (q1 = sparsest), so "rare" in a report means rare where the weights were built.

Embeddings are cached in `cache_dir` as density_embeddings_<model fingerprint>.pt together with the prompt ids and
a digest of every token fed to the model; a cache whose ids or tokens differ from this run's is rebuilt (with a
printed note), never reused.
"""

import hashlib
import json
import math
import os
import time

import torch

from nanochat.batching import cut_left, pad_right
from nanochat.common import InputError, atomic_path, print0
from nanochat.data import jsonl_rows

# Exact duplicates sit at mean distance 0: eps makes their density a finite 1/eps instead of inf, so alpha > 0 gives
# them the smallest weights instead of NaN. 1e-4 is ~1000x the fp32 rounding of a cosine (~1e-7), so duplicates get
# the same density however their rounding falls, and well below the distances that tell two different prompts apart.
DENSITY_EPS = 1e-4


# -----------------------------------------------------------------------------
# embeddings

def render_prompts(tok, conversations, max_len):
    """
    Token ids of each conversation ready for the reply, at most max_len of them: <|bos|> and the end, which holds
    the question being answered and <|assistant_start|> (older turns are dropped).
    """
    return [cut_left(tok.render_for_completion(messages), max_len) for messages in conversations]


@torch.no_grad()
def embed_token_ids(model, rendered, batch_size=64):
    """(N, C) fp32 mean-pooled final hidden states of lists of token ids, in input order, on the CPU."""
    device = next(model.parameters()).device
    out = torch.empty(len(rendered), model.config.n_embd, dtype=torch.float32)
    # longest first, so each batch holds similar lengths and padding costs little
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        idx, real = pad_right([rendered[i] for i in rows], pad_id=0)
        idx, real = idx.to(device), real.to(device).float()
        h = model.hidden_states(idx).float()
        pooled = (h * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)
        out[torch.tensor(rows)] = pooled.cpu()
    return out


def embed_prompts(model, tok, conversations, batch_size=64, max_len=None):
    """
    (N, C) fp32 embeddings of conversations (lists of {"role", "content"} ending on a user turn), in input order.
    max_len defaults to the model's training context.
    """
    rendered = render_prompts(tok, conversations, max_len or model.config.sequence_len)
    return embed_token_ids(model, rendered, batch_size)


# -----------------------------------------------------------------------------
# nearest neighbours, densities, weights

def _merge_topk(best_sims, best_idx, row0, sims, col0):
    """Fold a tile of similarities (rows row0.., columns col0..) into the running top k of its rows."""
    k = best_sims.size(1)
    top = sims.topk(min(k, sims.size(1)), dim=1)
    rows = slice(row0, row0 + sims.size(0))
    merged = torch.cat([best_sims[rows], top.values], 1).topk(k, dim=1)
    best_idx[rows] = torch.cat([best_idx[rows], top.indices + col0], 1).gather(1, merged.indices)
    best_sims[rows] = merged.values


@torch.no_grad()
def knn(embeddings, k, block_size=2048):
    """
    (distances (N, k), indices (N, k)) of each row's k nearest other rows by cosine distance 1 - cos, nearest
    first, on the embeddings' device. The similarity matrix is computed one block x block tile at a time and only
    its upper triangle: a tile serves its rows' top k and, transposed, its columns'. Memory is one tile plus the
    running top k of every row; the matmul work is half of the full N x N product.
    """
    n = embeddings.size(0)
    if not 1 <= k <= n - 1:
        raise ValueError(f"knn needs 1 <= k <= N - 1, got k={k} for N={n}")
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    # placeholders at -inf lose every merge: each row meets N - 1 >= k real neighbours
    best_sims = torch.full((n, k), float("-inf"), device=x.device)
    best_idx = torch.zeros(n, k, dtype=torch.long, device=x.device)
    for q0 in range(0, n, block_size):
        q = x[q0:q0 + block_size]
        for k0 in range(q0, n, block_size):
            sims = q @ x[k0:k0 + block_size].T
            if k0 == q0:  # the tile holding each query's own row, on its diagonal; it is its own transpose
                sims.diagonal().fill_(float("-inf"))
            else:  # topk along rows of a contiguous copy is ~3x faster on CPU than along the columns in place
                _merge_topk(best_sims, best_idx, k0, sims.T.contiguous(), q0)
            _merge_topk(best_sims, best_idx, q0, sims, k0)
    # rounding can put a duplicate's cosine a hair above 1; distances are never negative
    return (1 - best_sims).clamp_(min=0), best_idx


@torch.no_grad()
def knn_to(queries, keys, k, block_size=2048):
    """
    (distances (Nq, k), indices into keys (Nq, k)) of each query's k nearest keys by cosine distance, nearest first:
    the kNN of held-out prompts among the training prompts. The queries are not among the keys, so nothing is
    excluded. Memory is one block x block tile plus the running top k.
    """
    if not 1 <= k <= keys.size(0):
        raise ValueError(f"knn_to needs 1 <= k <= number of keys, got k={k} for {keys.size(0)} keys")
    q_all = torch.nn.functional.normalize(queries.float(), dim=1)
    x = torch.nn.functional.normalize(keys.float(), dim=1).to(q_all.device)
    best_sims = torch.full((q_all.size(0), k), float("-inf"), device=q_all.device)
    best_idx = torch.zeros(q_all.size(0), k, dtype=torch.long, device=q_all.device)
    for q0 in range(0, q_all.size(0), block_size):
        for k0 in range(0, x.size(0), block_size):
            _merge_topk(best_sims, best_idx, q0, q_all[q0:q0 + block_size] @ x[k0:k0 + block_size].T, k0)
    return (1 - best_sims).clamp_(min=0), best_idx


def densities(mean_knn_distance, eps=DENSITY_EPS):
    """Density 1 / (mean kNN distance + eps); see DENSITY_EPS for why eps."""
    return 1.0 / (mean_knn_distance.double() + eps)


def density_weights(density, alpha=1.0, max_ratio=None, mix=0.0):
    """
    Sampling weights (float64, mean exactly 1): w proportional to density^-alpha (alpha 0 is uniform), capped at
    max_ratio x median(w) when max_ratio is set, then (1 - mix) w + mix (uniform share `mix`). The cap survives
    the mix: mixing with 1 can only pull max/median towards 1.
    """
    if max_ratio is not None and max_ratio < 1:
        raise ValueError(f"max_ratio caps weights at a multiple of the median: it must be >= 1, got {max_ratio}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix is the uniform share of the weights: it must be in [0, 1], got {mix}")
    log_density = density.double().log()
    if not torch.isfinite(log_density).all():
        raise ValueError("densities must be positive and finite")
    # in log space relative to the median, so no alpha or density range can overflow fp64
    w = torch.exp(-alpha * (log_density - log_density.median()))
    if max_ratio is not None:
        w = w.clamp(max=max_ratio * w.median().item())
    w = w / w.mean()
    w = (1 - mix) * w + mix
    return w / w.mean()


def effective_sample_size(weights):
    """Kish's ESS, (sum w)^2 / sum w^2: N for uniform weights, 1 when one prompt takes all the mass."""
    w = weights.double()
    return (w.sum() ** 2 / (w * w).sum()).item()


def weight_stats(weights):
    w = weights.double()
    ess = effective_sample_size(w)
    return {"ess": ess, "ess_fraction": ess / len(w), "weight_min": w.min().item(),
            "weight_median": w.median().item(), "weight_max": w.max().item()}


def weight_histogram(weights, width=40):
    """Text histogram of weights in power-of-two bins (weights span orders of magnitude)."""
    w = weights.double()
    exponents = torch.floor(torch.log2(w.clamp(min=1e-300))).long()  # a weight can underflow to 0 at huge alpha
    counts = torch.bincount(exponents - exponents.min())
    lines = []
    for offset, count in enumerate(counts.tolist()):
        e = exponents.min().item() + offset
        bar = "#" * math.ceil(width * count / counts.max().item()) if count else ""
        lines.append(f"[{2.0 ** e:>9.4g}, {2.0 ** (e + 1):>9.4g})  {count:>8d}  {bar}")
    return "\n".join(lines)


QUARTILES = ("q1", "q2", "q3", "q4")  # q1 = sparsest (rare) .. q4 = densest


def quartile_edges(density):
    """The 25th, 50th and 75th percentiles of the training prompts' densities."""
    return torch.quantile(density.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()


def density_quartiles(density, edges):
    """"q1" (sparsest) .. "q4" (densest) of each density, by the training prompts' quartile `edges`."""
    index = torch.searchsorted(torch.tensor(edges, dtype=torch.float64), density.double(), right=True)
    return [QUARTILES[i] for i in index.tolist()]


# -----------------------------------------------------------------------------
# the whole computation, with its embedding cache

def model_fingerprint(model):
    """sha256 of the model's weights (names, dtypes, shapes, bytes): equal exactly when the function is."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokens_digest(rendered):
    h = hashlib.sha256()
    for ids in rendered:
        h.update(json.dumps(ids).encode() + b"\n")
    return h.hexdigest()


def cached_embeddings(model, rendered, prompt_ids, cache_dir, model_id=None, batch_size=64):
    """
    Embeddings of the rendered prompts, read from cache_dir when its file was made from exactly these prompt ids
    and token ids by this model, else computed and saved. Returns (embeddings, cache_hit).
    """
    model_id = model_id or model_fingerprint(model)
    path = os.path.join(cache_dir, f"density_embeddings_{hashlib.sha256(model_id.encode()).hexdigest()[:16]}.pt")
    key = {"model_id": model_id, "prompt_ids": list(prompt_ids), "tokens_digest": _tokens_digest(rendered)}
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            stale = [name for name, value in key.items() if cached.get(name) != value]
        except Exception as e:  # a truncated or foreign file is rebuilt like a stale one
            stale = [f"unreadable ({type(e).__name__})"]
        if not stale:
            return cached["embeddings"], True
        print0(f"density: embedding cache {path} does not match these prompts ({', '.join(stale)} differ); rebuilding")
    embeddings = embed_token_ids(model, rendered, batch_size)
    with atomic_path(path) as tmp:
        torch.save({**key, "embeddings": embeddings}, tmp)
    return embeddings, False


def compute_density(model, tok, prompts, k=10, alpha=1.0, max_ratio=None, mix=0.0, cache_dir=None, model_id=None,
                    batch_size=64, max_len=None, block_size=2048):
    """
    Embed (cached when cache_dir is given), kNN and weigh `prompts`, dicts with "id" and "messages". The kNN runs
    on the model's device. k above N - 1 is lowered to N - 1 with a warning. Returns a dict of CPU tensors in
    prompt order: embeddings, knn_distances, knn_indices, knn_mean_distance, density, weight; plus k, cache_hit,
    weight_stats and timings.
    """
    n = len(prompts)
    if n < 2:
        raise ValueError(f"density needs at least 2 prompts to have neighbours, got {n}")
    if k > n - 1:
        print0(f"density: warning: k={k} but only {n} prompts; using k={n - 1}")
        k = n - 1
    t0 = time.perf_counter()
    rendered = render_prompts(tok, [p["messages"] for p in prompts], max_len or model.config.sequence_len)
    if cache_dir is None:
        embeddings, cache_hit = embed_token_ids(model, rendered, batch_size), False
    else:
        embeddings, cache_hit = cached_embeddings(model, rendered, [p["id"] for p in prompts], cache_dir, model_id,
                                                  batch_size)
    t1 = time.perf_counter()
    device = next(model.parameters()).device
    distances, indices = knn(embeddings.to(device), k, block_size)
    distances, indices = distances.cpu(), indices.cpu()
    mean_distance = distances.double().mean(1)
    density = densities(mean_distance)
    weight = density_weights(density, alpha, max_ratio, mix)
    timings = {"embed_seconds": t1 - t0, "knn_and_weights_seconds": time.perf_counter() - t1}
    return {"embeddings": embeddings, "knn_distances": distances, "knn_indices": indices,
            "knn_mean_distance": mean_distance, "density": density, "weight": weight, "k": k,
            "cache_hit": cache_hit, "weight_stats": weight_stats(weight), "timings": timings}


# -----------------------------------------------------------------------------
# reading density.jsonl back (RM, DPO, their metrics and the diversity report)

DENSITY_WRITER = "python -m scripts.kat_density"


def density_rows(path, numbers=("weight",)):
    """
    Yield (line number, row) of a density.jsonl (or, numbers=("density", "knn_mean_distance"), a density_test.jsonl)
    written by scripts.kat_density, each row with a unique string prompt_id and the fields `numbers` finite numbers
    >= 0. A missing or empty file, or a bad line (not UTF-8, not JSON, a missing or bad field), raises InputError
    naming the file, line and field.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path} not found; write it with {DENSITY_WRITER} (or sample uniformly: "
                         f"--density_aware=False)")
    seen = set()
    for lineno, row in jsonl_rows(path):
        for field in ("prompt_id", *numbers):
            if field not in row:
                raise InputError(f"{path} line {lineno}: missing field {field!r}; write the file again with "
                                 f"{DENSITY_WRITER}")
        if not isinstance(row["prompt_id"], str):
            raise InputError(f"{path} line {lineno}: field 'prompt_id' must be a string, got {row['prompt_id']!r}")
        for field in numbers:
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or not math.isfinite(value):
                raise InputError(f"{path} line {lineno}: field {field!r} must be a finite number >= 0, got {value!r}")
        if row["prompt_id"] in seen:
            raise InputError(f"{path} line {lineno}: prompt_id {row['prompt_id']!r} appears twice")
        seen.add(row["prompt_id"])
        yield lineno, row
    if not seen:
        raise InputError(f"{path} has no rows; write it again with {DENSITY_WRITER}")


def meta_path(density_path):
    """The sidecar of a density.jsonl that says how it was built: density.jsonl -> density.meta.json."""
    return os.path.splitext(density_path)[0] + ".meta.json"


def read_density_meta(density_path):
    """The sidecar's dict (sft_ckpt_path, model_fingerprint, k, alpha, max_ratio, mix, max_len, quartile_edges, ...)."""
    path = meta_path(density_path)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path} not found (it says which model built {density_path}); write both again with "
                         f"{DENSITY_WRITER}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e}); write it again with {DENSITY_WRITER}") from None
    missing = [key for key in ("model_fingerprint", "sft_ckpt_path", "k") if key not in meta]
    if not isinstance(meta, dict) or missing:
        raise InputError(f"{path}: missing {', '.join(missing) or 'everything'}; write it again with "
                         f"{DENSITY_WRITER}")
    return meta


def check_density_model(density_path, model, ckpt_path):
    """
    The sidecar of density_path, after checking that its weights were built from the embeddings of exactly this
    model (the SFT checkpoint at ckpt_path): weights of another model are another experiment.
    """
    meta = read_density_meta(density_path)
    if meta["model_fingerprint"] != model_fingerprint(model):
        raise InputError(f"{density_path} was built from the embeddings of {meta['sft_ckpt_path']}, whose weights "
                         f"differ from {ckpt_path}; write it again with {DENSITY_WRITER} "
                         f"--sft_ckpt_path={ckpt_path}")
    return meta


class DensityWeights(dict):
    """{prompt_id: weight} read from the file `path`, which errors about these weights name."""

    def __init__(self, path, weights):
        super().__init__(weights)
        self.path = path


def load_density(path):
    """
    {prompt_id: weight} (a DensityWeights) of a density.jsonl written by scripts.kat_density; errors name the
    file, line and field, and a file whose weights are all 0 (nothing could be sampled) is an error too.
    """
    weights = DensityWeights(path, ((row["prompt_id"], float(row["weight"])) for _, row in density_rows(path)))
    if not any(weights.values()):
        raise InputError(f"{path}: all {len(weights)} weights are 0, so no prompt can be sampled; write it again "
                         f"with {DENSITY_WRITER}")
    return weights


def read_densities(path):
    """{prompt_id: density} of a density.jsonl, for metrics by density; its rows checked as load_density checks them."""
    densities = {}
    for lineno, row in density_rows(path):
        if not isinstance(row.get("density"), (int, float)):
            raise InputError(f"{path} line {lineno}: field 'density' must be a number")
        densities[row["prompt_id"]] = float(row["density"])
    return densities


def _quartile(path, lineno, row):
    if row.get("quartile") not in QUARTILES:
        raise InputError(f"{path} line {lineno}: field 'quartile' must be one of {', '.join(QUARTILES)}, got "
                         f"{row.get('quartile')!r}; write the file again with {DENSITY_WRITER}")
    return row["quartile"]


def read_quartiles(path):
    """{prompt_id: "q1".."q4"} of a density.jsonl: each training prompt's density quartile (q1 = sparsest)."""
    return {row["prompt_id"]: _quartile(path, lineno, row) for lineno, row in density_rows(path)}


def read_heldout_densities(path):
    """
    {prompt_id: (density, quartile)} of a density_test.jsonl: each held-out prompt's kNN density against the
    training prompts and its quartile among the training prompts' densities; rows checked as density_rows does.
    """
    return {row["prompt_id"]: (float(row["density"]), _quartile(path, lineno, row))
            for lineno, row in density_rows(path, numbers=("density", "knn_mean_distance"))}


def pair_weights(prompt_ids, weight_by_id):
    """
    Per-row weights (float64) for rows keyed by prompt id (e.g. preference pairs), split evenly among the rows of
    a prompt, so sampling rows gives each prompt its own density weight however many rows it has.
    A row whose prompt has no weight is an error, not a silent drop; so are rows whose weights are all 0. Errors
    name the density file when weight_by_id comes from load_density.
    """
    source = getattr(weight_by_id, "path", "the density weights")
    rerun = f"rerun python -m scripts.kat_make_prompts and {DENSITY_WRITER} on the pairs these rows come from"
    distinct = set(prompt_ids)
    missing = sorted(p for p in distinct if p not in weight_by_id)
    if missing and len(missing) == len(distinct):
        raise InputError(f"{source} has a weight for none of the {len(distinct)} prompts of these rows (it was "
                         f"computed for other prompts); {rerun}")
    if missing:
        raise InputError(f"{source} has no weight for {len(missing)} of the {len(distinct)} prompts of these rows "
                         f"(first: {', '.join(missing[:3])}); {rerun}")
    counts = {}
    for p in prompt_ids:
        counts[p] = counts.get(p, 0) + 1
    weights = torch.tensor([weight_by_id[p] / counts[p] for p in prompt_ids], dtype=torch.float64)
    if len(weights) and not weights.sum() > 0:
        raise InputError(f"{source}: the {len(distinct)} prompt(s) of these rows all have weight 0, so none can be "
                         f"sampled; {rerun}")
    return weights


def sample_indices(weights, n, generator=None):
    """n indices drawn with replacement with probability proportional to weights; seeded by `generator`."""
    return torch.multinomial(weights.double(), n, replacement=True, generator=generator)
