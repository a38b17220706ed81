"""A training step of a tiny GAPE Llama on one sequence split across processes.

    torchrun --nproc-per-node 2 benchmarks/train_context_parallel.py --length 2048 --steps 3 --check

Every rank builds the same randomly initialised Llama (no download), patches it
with GAPE (non-trivial gates), and takes its ``zigzag`` shard of one long
sequence of random tokens; under ``gape.distributed.context_parallel`` the
attention layers pass K, V and the key gate around the ring. The loss is the
mean next-token loss over the whole sequence (``causal_lm_loss``); gradients
are summed over the ranks (``all_reduce_grads``), then every rank takes the
same Adam step, so the replicas stay identical.

``--check`` also computes the first step's loss and gradients on the whole
sequence in one process (on every rank) and prints the largest difference.
gloo on the CPU, NCCL when CUDA is available (one GPU per rank).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist


def tiny_llama(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import gape

    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.length, attention_dropout=0.0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device)
    gape.patch(model, gape.GapeConfig(alpha_init=0.5, key_bias_init=-1.0, identity_shortcut=False))
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=2048, help="total tokens of the sequence (divisible by 2 x ranks)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--check", action="store_true", help="compare step 1 with the whole sequence in one process")
    args = p.parse_args(argv)

    from gape import distributed as gd

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = tiny_llama(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.length), generator=g).to(device)
    labels = gd.shift_labels(ids)  # shift the whole sequence, then shard
    positions = torch.arange(args.length, device=device)[None]
    local = [gd.shard(t, 1, layout=args.layout) for t in (ids, positions, labels)]

    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        with gd.context_parallel(model, layout=args.layout):
            logits = model(input_ids=local[0], position_ids=local[1]).logits   # [1, L / W, vocab]
            loss = gd.causal_lm_loss(logits, local[2])
            loss.backward()
        gd.all_reduce_grads(model)
        total = loss.detach().clone()
        dist.all_reduce(total)
        if step == 0 and args.check:
            ref = tiny_llama(args, device)
            out = ref(input_ids=ids, position_ids=positions, use_cache=False).logits
            ref_loss = torch.nn.functional.cross_entropy(out[0], labels[0])
            ref_loss.backward()
            worst = max(float((a.grad - b.grad).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
            if rank == 0:
                print(f"check: loss {float(total):.6f} vs one process {float(ref_loss.detach()):.6f}; "
                      f"largest gradient difference {worst:.2e}", flush=True)
            del ref
        opt.step()
        if rank == 0:
            print(f"step {step + 1}: loss {float(total):.4f} ({world} ranks x {args.length // world} tokens, {args.layout})",
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
