"""
The GPT: a modern small transformer in one file.

- rotary position embeddings, no learned positions
- QK-norm, parameter-free RMSNorm everywhere (no learnable gains), no biases
- ReLU^2 MLP, untied token embedding and LM head, optional GQA (n_kv_head < n_head)
- logit soft-capping, zero-initialised output projections (each block starts as the identity)
- one `depth` dial: width = 64 * depth, heads of 64 dims (see `config_from_depth`)

Hidden states for other methods (reward model, density embeddings, AutoDeco heads): `model.hidden_states(idx)`
returns the final normed hidden states (B, T, n_embd), the exact tensor the LM head reads. `forward` is
`lm_head(hidden_states(idx))`, so there is one copy of the model code. `hidden_states(idx, at=...)` returns only one
position per row (the reward model's end token): the last block then runs its query, attention output and MLP for
that position alone (its keys and values still cover every position), a sixth of the work of a depth-4 model saved
and the same numbers. Not in the engine's prefill: one row's query would run through a one-row matmul, whose last
bits differ from a two-row one, and a rank holding one prompt would sample differently from one process.

Incremental decoding: pass a `KVCache` (or `PrefixKV`, to train on completions that share a prompt). Prompts of
different lengths are left-padded; `valid` marks their real tokens. Padding slots are masked out as keys and each
row's rotary positions count only its real tokens, so a left-padded row computes the same function as the same
prompt alone. The engine's one-token steps run through `decode_step`, the one second copy of the block: plain ops
over `decode_weights` and `decode_linear`'s matmuls, to the modules' bits (tests/test_gpt.py), because at a few
rows per step module calls and the BLAS's packing of every weight were most of a step on the CPU.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.batching import IGNORE_INDEX


@dataclass
class GPTConfig:
    sequence_len: int = 512
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    softcap: float = 15.0

    def to_dict(self):
        return asdict(self)


def config_from_depth(depth, vocab_size, sequence_len, head_dim=64, n_embd=None, n_head=None, n_kv_head=None,
                      verbose=True):
    """The depth dial: width 64*depth, heads of `head_dim`. Explicit overrides are for tiny test models."""
    n_embd = n_embd or 64 * depth
    n_head = n_head or max(1, n_embd // head_dim)
    n_kv_head = n_kv_head or n_head
    if n_embd % n_head != 0 or n_head % n_kv_head != 0:
        raise ValueError(f"n_embd={n_embd} must divide by n_head={n_head}, and n_head by n_kv_head={n_kv_head}")
    if (n_embd // n_head) % 2 != 0:
        raise ValueError(f"head dim {n_embd // n_head} must be even for rotary embeddings")
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd)
    if verbose:
        from nanochat.common import print0
        print0(f"model: depth={depth} -> n_layer={depth} n_embd={n_embd} n_head={n_head} n_kv_head={n_kv_head} "
               f"head_dim={n_embd // n_head} vocab_size={vocab_size} sequence_len={sequence_len}")
    return config


MATRIX_LR = {"adamw": 0.002, "muon": 0.02}  # default learning rate of the transformer's matrices


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); cos/sin: (B or 1, T, 1, D), GPT's tables with halves (cos, cos) and (sin, -sin). Rotates the
    # pairs (x_i, x_{i+D/2}): x * cos + (x with its halves swapped) * sin, three ops where slicing both halves took
    # seven and a cat (the decode loop runs this for every layer at every token)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class KVCache:
    """
    Keys and values of every layer for a batch of rows, plus which slots hold real tokens (left padding).
    `pos` is the number of filled slots, shared by all rows. `padded` says whether any filled slot is padding: until
    one is, positions are slots and no attention mask is needed.
    """

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0
        self.max_len = max_len
        self.padded = False

    @property
    def batch_size(self):
        return self.valid.size(0)

    def update(self, layer, k, v):
        """Store this step's keys/values (B, H, T, D) and return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def repeat_rows(self, n):
        """Each row becomes n consecutive rows: prefill a prompt once, then sample n completions from it."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)


class PrefixKV:
    """
    A differentiable KV cache for training on prompts shared by several completions (GRPO's groups): run the
    prompts once, take `rows(index)` (row i of the result continues prompt index[i]), then run the completions
    against those keys/values; gradients flow through both passes. Keys/values are kept per layer and grown by
    concatenation (KVCache writes into one preallocated buffer in place, which autograd cannot differentiate
    through). Same `valid`/`pos` contract.
    """

    def __init__(self, config, batch_size, max_len, device):
        self.k = [None] * config.n_layer
        self.v = [None] * config.n_layer
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0
        self.max_len = max_len
        self.padded = False

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def rows(self, index):
        """A new cache of the rows `index` (repeats allowed, any order); this one is left as it is."""
        cache = PrefixKV.__new__(PrefixKV)
        cache.k = [k.index_select(0, index) for k in self.k]
        cache.v = [v.index_select(0, index) for v in self.v]
        cache.valid, cache.pos, cache.max_len = self.valid.index_select(0, index), self.pos, self.max_len
        cache.padded = self.padded
        return cache


# rows the fused training loss takes at a time: 512 x vocab 4096 floats (8 MiB) of logits stay in cache
LOSS_CHUNK = 512


def capped_logits(h, weight, cap):
    """
    A chunk's logits through the head and the softcap, and the tanh they came from (None without a cap): the fused
    functions' gradients take its 1 - tanh^2.
    """
    logits = F.linear(h, weight)
    if not cap:
        return logits, None
    t = logits.div_(cap).tanh_()
    return t * cap, t


class HeadCrossEntropy(torch.autograd.Function):
    """
    Summed cross-entropy of the softcapped LM head over rows h (N, n_embd) with targets (N,), IGNORE_INDEX skipped,
    computed chunk by chunk of rows together with its gradients, so the (N, V) logits and their gradient never exist
    whole. Why: at the reference size on CPU the vocabulary-sized tail of a training step (head, softcap,
    log-softmax, and the backward of each, every one writing a fresh N x V tensor) took about a fifth of the step;
    the same arithmetic on chunks that stay in cache takes a fraction of that. The gradients are those of the sum,
    so backward only scales them (by 1/tokens in train_step).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, cap):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        loss = h.new_zeros(())
        for i in range(0, h.size(0), LOSS_CHUNK):
            hc, tc = h[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK]
            logits, t = capped_logits(hc, weight, cap)
            lse = logits.logsumexp(dim=-1)
            keep = (tc != IGNORE_INDEX)[:, None]
            tc = tc.clamp(min=0)[:, None]  # IGNORE_INDEX is no token: any index will do, the row is zeroed
            loss += ((lse - logits.gather(1, tc).squeeze(1)) * keep.squeeze(1)).sum()
            # d loss / d logits = softmax - onehot(target), then through the softcap: d cap*tanh(z/cap) = 1 - tanh^2
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, tc, torch.full_like(lse[:, None], -1.0)).mul_(keep)
            if cap:
                g.mul_(t.square_().neg_().add_(1))
            torch.mm(g, weight, out=grad_h[i:i + LOSS_CHUNK])
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None


class HeadLogprobs(torch.autograd.Function):
    """
    Per row of h (N, n_embd): the log-probability of its token (N,) under softmax(softcap(h W^T) / temperature),
    and with `with_entropy` that distribution's entropy (nats, no gradient; else an empty tensor). Made chunk by chunk
    of rows like HeadCrossEntropy, for the same reason: GRPO's and DPO's log-prob tail wrote a fresh N x V tensor at
    each of a dozen elementwise steps, forward and backward. The gradient is known up to one number per row: d
    chosen / d logits = (onehot(token) - softmax) * (1 - tanh^2) / temperature. Forward makes its negative,
    (softmax - onehot) * (1 - tanh^2), while each chunk is in cache (one N x V tensor in all); backward scales it by
    minus the rows' incoming gradients over the temperature inside its two matmuls.
    """

    @staticmethod
    def forward(ctx, h, weight, tokens, cap, temperature, with_entropy):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        chosen = h.new_empty(h.size(0))
        entropy = h.new_empty(h.size(0) if with_entropy else 0)
        ctx.neg_dlogits = []  # chunk by chunk: blocks of a few MiB that malloc reuses, where one N x V block is mmapped
        for i in range(0, h.size(0), LOSS_CHUNK):
            rows, tc = slice(i, i + LOSS_CHUNK), tokens[i:i + LOSS_CHUNK, None]
            logits, t = capped_logits(h[rows], weight, cap)
            if temperature != 1.0:
                logits.div_(temperature)
            shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))  # softmax's own steps, keeping each one
            picked = shifted.gather(1, tc)
            p = shifted.exp() if with_entropy else shifted.exp_()  # only the entropy reads `shifted` again
            total = p.sum(dim=-1, keepdim=True)
            chosen[rows] = (picked - total.log()).squeeze(1)  # with or without gradients, the same bits
            if not (with_entropy or needs_grad):
                continue
            p.div_(total)
            if with_entropy:  # -sum p log p = log total - sum p * shifted, the sum as a batched dot product
                entropy[rows] = total.log().squeeze(1) - torch.bmm(p[:, None], shifted[:, :, None]).view(-1)
            if needs_grad:
                p.scatter_add_(1, tc, torch.full_like(tc, -1.0, dtype=p.dtype))
                if cap:
                    p.addcmul_(p, t.square_(), value=-1.0)
                ctx.neg_dlogits.append(p)
        ctx.save_for_backward(h, weight)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return chosen, entropy

    @staticmethod
    def backward(ctx, grad_chosen, grad_entropy):
        h, weight = ctx.saved_tensors
        scale = grad_chosen[:, None] / -ctx.temperature
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i, g in zip(range(0, h.size(0), LOSS_CHUNK), ctx.neg_dlogits):
            rows = slice(i, i + LOSS_CHUNK)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[rows]).mul_(scale[rows])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h[rows] * scale[rows])
        del ctx.neg_dlogits
        return grad_h, grad_w, None, None, None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache, attn_mask, at=None):
        B, T, C = x.shape
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if at is not None:
            return self._forward_at(x, k, v, cos, sin, kv_cache, attn_mask, at)
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        # rotary and QK-norm act on each head alike: run them once over the query and key heads side by side
        qk = norm(apply_rotary(torch.cat([q, k], dim=2), cos, sin)).transpose(1, 2)
        q, k, v = qk[:, :self.n_head], qk[:, self.n_head:], v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head
        if T == 1:  # a decoded token: the last slot, or the slots the mask leaves it
            y = one_query_attention(q, k, v, attn_mask)
        elif attn_mask is None:
            # no mask: every key up to the query's own slot, with as many queries as keys: causal
            # (GPT._rotary_and_mask returns None only then, or for a single query)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def _forward_at(self, x, k, v, cos, sin, kv_cache, attn_mask, at):
        """The output (B, 1, C) of one query per row, at positions `at` (B,) of this call's tokens, against every
        key (all of which still go to kv_cache)."""
        B, T, C = x.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        k = norm(apply_rotary(k, cos, sin)).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        rows = torch.arange(B, device=x.device)
        x_at = x[rows, at][:, None]
        table_rows = rows if cos.size(0) > 1 else 0  # per-row tables (padding), or one shared
        cos_at, sin_at = cos[table_rows, at][:, None], sin[table_rows, at][:, None]
        if attn_mask is None:  # causal: the keys up to the query's own slot
            mask = (torch.arange(k.size(2), device=x.device)[None, :] <= (t0 + at)[:, None])[:, None, None, :]
        else:
            mask = attn_mask[rows, :, at][:, :, None]
        q = norm(apply_rotary(self.c_q(x_at).view(B, 1, self.n_head, self.head_dim), cos_at, sin_at)).transpose(1, 2)
        return self.c_proj(one_query_attention(q, k, v, mask).transpose(1, 2).reshape(B, 1, C))


def one_query_attention(q, k, v, mask):
    """
    Attention of one query per row: q (B, H, 1, D) against k, v (B, H_kv, S, D), mask (B, 1, 1, S) bool or None.
    Explicit matmuls, not SDPA: SDPA's CPU kernel splits a single query's keys among threads by the batch size,
    so a row's output would change in its last bits with the other rows in its batch, and two ranks would no longer
    sample what one process samples.
    """
    if k.size(1) != q.size(1):  # GQA: each key/value head serves a run of query heads
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


# the fewest rows a decode step's matmuls run on (decode_linear)
DECODE_ROWS = 12


def decode_linear(x, weight):
    """
    F.linear(x, weight) for the few rows x (B, in) of a decode step on the CPU, computed as weight @ x.T: the same
    product with the operands' roles swapped, which MKL runs much faster for a few rows (likely because it then
    packs the small x rather than the whole weight). It ran the 17 matmuls of a depth-4 model's step (q/k/v
    stacked) in 30-65% of F.linear's time at 2 to 128 rows (README, "Tests and benchmarks"). MKL gives weight @ x.T
    the bits of F.linear from 12 rows on, and F.linear the same bits from 4 rows on (one thread), so fewer rows are
    padded to 12: a row's numbers do not depend on how many rows the batch holds (the engine drops finished rows;
    ranks hold slices), as with F.linear. A single row takes `weight` transposed, (in, out)
    (`GPT.decode_weights`): x @ weight was faster there still, and than 12 padded rows.
    """
    rows = x.size(0)
    if rows == 1:
        return x @ weight
    if rows < DECODE_ROWS:
        x = torch.cat([x, x.new_zeros(DECODE_ROWS - rows, x.size(1))])
    # row-major again, as F.linear's: a reduction over a row (the norms, softmax) then sums in the same order
    return torch.mm(weight, x.t())[:, :rows].t().contiguous()


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, attn_mask, at=None):
        if at is None:
            x = x + self.attn(norm(x), cos, sin, kv_cache, attn_mask)
        else:  # one position per row goes on (GPT.hidden_states' `at`)
            x_at = x[torch.arange(x.size(0), device=x.device), at][:, None]
            x = x_at + self.attn(norm(x), cos, sin, kv_cache, attn_mask, at)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 4x the training context so generation can run past it without re-allocating
        head_dim = config.n_embd // config.n_head
        self.rotary_len = 4 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @staticmethod
    def _rotary_tables(length, head_dim, base=10000.0):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=1), torch.cat([sin, -sin], dim=1)  # apply_rotary's layout

    @torch.no_grad()
    def init_weights(self):
        torch.nn.init.normal_(self.wte.weight, std=1.0)  # normed right after lookup, so the scale is free
        torch.nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
            # zero output projections: every residual branch starts switched off
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)

    def _rotary_and_mask(self, idx, kv_cache, valid):
        """
        Rotary cos/sin (B or 1, T, 1, head_dim) and an attention mask (B, 1, T, keys); a mask of None means each query
        sees every key up to its own slot, and is returned only when that is causal attention or T is 1.
        """
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            if t0 + T > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: {t0 + T} tokens > cache length {kv_cache.max_len}")
            kv_cache.valid[:, t0:t0 + T] = True if valid is None else valid
            if valid is not None and not kv_cache.padded:
                kv_cache.padded = not bool(valid.all())  # one host sync per prefill, none per decoded token
        if kv_cache is None or not kv_cache.padded and (T == 1 or t0 == 0):
            # no padding: positions are slots, so the tables are a slice (no gather) and there is no mask to build
            if t0 + T > self.rotary_len:
                raise ValueError(f"sequence of {t0 + T} tokens exceeds rotary length {self.rotary_len}")
            return self.cos[None, t0:t0 + T, None], self.sin[None, t0:t0 + T, None], None
        keys_valid = kv_cache.valid[:, :t0 + T]
        positions = (keys_valid.long().cumsum(1)[:, t0:] - 1).clamp(min=0)
        q_slot = torch.arange(t0, t0 + T, device=idx.device)[:, None]
        k_slot = torch.arange(t0 + T, device=idx.device)[None, :]
        # a padding query may see only itself, so its softmax row is never empty (its output is never used)
        mask = (k_slot <= q_slot)[None] & (keys_valid[:, None, :] | (k_slot == q_slot)[None])
        # only when the slots run past the rotary table can a position (padding makes them smaller) be out of it:
        # a plain int test first, so the usual case has no data-dependent branch (a host sync)
        if t0 + T > self.rotary_len and positions.max() >= self.rotary_len:
            raise ValueError(f"sequence of {positions.max().item() + 1} tokens exceeds rotary length "
                             f"{self.rotary_len}")
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None], mask[:, None]

    def hidden_states(self, idx, kv_cache=None, valid=None, at=None):
        """
        Final normed hidden states (B, T, n_embd): what the LM head, reward head and density pooling read. With `at`
        (a (B,) tensor of positions), only row i's state at position at[i]: (B, n_embd), the last block run for those
        queries alone.
        """
        cos, sin, attn_mask = self._rotary_and_mask(idx, kv_cache, valid)
        x = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache, attn_mask, at if i == len(self.blocks) - 1 else None)
        if kv_cache is not None:
            kv_cache.pos += idx.size(1)
        return norm(x) if at is None else norm(x[:, 0])

    def decode_weights(self, rows):
        """
        The matrices of `decode_step` for batches of `rows` rows: per block the query, key and value matrices
        stacked (one matmul instead of three, the same bits), the attention's output and the MLP's two, then the
        head; each transposed for a single row (decode_linear). Returns (rows, blocks, head), or None where
        decode_step runs the blocks as modules: on a GPU (decode_linear's layout was measured on the CPU) and where
        a matrix is wrapped (LoRA). Take them anew for each generation: training changes the weights in between.
        """
        blocks = [(b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in self.blocks]
        if self.lm_head.weight.device.type != "cpu" or any(type(m) is not nn.Linear
                                                           for m in [self.lm_head, *sum(blocks, ())]):
            return None
        layout = (lambda w: w.t().contiguous()) if rows == 1 else (lambda w: w)
        blocks = [tuple(map(layout, (torch.cat([q.weight, k.weight, v.weight]), o.weight, fc.weight, proj.weight)))
                  for q, k, v, o, fc, proj in blocks]
        return rows, blocks, layout(self.lm_head.weight)

    def decode_step(self, tokens, kv_cache, weights=None):
        """
        One new token per row, tokens (B,), against kv_cache: (hidden (B, n_embd), logits (B, V)), the numbers of
        `hidden_states` and `logits_from_hidden` on tokens[:, None]. With `weights` (decode_weights) the blocks run
        as the few plain ops below instead of modules (at batch 1 on CPU the modules' calls and the three q/k/v
        matmuls were about a fifth of a step) and the matmuls as decode_linear; tests/test_gpt.py holds the two
        paths to the same bits.
        """
        if weights is None:
            hidden = self.hidden_states(tokens[:, None], kv_cache=kv_cache)[:, -1]
            return hidden, self.logits_from_hidden(hidden)
        rows, blocks, head = weights
        B, H, Hkv = tokens.size(0), self.config.n_head, self.config.n_kv_head
        if (B == 1) != (rows == 1):  # a single row reads the matrices transposed
            raise ValueError(f"decode_weights({rows}) used for a batch of {B} rows")
        D = self.config.n_embd // H
        cos, sin, mask = self._rotary_and_mask(tokens[:, None], kv_cache, None)
        x = norm(self.wte(tokens))
        for layer, (qkv_weight, attn_proj, fc, mlp_proj) in enumerate(blocks):
            qkv = decode_linear(norm(x), qkv_weight)
            qk = norm(apply_rotary(qkv[:, :(H + Hkv) * D].reshape(B, 1, H + Hkv, D), cos, sin)).transpose(1, 2)
            k, v = kv_cache.update(layer, qk[:, H:], qkv[:, (H + Hkv) * D:].reshape(B, Hkv, 1, D))
            x = x + decode_linear(one_query_attention(qk[:, :H], k, v, mask).reshape(B, H * D), attn_proj)
            x = x + decode_linear(F.relu(decode_linear(norm(x), fc)).square(), mlp_proj)
        kv_cache.pos += 1
        hidden = norm(x)
        return hidden, self.softcap(decode_linear(hidden, head))

    def logits_from_hidden(self, h):
        return self.softcap(self.lm_head(h).float())

    def token_logprobs(self, h, tokens, temperature=1.0, with_entropy=False):
        """
        Log-probabilities (B, T) fp32 of `tokens` (B, T) under softmax(logits / temperature) of the hidden states h
        (B, T, n_embd) that predict them, and with `with_entropy` also that distribution's entropy (B, T), detached.
        """
        if h.dtype == torch.float32 and self.fused_head(h):
            chosen, entropy = HeadLogprobs.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, tokens.reshape(-1),
                                                 self.config.softcap, temperature, with_entropy)
            chosen, entropy = chosen.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else None
        else:
            logits = self.logits_from_hidden(h).float()
            if temperature != 1.0:  # skips a vocabulary-sized pass (and its backward) at the default temperature
                logits = logits / temperature
            logp = F.log_softmax(logits, dim=-1)
            chosen = logp.gather(-1, tokens[..., None]).squeeze(-1)
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return (chosen, entropy) if with_entropy else chosen

    def fused_head(self, h):
        """
        Whether the head's chunked autograd functions (HeadCrossEntropy, HeadLogprobs) may take h: no autocast (the
        CPU), a plain head (LoRA may wrap it), and not while compiling (inductor fuses the plain tail itself).
        """
        return (not torch.is_autocast_enabled(h.device.type) and type(self.lm_head) is nn.Linear
                and not torch.compiler.is_compiling())

    def softcap(self, logits):
        """The head's raw outputs squashed into (-softcap, softcap) (none when softcap is 0)."""
        cap = self.config.softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None, valid=None):
        """Logits (B, T, V) when `targets` is None, else the cross-entropy (targets IGNORE_INDEX are skipped)."""
        h = self.hidden_states(idx, kv_cache, valid)
        # training: the fused loss, the same loss and gradients up to float rounding
        if targets is not None and loss_reduction in ("sum", "mean") and h.requires_grad and self.fused_head(h):
            targets = targets.reshape(-1)
            loss = HeadCrossEntropy.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets,
                                          self.config.softcap)
            return loss if loss_reduction == "sum" else loss / (targets != IGNORE_INDEX).sum()
        logits = self.logits_from_hidden(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    # -------------------------------------------------------------------------
    # accounting

    def num_params(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embeddings else n

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus attention scores over the context."""
        c = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()  # the embedding is a lookup, not a matmul
        attention = 12 * c.n_layer * c.n_embd * c.sequence_len
        return 6 * matmul_params + attention

    # -------------------------------------------------------------------------
    # optimizers

    def setup_optimizers(self, matrix_lr=None, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                         matrix_optimizer="adamw", adam_betas=(0.8, 0.95)):
        """
        AdamW for the embedding and the head; AdamW (default) or Muon for the transformer's matrices, at
        `matrix_lr` (default: MATRIX_LR of the optimizer). Returns a list of optimizers; each param group
        remembers its `initial_lr` for LR schedules. The embedding and head learning rates are scaled by
        1/sqrt(width/768) so the defaults carry across depths.

        Why AdamW by default: `python -m scripts.bench --only=optimizers` races both on the synthetic world for a
        fixed wall-clock budget; at CPU scale Muon wins per step but its Newton-Schulz iterations cost more time
        than they save (README, "Optimizer choice").
        """
        matrix_params = list(self.blocks.parameters())
        matrix_lr = MATRIX_LR[matrix_optimizer] if matrix_lr is None else matrix_lr
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            {"params": [self.wte.weight], "lr": embedding_lr * scale},
            {"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
        ]
        # the fused kernel updates each parameter in one pass (on CPU 5x faster than the default's loop of tensor ops)
        fused = self.wte.weight.device.type in ("cpu", "cuda")
        if matrix_optimizer == "muon":
            from nanochat.muon import Muon
            optimizers = [torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay,
                                            fused=fused),
                          Muon(matrix_params, lr=matrix_lr, momentum=0.95)]
        elif matrix_optimizer == "adamw":
            adam_groups.append({"params": matrix_params, "lr": matrix_lr})
            optimizers = [torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay,
                                            fused=fused)]
        else:
            raise ValueError(f"matrix_optimizer must be one of {sorted(MATRIX_LR)}, got {matrix_optimizer!r}")
        return remember_initial_lr(optimizers)


def lr_multiplier(step, num_steps, warmup_steps, warmdown_ratio, final_frac=0.0):
    """Linear warmup, constant, then linear warmdown over the last `warmdown_ratio` of training."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = int(round(warmdown_ratio * num_steps))
    if warmdown_steps > 0 and step >= num_steps - warmdown_steps:
        progress = (num_steps - step) / warmdown_steps
        return progress + (1 - progress) * final_frac
    return 1.0


def remember_initial_lr(optimizers):
    """Record each param group's learning rate as its `initial_lr`, the base that `set_lr` scales."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers, multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def model_size_summary(model):
    n = model.num_params()
    return f"{n / 1e6:.2f}M parameters ({model.num_params(exclude_embeddings=True) / 1e6:.2f}M non-embedding), " \
           f"{model.flops_per_token() / 1e6:.1f} MFLOPs/token"

