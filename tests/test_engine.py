import pytest
import torch

from nanochat.engine import Engine, sample_next

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [4], [20, 21, 22, 23, 24]]


def full_forward_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(full_forward_logits(model, ids)[-1].argmax().item())
    return ids[len(prompt):]


def test_greedy_kv_cache_equals_full_forward_for_ragged_batch(tiny_model):
    gen = Engine(tiny_model).generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        assert gen.tokens[i].tolist() == greedy_by_full_forward(tiny_model, prompt, 12)
    assert gen.mask.all() and gen.finish_reasons == ["length"] * 4


def test_logprobs_equal_full_forward_logprobs(tiny_model):
    gen = Engine(tiny_model).generate(PROMPTS, num_samples=3, max_new_tokens=10, temperature=1.7, top_k=20,
                                      seed=1)
    assert gen.tokens.shape == (12, 10)
    for row in range(12):
        prompt = PROMPTS[row // 3]
        completion = gen.tokens[row].tolist()
        logp = full_forward_logits(tiny_model, prompt + completion).log_softmax(-1)
        # the logprob of completion[t] is read at the position just before it, at temperature 1, unfiltered
        expected = logp[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(gen.logprobs[row], expected, atol=1e-5)


def test_seeded_sampling_is_reproducible(tiny_model):
    engine = Engine(tiny_model)
    a = engine.generate(PROMPTS, num_samples=4, max_new_tokens=15, temperature=1.0, seed=7)
    b = engine.generate(PROMPTS, num_samples=4, max_new_tokens=15, temperature=1.0, seed=7)
    c = engine.generate(PROMPTS, num_samples=4, max_new_tokens=15, temperature=1.0, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # samples of one prompt are not copies of each other
    assert len({tuple(r) for r in a.tokens[:4].tolist()}) > 1


def allowed_tokens(logits, temperature, top_k=None, top_p=None, min_p=None):
    """The set a filter may emit, computed step by step in plain Python from the definitions."""
    probs = (logits / temperature).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[:top_k]) if top_k else set(order)
    if min_p:
        top = max(probs[i] for i in keep)
        keep = {i for i in keep if probs[i] >= min_p * top}
    if top_p:
        total = sum(probs[i] for i in keep)
        chosen, mass = set(), 0.0
        for i in order:
            if i in keep:
                chosen.add(i)
                mass += probs[i] / total
                if mass >= top_p:
                    break
        keep = chosen
    return keep


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2),
                                     dict(top_k=10, top_p=0.8, min_p=0.05)])
def test_filters_never_emit_disallowed_tokens(tiny_model, filters):
    temperature = 1.3
    gen = Engine(tiny_model).generate(PROMPTS, num_samples=8, max_new_tokens=8, temperature=temperature, seed=3,
                                      **filters)
    emitted_outside_top1 = 0
    for row in range(gen.tokens.size(0)):
        prompt = PROMPTS[row // 8]
        completion = gen.tokens[row].tolist()
        logits = full_forward_logits(tiny_model, prompt + completion)[len(prompt) - 1:-1]
        for t, token in enumerate(completion):
            allowed = allowed_tokens(logits[t], temperature, **filters)
            assert token in allowed, (row, t, token, sorted(allowed))
            emitted_outside_top1 += token != logits[t].argmax().item()
    assert emitted_outside_top1 > 0  # the filters still sample, they are not argmax in disguise


def test_sample_next_filters_on_fixed_logits():
    logits = torch.tensor([[4.0, 3.0, 2.9, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    for filters in (dict(top_k=2), dict(top_p=0.9), dict(min_p=0.3)):
        tokens, _ = sample_next(logits, 1.0, generator=gen, **filters)
        assert set(tokens.tolist()) == allowed_tokens(logits[0], 1.0, **filters)


def test_temperature_zero_is_argmax_and_per_row_temperature_applies_per_row():
    logits = torch.randn(3, 50).repeat(200, 1)  # 600 rows: three distinct distributions, 200 copies each
    temperature = torch.tensor([0.0, 1e-4, 50.0]).repeat(200)
    tokens, logprobs = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    tokens = tokens.view(200, 3)
    argmax = logits[:3].argmax(-1)
    assert (tokens[:, 0] == argmax[0]).all() and (tokens[:, 1] == argmax[1]).all()
    assert len(set(tokens[:, 2].tolist())) > 20  # a hot row spreads over the vocabulary
    # log-probs are always under the raw logits
    raw = logits.log_softmax(-1).gather(-1, tokens.view(-1, 1)).squeeze(-1)
    assert torch.allclose(logprobs, raw)
    with pytest.raises(ValueError):
        sample_next(logits, torch.ones(5))


def test_stop_tokens_end_rows_and_set_mask_and_reasons(tiny_model):
    gen = Engine(tiny_model).generate(PROMPTS, num_samples=4, max_new_tokens=30, temperature=1.0, seed=0,
                                      stop_tokens=[7, 8, 9, 10, 11])
    stops = {7, 8, 9, 10, 11}
    for row in range(16):
        real = gen.tokens[row][gen.mask[row]].tolist()
        hits = [i for i, t in enumerate(real) if t in stops]
        if gen.finish_reasons[row] == "stop":
            assert hits == [len(real) - 1]  # the stop token is the last real token, and the only one
        else:
            assert not hits and len(real) == 30
        assert gen.mask[row].tolist() == [True] * len(real) + [False] * (30 - len(real))
        assert (gen.tokens[row][~gen.mask[row]] == 0).all() and (gen.logprobs[row][~gen.mask[row]] == 0).all()
    assert "stop" in gen.finish_reasons


def test_stream_matches_generate(tiny_model):
    engine = Engine(tiny_model)
    streamed = list(engine.stream(PROMPTS[1], max_new_tokens=20, temperature=0.0, stop_tokens=[3]))
    gen = engine.generate([PROMPTS[1]], max_new_tokens=20, temperature=0.0, stop_tokens=[3])
    expected = [t for t in gen.completions()[0] if t != 3]
    assert streamed == expected


def test_bad_prompts_are_rejected(tiny_model):
    engine = Engine(tiny_model)
    with pytest.raises(ValueError):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError):
        engine.generate([[1000]], max_new_tokens=2)


def test_ranks_sampling_slices_of_one_global_batch_draw_what_one_process_draws(tiny_model):
    # catches: each rank drawing its own random stream (N ranks then sample other completions than 1 process)
    engine = Engine(tiny_model)
    whole = engine.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=1.0, seed=7)
    first = engine.generate(PROMPTS[:2], num_samples=2, max_new_tokens=8, temperature=1.0, seed=7,
                            global_rows=(0, 8))
    second = engine.generate(PROMPTS[2:], num_samples=2, max_new_tokens=8, temperature=1.0, seed=7,
                             global_rows=(4, 8))
    assert torch.equal(torch.cat([first.tokens, second.tokens]), whole.tokens)
    alone = engine.generate(PROMPTS[2:], num_samples=2, max_new_tokens=8, temperature=1.0, seed=7)
    assert not torch.equal(alone.tokens, second.tokens)  # the slice is not what a batch of its own draws


def test_decode_hook_sets_temperature_and_top_p_per_row_and_step(tiny_model):
    # catches: a hook whose choices are ignored, applied to the wrong rows, or read from stale hidden states
    engine = Engine(tiny_model)
    seen = []

    def hook(hidden, logits):
        seen.append(hidden.clone())
        B = hidden.size(0)
        # row 0 greedy, the others at temperature 1 with per-row top-p (row 1 keeps only the top token)
        return torch.tensor([0.0] + [1.0] * (B - 1)), torch.tensor([1.0, 1e-6] + [1.0] * (B - 2))

    gen = engine.generate(PROMPTS, max_new_tokens=6, seed=3, decode_hook=hook)
    assert gen.tokens[0].tolist() == greedy_by_full_forward(tiny_model, PROMPTS[0], 6)
    assert gen.tokens[1].tolist() == greedy_by_full_forward(tiny_model, PROMPTS[1], 6)  # top-p ~0: the argmax
    assert gen.temperatures.shape == (4, 6) and gen.temperatures[0].eq(0).all() and gen.temperatures[2].eq(1).all()
    # the hook sees the final normed hidden state that predicts each next token
    h = tiny_model.hidden_states(torch.tensor([PROMPTS[2] + gen.tokens[2, :2].tolist()]))[0, -1]
    assert torch.allclose(seen[2][2], h, atol=1e-5)
    plain = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=3)
    assert plain.temperatures is None


STOPS = [7, 8, 9]  # sampled often enough by tiny_model that rows stop anywhere from the first step to never


def sample_by_full_forward(model, prompts, num_samples, max_new_tokens, seed, temperature=1.0, top_p=None,
                           hook=None):
    """
    What generate must return, computed naively: no KV cache and no rows ever dropped. Every step runs each
    unfinished row's whole sequence through the model and samples all rows in one sample_next call (finished rows
    read zero hidden states), so the random numbers of every row are drawn at every step. Per row (tokens,
    logprobs, temperatures), the last empty without a hook.
    """
    prefixes = [list(p) for p in prompts for _ in range(num_samples)]
    out = [([], [], []) for _ in prefixes]
    finished = [False] * len(prefixes)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        hidden = torch.zeros(len(prefixes), model.config.n_embd)
        with torch.no_grad():
            for r, ids in enumerate(prefixes):
                if not finished[r]:
                    hidden[r] = model.hidden_states(torch.tensor([ids]))[0, -1]
            logits = model.logits_from_hidden(hidden)
        if hook is not None:
            temperature, top_p = hook(hidden, logits)
        tokens, logprobs = sample_next(logits, temperature, top_p=top_p, generator=generator)
        for r in range(len(prefixes)):
            if not finished[r]:
                prefixes[r].append(tokens[r].item())
                out[r][0].append(tokens[r].item())
                out[r][1].append(logprobs[r].item())
                if hook is not None:
                    out[r][2].append(temperature[r].item())
                finished[r] = tokens[r].item() in STOPS
        if all(finished):
            break
    return out


def state_hook(hidden, logits):
    # a function of each row's own state, as a learned head is: some states go greedy, the rest vary per row
    temperature = torch.where(hidden[:, 0] > 1.0, 0.0, 0.5 + torch.sigmoid(hidden[:, 1]))
    return temperature, 0.6 + 0.4 * torch.sigmoid(hidden[:, 2])


SETTINGS = {
    "float temperature": dict(temperature=1.0),
    "per-row temperature and top-p": dict(temperature=torch.linspace(0.0, 2.0, 16), top_p=0.9),
    "per-row top-p": dict(temperature=1.3, top_p=torch.linspace(0.3, 1.0, 16)),
    "decode hook": dict(decode_hook=state_hook),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_dropping_finished_rows_changes_no_sample_whole_batch_or_rank_slices(tiny_model, monkeypatch, name):
    # The engine drops finished rows from its decode batch; the reference decodes every row to the end. Catches:
    # drawing random numbers for the rows left only (later samples shift), u[rows] without the rank's offset,
    # per-row temperature/top-p not following their rows, a hook's choices mapped back to the wrong rows, kept
    # rows' keys/values moved wrongly (e.g. keys but not values, or over a row not yet moved).
    from nanochat import engine as engine_module
    batch_sizes = []
    keep_rows = engine_module._keep_rows
    monkeypatch.setattr(engine_module, "_keep_rows",
                        lambda cache, index: (batch_sizes.append(index.numel()), keep_rows(cache, index)))
    settings = SETTINGS[name]
    reference = sample_by_full_forward(tiny_model, PROMPTS, 4, 24, seed=0, temperature=settings.get("temperature", 1.0),
                                       top_p=settings.get("top_p"), hook=settings.get("decode_hook"))
    engine = Engine(tiny_model)
    for prompts, rows, global_rows in ((PROMPTS, slice(0, 16), None), (PROMPTS[:2], slice(0, 8), (0, 16)),
                                       (PROMPTS[2:], slice(8, 16), (8, 16))):
        sliced = {k: v[rows] if torch.is_tensor(v) else v for k, v in settings.items()}
        gen = engine.generate(prompts, num_samples=4, max_new_tokens=24, seed=0, stop_tokens=STOPS,
                              global_rows=global_rows, **sliced)
        for r, (tokens, logprobs, temperatures) in enumerate(reference[rows]):
            assert gen.completions()[r] == tokens, (name, global_rows, r)
            assert gen.finish_reasons[r] == ("stop" if tokens[-1] in STOPS else "length")
            n = len(tokens)
            torch.testing.assert_close(gen.logprobs[r, :n], torch.tensor(logprobs), rtol=0, atol=1e-5)
            if temperatures:
                torch.testing.assert_close(gen.temperatures[r, :n], torch.tensor(temperatures), rtol=0, atol=1e-5)
    # not vacuous: rows finished at very different steps, and the batch shrank (down to MIN_ROWS) meanwhile
    lengths = [len(tokens) for tokens, _, _ in reference]
    assert min(lengths) <= 2 and max(lengths) == 24 and len(set(lengths)) >= 6, lengths
    assert batch_sizes and min(batch_sizes) == engine_module.MIN_ROWS, batch_sizes


def test_a_step_of_greedy_per_row_temperatures_still_draws_its_random_numbers():
    # catches: skipping the draw when the rows in the batch are all greedy. Whether a step draws would then depend
    # on which rows are in it (a hook's choice for rows already dropped, or for another rank's rows), and every
    # later step would read other random numbers
    logits = torch.randn(4, 50)
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sample_next(logits, torch.zeros(4), generator=a)
    sample_next(logits, torch.tensor([0.0, 0.0, 0.0, 1.0]), generator=b)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_generation_is_usable_for_training(tiny_model):
    # catches: decoding under inference mode handing out inference tensors, which GRPO's forward on the sampled
    # tokens cannot save for backward
    gen = Engine(tiny_model).generate(PROMPTS, max_new_tokens=4, temperature=1.0, seed=0)
    assert not any(t.is_inference() for t in (gen.tokens, gen.logprobs, gen.mask))
    loss = tiny_model(gen.tokens, gen.tokens, loss_reduction="none")
    (loss.sum() - gen.logprobs.sum()).backward()
