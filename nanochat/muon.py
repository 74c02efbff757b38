"""
Muon: momentum SGD whose update for each weight matrix is orthogonalised by a Newton-Schulz iteration
(Jordan et al., 2024). Every direction of the update then moves at the same rate, which trains the hidden
matrices of a transformer faster per step than AdamW. Embeddings and the LM head stay on AdamW.
"""

import torch


@torch.no_grad()
def orthogonalize(g, steps=5):
    """Approximate U V^T of g = U S V^T with the quintic Newton-Schulz iteration (coefficients from the paper)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only updates 2D matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(g, group["ns_steps"])
                # tall matrices get a larger step so their per-row RMS update matches square ones
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)
