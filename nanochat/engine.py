"""
Batched sampling with a KV cache.

`Engine(model).generate(prompts, num_samples=G, ...)` prefills every prompt once (left-padded into one batch),
copies each prompt's cache G times, then decodes all rows together. It returns the sampled ids with their
log-probabilities under the unmodified model (temperature 1, no filtering: what RL's importance ratios need),
a mask of real tokens and each row's finish reason. Rows are prompt-major: row i * G + j is sample j of prompt i.

Filters apply in this order, each on the renormalised output of the previous one:
temperature -> top-k -> min-p (drop tokens below min_p * the top probability) -> top-p (keep the smallest set of
most probable tokens whose mass reaches top_p). A temperature of 0 means argmax. Temperature and top-p are a
float or one value per row.

`decode_hook(hidden, logits) -> (temperature, top_p or None)` chooses them per row at every step from the final
normed hidden states (b, n_embd) and the logits (b, V) that predict the next token: a method that predicts its own
sampling settings (AutoDeco) plugs in here as a plain callable, and the chosen temperatures come back in
`Generation.temperatures`. The hook sees the rows of the decode batch, not all B rows: every row still decoding,
plus any finished ones not dropped yet (below; their samples are discarded). It returns one temperature and top-p
per row it was given, in that order.

Finished rows are dropped from the decode batch once at most `COMPACT_AT` of its rows are still decoding: GRPO's
completion lengths are bimodal (most rows stop early, a few run long), so decoding every row to the end would
spend most of the compute on rows whose samples are thrown away. Dropping rows changes no result: every step still
draws the random numbers of all rows and uses those of the rows left, and each row's arithmetic does not depend
on its neighbours (but see `MIN_ROWS`).

Data parallelism: `global_rows=(first, total)` says that this call samples rows first..first+B of a batch of
`total` rows that other ranks sample the rest of. The random numbers are drawn for all `total` rows and sliced, so
N ranks with the same seed sample exactly what one process sampling the whole batch would.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.common import autocast_ctx
from nanochat.gpt import KVCache

# drop finished rows once at most this share of the decode batch is still decoding; each drop moves the kept rows'
# KV cache. Measured on GRPO-like batches (CPU): 0.5 to 1.0 all about halve generation time; 0.75 makes fewer drops
COMPACT_AT = 0.75
# but keep at least this many rows (finished ones fill up): a single row's matmuls give other last bits than several
# rows' (so results would depend on batch size; see gpt.decode_linear, which pads 2-11 rows to 12), and so few rows
# cost hardly less than 4
MIN_ROWS = 4


@dataclass
class Generation:
    tokens: torch.Tensor     # (B, T) long: sampled ids, 0 after a row finished
    logprobs: torch.Tensor   # (B, T) float: log p(token | context) under the unmodified model, 0 where masked
    mask: torch.Tensor       # (B, T) bool: real tokens, up to and including the stop token
    finish_reasons: list     # per row: "stop" (emitted a stop token) or "length" (hit max_new_tokens)
    num_samples: int
    temperatures: torch.Tensor = None  # (B, T) the decode hook's temperature at each token, when there is a hook

    def completions(self):
        """The real tokens of each row, as lists (stop token included when there was one)."""
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def _per_row(value, B, device, name):
    if not torch.is_tensor(value):
        return torch.full((B,), float(value), device=device)
    value = value.to(device, torch.float32).reshape(-1)
    if value.numel() != B:
        raise ValueError(f"{name} tensor has {value.numel()} entries for {B} rows")
    return value


def _keep_rows(cache, index):
    """
    Keep only rows `index` (ascending) of a KVCache. On CPU the kept rows move to the front of its buffers in place,
    row by row and only their filled slots: several times faster than gathering them into a fresh copy. On a GPU,
    where each row's move would be kernel launches of their own, one gather does it.
    """
    if cache.k.is_cuda:
        cache.k, cache.v, cache.valid = cache.k[:, index], cache.v[:, index], cache.valid[index]
        return
    pos = cache.pos
    for i, j in enumerate(index.tolist()):
        if j != i:  # j > i: row i was dropped or has itself moved down already, so nothing reads it any more
            cache.k[:, i, :, :pos] = cache.k[:, j, :, :pos]
            cache.v[:, i, :, :pos] = cache.v[:, j, :, :pos]
    b = index.numel()
    cache.k, cache.v, cache.valid = cache.k[:, :b], cache.v[:, :b], cache.valid[index]


def _scatter(values, rows, B):
    """Full-size (B,) values from those of the decode batch's rows; 0 for rows dropped from it."""
    if rows.numel() == B:  # no row dropped yet (`rows` is then 0..B-1): the values as they are
        return values
    full = values.new_zeros(B)
    full[rows] = values
    return full


def sample_next(logits, temperature, top_k=None, top_p=None, min_p=None, generator=None, global_rows=None,
                rows=None):
    """
    Sample one token per row from logits (B, V). `temperature` and `top_p` are floats or (B,) tensors;
    `global_rows` as in the module docstring. `rows` (B,) says which rows of the slice the logits hold when some
    were dropped (pass `global_rows` with it, whose `total` counts them all). Returns (tokens (B,), logprobs (B,))
    where logprobs come from the raw logits.
    """
    logits = logits.float()
    B, V = logits.shape
    logprobs = F.log_softmax(logits, dim=-1)
    # only a float temperature skips the random numbers: were it "every row greedy", whether a step draws would
    # depend on which rows are in the batch (dropped ones, other ranks' ones) and later steps would draw others
    if not torch.is_tensor(temperature) and temperature <= 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    if torch.is_tensor(temperature):
        temperature = _per_row(temperature, B, logits.device, "temperature")
        greedy = temperature <= 0
        scaled = logits / temperature.clamp(min=1e-6)[:, None]
    else:  # one positive temperature: no row is greedy, and at 1 the logits are already what dividing would give
        greedy = None
        scaled = logits if temperature == 1.0 else logits / max(temperature, 1e-6)
    if top_k is not None and top_k < V:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p is not None and (torch.is_tensor(top_p) or top_p < 1.0):
        top_p = _per_row(top_p, B, logits.device, "top_p")[:, None]
        probs = probs / probs.sum(dim=-1, keepdim=True)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # inverse-CDF sampling: the first token whose cumulative mass exceeds u. A zero-probability token never
    # exceeds its predecessor, so it is never picked; cheaper than torch.multinomial's exponential draws.
    cdf = probs.cumsum(dim=-1)
    first, total = global_rows or (0, B)
    u = torch.rand(total, 1, device=logits.device, generator=generator)
    u = u[first:first + B] if rows is None else u[first + rows]
    u = u * cdf[:, -1:] * (1 - 1e-6)
    sampled = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=V - 1)
    tokens = sampled if greedy is None else torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class Engine:
    def __init__(self, model):
        self.model = model

    @property
    def device(self):
        return next(self.model.parameters()).device

    # inference mode: no autograd bookkeeping on any op (about a tenth of a batch-1 decode step). What `generate`
    # returns is built outside it (stacked), so it is an ordinary tensor that training can save for backward
    @torch.inference_mode()
    def _decode_steps(self, prompts, num_samples, max_new_tokens, temperature, top_k, top_p, min_p, seed,
                      stop_tokens, decode_hook=None, global_rows=None):
        """
        Yields (tokens, logprobs, active, temperature) per step, each (B,) over all rows (0 for rows dropped from
        the decode batch); `active` marks rows that had not finished before it, `temperature` is the decode hook's
        choice (None without a hook).
        """
        model, device = self.model, self.device
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (render it with a <|bos|> first)")
        vocab_size = model.config.vocab_size
        if any(t < 0 or t >= vocab_size for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
        max_len = max(len(p) for p in prompts)
        if max_len + max_new_tokens > model.rotary_len:
            raise ValueError(f"prompt ({max_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"rotary length {model.rotary_len}")
        idx = torch.zeros(len(prompts), max_len, dtype=torch.long, device=device)
        valid = torch.zeros(len(prompts), max_len, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            idx[i, max_len - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, max_len - len(p):] = True
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cache = KVCache(model.config, len(prompts), max_len + max_new_tokens, device, dtype)
        with autocast_ctx(device):
            hidden = model.hidden_states(idx, cache, valid)[:, -1]
            logits = model.logits_from_hidden(hidden)
        cache.repeat_rows(num_samples)
        hidden, logits = hidden.repeat_interleave(num_samples, dim=0), logits.repeat_interleave(num_samples, dim=0)
        B = logits.size(0)
        if torch.is_tensor(temperature):
            temperature = _per_row(temperature, B, device, "temperature")
        if torch.is_tensor(top_p):
            top_p = _per_row(top_p, B, device, "top_p")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        global_rows = global_rows or (0, B)
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        active = torch.ones(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # the rows in the decode batch (hidden, logits, cache), in order
        weights = model.decode_weights(B)  # a batch of several rows never shrinks to one (MIN_ROWS)
        for step in range(max_new_tokens):
            if decode_hook is not None:
                temperature, top_p = decode_hook(hidden, logits)
            tokens, logprobs = sample_next(logits, temperature, top_k, top_p, min_p, generator, global_rows, rows)
            full_tokens = _scatter(tokens, rows, B)
            chosen = None
            if decode_hook is not None:
                chosen = _scatter(_per_row(temperature, rows.numel(), device, "temperature"), rows, B)
            yield full_tokens, _scatter(logprobs, rows, B), active, chosen
            if step == max_new_tokens - 1:
                return
            if stop.numel():  # without stop tokens no row finishes: no per-token check, no host sync
                active = active & ~torch.isin(full_tokens, stop)  # not in place: the yielded `active` stays as it was
                keep = active[rows]  # every row still decoding is in the decode batch
                kept = keep.sum().item()
                if kept == 0:
                    return
                if kept <= COMPACT_AT * rows.numel() and rows.numel() > MIN_ROWS:
                    keep[(~keep).nonzero().squeeze(1)[:max(0, MIN_ROWS - kept)]] = True  # fill up to MIN_ROWS
                    index = keep.nonzero().squeeze(1)
                    _keep_rows(cache, index)
                    rows, tokens = rows[index], tokens[index]
                    # per-row settings follow their rows (a hook's are replaced at the next step anyway)
                    temperature = temperature[index] if torch.is_tensor(temperature) else temperature
                    top_p = top_p[index] if torch.is_tensor(top_p) else top_p
            with autocast_ctx(device):
                hidden, logits = model.decode_step(tokens, cache, weights)

    def generate(self, prompts, num_samples=1, max_new_tokens=64, temperature=1.0, top_k=None, top_p=None,
                 min_p=None, seed=None, stop_tokens=(), decode_hook=None, global_rows=None):
        """Sample `num_samples` completions for each prompt (a list of token id lists). Returns a Generation."""
        steps = list(self._decode_steps(prompts, num_samples, max_new_tokens, temperature, top_k, top_p, min_p,
                                        seed, stop_tokens, decode_hook, global_rows))
        rows = len(prompts) * num_samples
        if not steps:
            empty = torch.zeros(rows, 0, dtype=torch.long, device=self.device)
            return Generation(empty, empty.float(), empty.bool(), ["length"] * rows, num_samples)
        mask = torch.stack([a for _, _, a, _ in steps], dim=1)
        tokens = torch.stack([t for t, _, _, _ in steps], dim=1) * mask
        logprobs = torch.stack([lp for _, lp, _, _ in steps], dim=1) * mask
        temperatures = None
        if decode_hook is not None:
            temperatures = torch.stack([_per_row(t, rows, self.device, "temperature") for *_, t in steps], 1) * mask
        stopped = torch.isin(tokens, torch.tensor(sorted(set(stop_tokens)), dtype=torch.long,
                                                  device=self.device)) & mask
        reasons = ["stop" if s else "length" for s in stopped.any(dim=1).tolist()]
        return Generation(tokens, logprobs, mask, reasons, num_samples, temperatures)

    def stream(self, prompt, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None,
               stop_tokens=(), decode_hook=None):
        """Yield the token ids of one completion as they are sampled; a stop token ends it and is not yielded."""
        stop = set(stop_tokens)
        for tokens, *_ in self._decode_steps([prompt], 1, max_new_tokens, temperature, top_k, top_p, min_p, seed,
                                             stop_tokens, decode_hook):
            token = tokens[0].item()
            if token in stop:
                return
            yield token
