"""Worker functions run on each rank by ``dist_helpers.run_ranks`` (spawned
processes import them from here). Every rank builds the same full inputs from
a seed, computes the single-process answer itself and returns error norms,
so no tensor has to travel back to the test."""

from __future__ import annotations

import torch

import gape
from gape import distributed as gd

NAMES = ("out", "query", "key", "value", "query_gate", "key_gate")


def full_inputs(case: dict, world: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, dv = case["b"], case["hq"], case["hkv"], case["d"], case.get("dv", case["d"])
    length = world * case["local"]
    q = torch.randn(b, hq, length, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, length, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, length, dv, generator=g, dtype=dtype)
    lam = torch.rand(b, hq, length, generator=g, dtype=dtype) * case.get("lam", 0.5)
    pi = torch.rand(b, hkv, length, generator=g, dtype=dtype)
    grad = torch.randn(b, hq, length, dv, generator=g, dtype=dtype)
    return (q, k, v, lam, pi), grad


def _single(inputs, grad, case, dtype, backend):
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = gape.attention(*xs, is_causal=case["causal"], distance=case["distance"], backend=backend)
    out.backward(grad.to(dtype))
    return [out.detach()] + [x.grad for x in xs]


def _parallel(inputs, grad, case, dtype, backend, layout):
    xs = [gd.shard(t, 2, layout=layout).to(dtype).requires_grad_() for t in inputs]
    out = gd.context_parallel_attention(
        *xs, is_causal=case["causal"], distance=case["distance"], layout=layout, backend=backend
    )
    out.backward(gd.shard(grad, 2, layout=layout).to(dtype))
    return [out.detach()] + [x.grad for x in xs]


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def attention_cases(rank, world, cases):
    """Per case: max error vs the fp64 single-process reference of the context-parallel
    result (fp32, fused kernel), of the single-process fp32 result, and of the
    context-parallel fp64 reference-kernel result; plus reproducibility."""
    out = []
    for case in cases:
        inputs, grad = full_inputs(case, world, seed=case.get("seed", 0))
        layout = case["layout"]
        truth = [gd.shard(t, 2, layout=layout) for t in _single(inputs, grad, case, torch.float64, "reference")]
        single32 = [gd.shard(t, 2, layout=layout) for t in _single(inputs, grad, case, torch.float32, "torch")]
        cp32 = _parallel(inputs, grad, case, torch.float32, case.get("backend", "auto"), layout)
        cp32_again = _parallel(inputs, grad, case, torch.float32, case.get("backend", "auto"), layout)
        cp64 = _parallel(inputs, grad, case, torch.float64, "reference", layout)
        out.append(
            {
                "cp32": [_max_err(a, t) for a, t in zip(cp32, truth)],
                "single32": [_max_err(a, t) for a, t in zip(single32, truth)],
                "cp64": [_max_err(a, t) for a, t in zip(cp64, truth)],
                "scale": [float(t.abs().max()) for t in truth],
                "bitwise_repeat": all(torch.equal(a, b) for a, b in zip(cp32, cp32_again)),
            }
        )
    return out


def bad_inputs(rank, world):
    """Each scenario must raise on every rank (and leave the group usable)."""
    case = {"b": 1, "hq": 2, "hkv": 1, "d": 8, "local": 8, "causal": True, "distance": "log"}
    (q, k, v, lam, pi), _ = full_inputs(case, world, dtype=torch.float32)
    sh = lambda t, layout="zigzag": gd.shard(t, 2, layout=layout)  # noqa: E731
    local = [sh(t) for t in (q, k, v, lam, pi)]

    def attempt(*xs, **kw):
        try:
            gd.context_parallel_attention(*xs, **kw)
        except (ValueError, TypeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    results = {}
    # shards of different lengths: rank 0 drops two positions
    uneven = [t[:, :, :-2] if rank == 0 else t for t in local]
    results["uneven"] = attempt(*uneven)
    # an odd local length cannot be cut into the two zigzag blocks
    odd = [t[:, :, :-1] for t in local]
    results["odd_zigzag"] = attempt(*odd, layout="zigzag")
    # ranks disagree on the layout
    results["layout_disagree"] = attempt(*local, layout="zigzag" if rank == 0 else "contiguous")
    # a backend without query_offset / lse
    results["sdpa"] = attempt(*local, backend="sdpa", distance="linear")
    # one rank has a negative forgetting rate
    neg = [t.clone() for t in local]
    if rank == world - 1:
        neg[3][0, 0, 0] = -1.0
    results["negative_gate"] = attempt(*neg)
    # the group still works after all of that
    ok = gd.context_parallel_attention(*local)
    expected = sh(gape.attention(q, k, v, lam, pi))
    results["after_ok"] = float((ok - expected).abs().max())
    return results


def _tiny_llama(patched: bool, distance: str = "log"):
    from tiny_models import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attention_dropout=0.0))
    if patched:
        # non-trivial gates: lambda > 0 on every head, pi away from 0 and 1
        gape.patch(model, gape.GapeConfig(alpha_init=0.5, key_bias_init=-1.0, distance=distance, identity_shortcut=False))
        with torch.no_grad():
            for _, g in gape.hf.iter_gates(model):
                g.w.normal_(0, 0.5)
                g.u.normal_(0, 0.5)
    return model


def llama_step(rank, world, length, layout, patched=True, distance="log"):
    """Loss and gradients of one training step: the sequence split across the
    ranks vs the whole sequence in this process."""
    from gape.distributed import all_reduce_grads, causal_lm_loss, context_parallel, shift_labels

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (2, length), generator=g)
    labels = shift_labels(ids)
    positions = torch.arange(length)[None].expand(2, -1)

    single = _tiny_llama(patched, distance)
    logits = single(input_ids=ids, position_ids=positions, use_cache=False).logits
    loss_single = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss_single.backward()

    model = _tiny_llama(patched, distance)
    with context_parallel(model, layout=layout):
        out = model(input_ids=gd.shard(ids, 1, layout=layout), position_ids=gd.shard(positions, 1, layout=layout))
        loss = causal_lm_loss(out.logits, gd.shard(labels, 1, layout=layout))
        loss.backward()
    all_reduce_grads(model)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grads = dict(single.named_parameters())
    errs = {n: float((p.grad - grads[n].grad).abs().max()) for n, p in model.named_parameters()}
    scales = {n: float(grads[n].grad.abs().max()) for n in errs}
    # the model is back to its own attention after the context
    back = model.config._attn_implementation
    return {"loss": float(total), "loss_single": float(loss_single.detach()), "errs": errs, "scales": scales, "impl_after": back,
            "gate_params": sum(1 for n in errs if "gape_gate" in n)}


def llama_runs(rank, world, runs):
    """``llama_step`` for each ``(length, layout, patched, distance)`` and then ``llama_bad_positions``."""
    return {"steps": [llama_step(rank, world, *run) for run in runs], "bad": llama_bad_positions(rank, world)}


def hang(rank, world):
    """Rank 0 waits in a collective that rank 1 never joins."""
    if rank == 0:
        torch.distributed.all_reduce(torch.ones(1))
    else:
        import time

        time.sleep(600)
    return "finished"


def llama_bad_positions(rank, world):
    """position_ids not matching the layout (here: a contiguous shard under zigzag) fail on every rank."""
    from gape.distributed import context_parallel

    model = _tiny_llama(True)
    ids = torch.randint(0, 250, (1, 8 * world))
    pos = torch.arange(8 * world)[None]
    out = {}
    with context_parallel(model, layout="zigzag"):
        for name, p in (("contiguous_positions", gd.shard(pos, 1, layout="contiguous")),
                        ("plain_arange", torch.arange(8)[None]), ("missing", None)):
            try:
                model(input_ids=gd.shard(ids, 1), position_ids=p)
                out[name] = None
            except ValueError as exc:
                out[name] = str(exc)
    return out


def subgroup_case(rank, world):
    """Ranks 1..W-1 form a group (rank 0 stays out): the ring addresses peers by their global ranks."""
    members = list(range(1, world))
    group = torch.distributed.new_group(members)
    if rank not in members:
        return None
    case = dict(b=1, hq=4, hkv=2, d=8, local=12, causal=True, distance="log")
    n = len(members)
    (q, k, v, lam, pi), grad = full_inputs(case, n, dtype=torch.float32)
    sub_rank = members.index(rank)
    xs = [gd.shard_along(t, 2, n, sub_rank, "zigzag").requires_grad_() for t in (q, k, v, lam, pi)]
    out = gd.context_parallel_attention(*xs, group=group)
    out.backward(gd.shard_along(grad, 2, n, sub_rank, "zigzag"))
    ys = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]
    ref = gape.attention(*ys)
    ref.backward(grad)
    got = [out] + [x.grad for x in xs]
    want = [ref] + [y.grad for y in ys]
    return max(_max_err(a, gd.shard_along(b, 2, n, sub_rank, "zigzag")) for a, b in zip(got, want))


def _cache_with(model, n: int):
    """A KV cache holding ``n`` earlier positions in every layer (as a generation step has)."""
    from transformers import DynamicCache

    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.zeros(1, hkv, n, d), torch.zeros(1, hkv, n, d), i)
    return cache


# name -> what rank 0 alone does wrong in its model call; the other ranks call correctly
CP_REFUSALS = ("padding_mask", "kv_cache", "labels", "attention_dropout",
               "contiguous_positions", "length_mismatch", "batch_size", "grad_mode")


def cp_refusals(rank, world):
    """Each scenario: rank 0 calls the model wrongly, the others correctly. Every rank must
    raise the same ValueError (none may wait in the ring); afterwards the group still works."""
    from gape.distributed import context_parallel

    model = _tiny_llama(True)
    model.eval()
    length = 8 * world
    ids = torch.randint(0, 250, (1, length), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(length)[None]
    good = {"input_ids": gd.shard(ids, 1), "position_ids": gd.shard(pos, 1)}
    out = {}
    with context_parallel(model, layout="zigzag", timeout=240):
        for name in CP_REFUSALS:
            call, target, bad = dict(good), model, rank == 0
            if bad and name.startswith("padding_mask"):
                mask = torch.ones_like(call["input_ids"])
                mask[0, 0] = 0
                call["attention_mask"] = mask
            if bad and name == "kv_cache":
                call["past_key_values"] = _cache_with(model, 4)
            if bad and name == "labels":
                call["labels"] = call["input_ids"]
            if bad and name == "attention_dropout":
                model.train()
                model.config.attention_dropout = 0.5
                for layer in model.model.layers:
                    layer.self_attn.attention_dropout = 0.5
            if bad and name == "contiguous_positions":
                call["position_ids"] = gd.shard(pos, 1, layout="contiguous")
            if bad and name == "length_mismatch":
                call["input_ids"] = call["input_ids"][:, :-2]
            if bad and name == "batch_size":
                call = {k: v.expand(2, -1) for k, v in call.items()}
            grad = not (bad and name == "grad_mode")
            try:
                with torch.set_grad_enabled(grad):
                    target(**call)
                out[name] = None
            except ValueError as exc:
                out[name] = str(exc)
            finally:
                model.eval()
                model.config.attention_dropout = 0.0
                for layer in model.model.layers:
                    layer.self_attn.attention_dropout = 0.0
        # the group is still usable: a good call matches the single-process logits
        with torch.no_grad():
            logits = model(**good).logits
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=pos).logits
    out["after_ok"] = float((logits - gd.shard(full, 1)).abs().max())
    return out


def dead_peer(rank, world):
    """Rank 1 fails before the collective and never joins; rank 0 must raise within
    the timeout instead of waiting (here 3 s; the test allows far less than the group's 60 s)."""
    import time

    case = {"b": 1, "hq": 2, "hkv": 1, "d": 8, "local": 8, "causal": True, "distance": "log"}
    (q, k, v, lam, pi), _ = full_inputs(case, world, dtype=torch.float32)
    local = [gd.shard(t, 2) for t in (q, k, v, lam, pi)]
    if rank != 0:
        time.sleep(20)  # busy elsewhere (or dead): never joins
        return "away"
    t0 = time.monotonic()
    try:
        gd.context_parallel_attention(*local, timeout=3)
        result = None
    except RuntimeError as exc:
        result = str(exc)
    return {"message": result, "seconds": time.monotonic() - t0}
