"""Workers of tests/test_data_parallel.py (importable by spawned processes): one training
step of a tiny patched Llama under DDP or FSDP2 (fully_shard) against the same step on
the whole batch in one process."""

from __future__ import annotations

import torch

import gape


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         initializer_range=0.1, attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    gape.patch(model, gape.GapeConfig(alpha_init=0.5, key_bias_init=-1.0, identity_shortcut=False))
    with torch.no_grad():  # gates that read the content: lambda and pi vary per token
        gen = torch.Generator().manual_seed(3)
        for _, g in gape.hf.iter_gates(model):
            g.w.copy_(torch.randn(g.w.shape, generator=gen) * 0.5)
            g.u.copy_(torch.randn(g.u.shape, generator=gen) * 0.5)
    return model


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def data_parallel_step(rank, world, mode):
    """Loss and gradients of one step on a batch of 2 * world sequences: this rank's share
    under ``mode`` ("ddp" or "fsdp2") vs the whole batch in this process."""
    import torch.distributed as dist

    ids = torch.randint(0, 96, (2 * world, 24), generator=torch.Generator().manual_seed(1))
    single = _model()
    loss_single = _loss(single, ids)
    loss_single.backward()
    want = {n: p.grad for n, p in single.named_parameters()}

    model = _model()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    loss = _loss(wrapped, ids[2 * rank : 2 * rank + 2])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    errs, scales = {}, {}
    for n, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        errs[n] = float((grad - want[n]).abs().max())
        scales[n] = float(want[n].abs().max())
    return {"loss": float(total) / world, "loss_single": float(loss_single), "errs": errs, "scales": scales}
