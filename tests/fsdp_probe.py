"""Run by tests/test_sharded.py under `torchrun --nproc_per_node 2` (gloo): msd's FSDP2 pieces
without a training run. Prints "probe ok" on every process."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from msd.config import load_config
from msd.generation import full_weights, generate, is_sharded, weights
from msd.generation.sampler import split_head
from msd.models import apply_lora
from msd.train import sharding

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForCausalLM.from_pretrained(model_dir)
lora = load_config(None, [f"model.name_or_path={model_dir}"]).lora
torch.manual_seed(rank)  # a different adapter init per process: sharding takes process 0's
model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora)
with torch.no_grad():  # a non-zero adapter, so the merged sampling path means something
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
reference = {n: p.detach().clone() for n, p in model.named_parameters()}
for t in reference.values():
    dist.broadcast(t, src=0)
sharding.shard(model, torch.device("cpu"), "no")

# each process holds half of every sharded parameter
local, full = sharding.local_share(model)
assert is_sharded(model) and abs(2 * local - full) < 0.05 * full, (local, full)

# rollouts: weights gathered once, the normal backend, no collective calls while decoding (the
# processes sample different prompts for different lengths), equal to the unsharded model's
prompts = [[5, 6, 7, 8], [9, 10]] if rank == 0 else [[11, 12, 13]]
steps = 12 + 7 * rank
plain = apply_lora(base, lora)
with torch.no_grad():
    for n, p in plain.named_parameters():
        p.copy_(reference[n])
want = generate(plain, tok, prompts, max_new_tokens=steps, temperature=1.0, seed=rank)
with full_weights(model) as local_weights:
    assert local_weights and not is_sharded(model) and split_head(model) is not None
    got = generate(model, tok, prompts, max_new_tokens=steps, temperature=1.0, seed=rank)
assert got == want, (got, want)
assert is_sharded(model)  # sharded again

# too big to gather: each layer gathers itself in forward, all processes step together
weights.GATHER_MEMORY_SHARE = 0.0
with full_weights(model) as local_weights:
    assert not local_weights and is_sharded(model)
    slow = generate(model, tok, prompts, max_new_tokens=steps, temperature=0, seed=rank,
                    sharded=True)
greedy = generate(plain, tok, prompts, max_new_tokens=steps, temperature=0, seed=rank)
assert slow == greedy, (slow, greedy)

# cross-process agreement: a non-finite loss on one process skips the step on all
assert sharding.all_agree(rank == 0) is False and sharding.all_agree(True) is True
assert sharding.broadcast_object({"rank": rank}) == {"rank": 0}
assert sharding.gather_objects(rank) == [0, 1]

# the global gradient norm counts every shard once
x = torch.tensor([[5, 6, 7, 8]])
model(input_ids=x, labels=x).loss.backward()
params = [p for p in model.parameters() if p.requires_grad]
norm = sharding.grad_norm(params)
full_grads = [p.grad.full_tensor() for p in params]
assert abs(norm - float(torch.stack([g.norm() for g in full_grads]).norm())) < 1e-4 * max(norm, 1)
print(f"probe ok {rank}", flush=True)
dist.destroy_process_group()
