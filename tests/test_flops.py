import pytest
import torch
import torch.nn.functional as F

from nanochat.flops import count_flops
from nanochat.gpt import GPT, config_from_depth
from nanochat.training import train_step


def test_hand_counted_products_and_attention():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert count_flops(torch.mm, a, b)[0] == 2 * 3 * 4 * 5
    out = torch.zeros(3, 5)
    assert count_flops(lambda: out.addmm_(a, b))[0] == 2 * 3 * 4 * 5  # in place: HeadCrossEntropy's weight gradient
    assert count_flops(lambda: torch.mm(a, b, out=out))[0] == 2 * 3 * 4 * 5
    x, y = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert count_flops(torch.bmm, x, y)[0] == 2 * 2 * 3 * 4 * 5
    assert count_flops(lambda: torch.zeros(2, 3, 5).baddbmm_(x, y))[0] == 2 * 2 * 3 * 4 * 5
    # attention of 3 queries against 5 keys, 2 heads of 4 dims: scores and weighted sum, 2 * 2 * 3 * 5 * 4 each
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 4, requires_grad=True), torch.randn(1, 2, 5, 4, requires_grad=True)
    forward, out = count_flops(F.scaled_dot_product_attention, q, k, v)
    assert forward == 4 * 2 * 3 * 5 * 4
    assert count_flops(out.sum().backward)[0] == 2 * forward


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_a_training_step_counts_what_the_architecture_formula_says(n_kv_head):
    # an independent reference: the bench's train formula from the model's shapes, 6 x matmul params x tokens plus
    # attention's 12 x layers x width x context per token (at full length). Fails when the count misses the
    # in-place addmm_ or the out= mm of the fused loss, or gets the attention backward's factor wrong
    config = config_from_depth(2, 512, 64, n_embd=128, n_head=4, n_kv_head=n_kv_head, verbose=False)
    model = GPT(config)
    model.init_weights()
    x = torch.randint(0, 512, (3, 65))
    flops, _ = count_flops(train_step, model, model.setup_optimizers(), [(x[:, :-1], x[:, 1:])])
    # GQA: the key/value matrices are smaller, and attention still costs per query head
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n)
    tokens = 3 * 64
    assert flops == tokens * (6 * matmul_params + 12 * config.n_layer * config.n_embd * 64)
