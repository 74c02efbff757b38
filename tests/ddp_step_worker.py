"""
One training step of a tiny GPT over a fixed global batch, for tests/test_ddp.py. Each rank takes its rows of
the global batch; rank 0 saves the parameters after the step. Each rank then prints how many gloo threads it still
runs: none, when dist_cleanup really destroyed the process group (none left to race interpreter shutdown).
    torchrun --standalone --nproc_per_node=2 tests/ddp_step_worker.py OUT.pt
"""

import os
import sys

import torch

from nanochat.common import all_reduce_grads, all_reduce_sum, dist_cleanup, dist_init, is_master
from nanochat.gpt import GPT, config_from_depth

rank, world_size, device = dist_init("cpu")
torch.manual_seed(0)
model = GPT(config_from_depth(2, 97, 32, n_embd=64, n_head=4, verbose=False))
# random weights everywhere: at the real init the zero projections leave gradients of ~1e-9 that Adam's first
# step (g / |g|) would turn summation-order noise into visible differences
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.3)
optimizers = model.setup_optimizers(matrix_optimizer=sys.argv[2] if len(sys.argv) > 2 else "muon")
g = torch.Generator().manual_seed(1)
batch = torch.randint(0, 97, (4, 17), generator=g)
targets = batch[:, 1:].clone()
targets[torch.rand(targets.shape, generator=g) < 0.3] = -1  # uneven ignored tokens across ranks
rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
# normalise by the global count of supervised tokens so that summed gradients equal the 1-process gradient
num_tokens = all_reduce_sum((targets >= 0).sum().float())
loss = model(batch[rows, :-1], targets[rows], loss_reduction="sum") / num_tokens
loss.backward()
all_reduce_grads(model)
for opt in optimizers:
    opt.step()
if is_master():
    torch.save(model.state_dict(), sys.argv[1])
dist_cleanup()
if os.path.isdir("/proc/self/task"):  # Linux: each thread's name is in /proc
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    print(f"rank {rank}: {sum('gloo' in name for name in names)} gloo threads after dist_cleanup", flush=True)
