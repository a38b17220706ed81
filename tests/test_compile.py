"""torch.compile(fullgraph=True) of a GAPE-patched model: prefill and decode trace
without graph breaks (no host sync on the gates, no import in the traced path) and
give the eager logits; compiled generation builds a bounded number of graphs
(prefill, first decode step, one shape-dynamic decode graph), not one per step.

Dynamo's graph capture is checked with a counting backend that runs the captured
graph as is (fast); the inductor run is behind -m slow."""

import pytest
import torch
from test_hf import make_model, randomize_gates, tokens

import gape
from gape import hf


class Counting:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _model(arch, gates, backend="auto"):
    model = make_model(arch)
    gape.patch(model, gape.GapeConfig(backend=backend))
    if gates == "gated":
        randomize_gates(model)
    return model


def test_fullgraph_prefill_and_decode_equal_eager():
    torch._dynamo.reset()
    model = make_model("qwen3")
    ids = tokens(2, 14)
    with torch.no_grad():
        unpatched = model(ids).logits
    gape.patch(model, gape.GapeConfig())
    randomize_gates(model)
    counter = Counting()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        want = model(ids).logits
        assert (want - unpatched).abs().max() > 1e-2
        torch.testing.assert_close(compiled(ids).logits, want, rtol=0, atol=1e-5)
        out = model(ids[:, :13], use_cache=True)
        step = compiled(ids[:, 13:], use_cache=True, **{hf.cache_kwarg(): hf.output_cache(out)}).logits
        torch.testing.assert_close(step[:, -1], want[:, -1], rtol=0, atol=1e-5)
        graphs = counter.graphs
        # Identity gates: the gate values are graph inputs, not guards, so the same
        # graph runs (no host read of alpha) and gives the unpatched model.
        for _, gate in hf.iter_gates(model):
            gate.alpha.zero_()
        torch.testing.assert_close(compiled(ids).logits, unpatched, rtol=0, atol=1e-5)
    assert counter.graphs == graphs == 2


def test_compiled_generate_has_no_recompile_storm():
    torch._dynamo.reset()
    model = _model("llama", "gated")
    prompt = tokens(1, 10)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        counter = Counting()
        model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
        out = model.generate(prompt, **kw)
        graphs = counter.graphs
        again = model.generate(prompt, **kw)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(again.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-5)
    assert graphs <= 3, f"{graphs} graphs for 16 decode steps: a recompile per step"
    assert counter.graphs == graphs  # a second generate reuses them


@pytest.mark.slow
@pytest.mark.parametrize("gates", ["identity", "gated"])
def test_inductor_generate_equals_eager(gates):
    torch._dynamo.reset()
    model = _model("llama", gates)
    prompt = tokens(1, 10)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        model.forward = torch.compile(model.forward, fullgraph=True)
        out = model.generate(prompt, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)


def test_paper_form_decode_under_compile():
    """gate='paper' keeps the key gates of cached keys outside the graph: a decode step
    compiled without fullgraph (after an eager prefill) gives the eager logits; with
    fullgraph=True it is refused with the reason, not run with forgotten key gates."""
    from transformers import DynamicCache

    from test_paper import paper_config, randomize

    model = make_model("llama")
    gape.patch(model, paper_config())
    randomize(model)
    ids, nxt = tokens(1, 8), tokens(1, 1, seed=3)
    with torch.no_grad():
        want = model(torch.cat([ids, nxt], dim=1)).logits[:, -1:]
        for fullgraph in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=Counting(), fullgraph=fullgraph)
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache, use_cache=True)
            if fullgraph:
                with pytest.raises(Exception, match="outside the graph"):
                    compiled(nxt, past_key_values=cache, use_cache=True)
            else:
                got = compiled(nxt, past_key_values=cache, use_cache=True).logits
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_packed_position_ids_under_compile_are_refused_not_mixed():
    """One row holding two sequences, marked only by restarting position_ids: compiled,
    GAPE must not attend across them (eager splits them; compiled refuses)."""
    from test_hf import make_model

    import gape

    model = make_model("llama")
    gape.patch(model, gape.GapeConfig(backend="torch", distance="linear"))
    model.eval()
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None]
    plain = torch.arange(12)[None]
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=plain, use_cache=False).logits
        got = compiled(input_ids=ids, position_ids=plain, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="position_ids restart inside a row"):
            compiled(input_ids=ids, position_ids=packed, use_cache=False)
