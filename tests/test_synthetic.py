"""gape synthetic: the passkey data, training, accuracy, entropy probe and results.json."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from gape.experiments import synthetic as syn
from gape.hf.attention_probe import attention_rows, capture_attention, entropy
from gape.core.reference import reference_attention


@pytest.mark.parametrize("length", [syn.MIN_LENGTH, 32, 257], ids=lambda L: f"L{L}")
def test_batch_layout(length):
    gen = torch.Generator().manual_seed(3)
    tokens, digits, pos = syn.make_batch(gen, 64, length)
    assert tokens.shape == (64, length)
    assert (tokens[:, 0] == syn.BOS).all()
    assert ((tokens == syn.KEY).sum(1) == 1).all() and ((tokens == syn.QUERY).sum(1) == 1).all()
    assert (tokens[:, length - 5] == syn.QUERY).all()
    assert torch.equal(tokens[:, -4:], digits)
    rows = torch.arange(64)
    assert (tokens[rows, pos] == syn.KEY).all()
    for i in range(4):
        assert torch.equal(tokens[rows, pos + 1 + i], digits[:, i])
    # 4 distinct digits from the digit vocabulary
    assert ((digits >= syn.DIGIT0) & (digits < syn.DIGIT0 + syn.NUM_DIGITS)).all()
    assert all(len(set(row.tolist())) == 4 for row in digits)
    # everything else is filler
    filler = torch.ones_like(tokens, dtype=torch.bool)
    filler[:, 0] = False
    filler[:, length - 5 :] = False
    for i in range(5):
        filler[rows, pos + i] = False
    assert ((tokens[filler] >= syn.FILLER0) & (tokens[filler] < syn.VOCAB)).all()


def test_needle_depth():
    gen = torch.Generator().manual_seed(0)
    L = 100
    _, _, pos = syn.make_batch(gen, 3, L, torch.tensor([0.0, 0.5, 1.0]))
    free = L - syn.MIN_LENGTH
    assert pos.tolist() == [1, 1 + round(0.5 * free), 1 + free]
    with pytest.raises(ValueError, match="length"):
        syn.make_batch(gen, 1, syn.MIN_LENGTH - 1)


def test_data_depends_only_on_seed():
    a = syn.make_batch(torch.Generator().manual_seed(5), 4, 40)
    b = syn.make_batch(torch.Generator().manual_seed(5), 4, 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_exact_match_needs_every_digit():
    digits = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7], [8, 9, 10, 11]])
    logits = torch.full((3, 4, syn.VOCAB), -1.0)
    logits.scatter_(2, digits[..., None], 1.0)
    logits[1, 3, 7], logits[1, 3, 12] = 0.0, 5.0  # one wrong digit in row 1
    assert syn.exact_match(logits, digits).tolist() == [1.0, 0.0, 1.0]


def test_evaluate_counts_exact_matches(monkeypatch):
    """An oracle that answers rows 0, 2, 4, ... of each batch wrongly scores exactly half."""

    def oracle(model, tokens):
        digits = tokens[:, -4:]
        logits = torch.zeros(tokens.shape[0], 4, syn.VOCAB)
        logits.scatter_(2, digits[..., None], 1.0)
        logits[0::2, 2] = 0.0
        logits[0::2, 2, syn.FILLER0] = 1.0
        return logits

    monkeypatch.setattr(syn, "answer_logits", oracle)
    acc, ent = syn.evaluate(None, 64, 10, seed=0, entropy_samples=0)
    assert acc == pytest.approx(0.5) and ent == []


def test_training_lowers_the_loss_and_moves_the_gates(one_thread):
    model = syn.build_model("gape", seed=0, max_len=64)
    gate = model.model.layers[0].self_attn.gape_gate
    alpha0 = gate.alpha.detach().clone()
    batch = syn.make_batch(torch.Generator().manual_seed(123), 32, 40)[0]
    with torch.no_grad():
        before = float(syn.answer_loss(model, batch))
    syn.train(model, steps=40, train_len=48, seed=0, lr=3e-3, warmup=5, log=lambda *a: None)
    with torch.no_grad():
        after = float(syn.answer_loss(model, batch))
    assert before > 3.5  # ~ln(vocab) at init
    assert after < before - 1.0
    assert not torch.equal(gate.alpha.detach(), alpha0)


def test_methods_differ_only_in_gates():
    a = syn.build_model("rope", 0, 64)
    b = syn.build_model("fixed", 0, 64)
    c = syn.build_model("gape", 0, 64)
    pb, pc = dict(b.named_parameters()), dict(c.named_parameters())
    assert not [n for n in pb if "gape_gate" in n]  # fixed: no trainable gate parameters
    assert {n for n in pc if "gape_gate" in n} == {f"model.layers.{i}.self_attn.gape_gate.{x}" for i in (0, 1) for x in ("alpha", "w", "b", "u", "c")}
    for n, p in a.named_parameters():
        assert torch.equal(p, pb[n]) and torch.equal(p, pc[n]), n
    lam = b.model.layers[1].self_attn.gape_gate.query_gate(torch.randn(1, 4, 3, 32))
    assert torch.allclose(lam, torch.full_like(lam, math.log(2.0)))
    assert float(b.model.layers[1].self_attn.gape_gate.key_gate(torch.randn(1, 4, 3, 32)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="method"):
        syn.gape_config_for("alibi")


def test_probe_rows_match_reference_attention():
    torch.manual_seed(0)
    from gape.hf.config import GapeConfig
    from gape.hf.gates import GapeGate

    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    gate = GapeGate(4, 2, 16, GapeConfig(alpha_init=0.7))
    with torch.no_grad():
        gate.u.normal_()
        gate.w.normal_()
        probs, (lam, pi) = attention_rows(q, k, None, 0.25, gate, rows=[0, 4, 8])
        want = reference_attention(q.double(), k.double(), v.double(), gate.query_gate(q).double(), gate.key_gate(k).double(), scale=0.25)
    got = torch.matmul(probs.double(), v.double().repeat_interleave(2, dim=1))
    torch.testing.assert_close(got, want[:, :, [0, 4, 8]], atol=1e-5, rtol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 3))


def test_entropy_probe_on_model_is_bounded_and_gape_is_sharper():
    rope = syn.build_model("rope", 0, 128)
    sharp = syn.build_model("fixed", 0, 128, fixed_lambda=3.0)
    tokens = syn.make_batch(torch.Generator().manual_seed(1), 4, 100)[0]
    ents = []
    for m in (rope, sharp):
        with torch.no_grad(), capture_attention(m, rows=[95]) as rec:
            probed = m(input_ids=tokens).logits
        with torch.no_grad():
            torch.testing.assert_close(probed, m(input_ids=tokens).logits)  # the probe delegates, output unchanged
        assert sorted(rec) == [0, 1]
        ents.append(float(entropy(rec[0]["probs"]).mean()))
        assert m.config._attn_implementation in ("sdpa", "gape")  # restored after the probe
    assert 0 < ents[1] < ents[0] <= math.log(96) + 1e-4


def _args(tmp_path, **kw):
    ns = argparse.Namespace(quick=False, full=False, train_len=32, eval_lens="32,64", steps=3, samples=4, seed=7, seeds=1,
                            methods="rope,fixed", alpha=1.0, key_bias=0.0, fixed_lambda=None, gate_lr=None, lr=1e-3, batch=4,
                            theta=10000.0, backend="torch", threads=1, out=str(tmp_path / "out"), force=False, merge=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_results_schema_and_resume(tmp_path, capsys):
    assert syn.run(_args(tmp_path)) == 0
    path = tmp_path / "out" / "results.json"
    res = json.loads(path.read_text())
    assert res["train_len"] == 32
    assert set(res["methods"]) == {"rope", "fixed"}
    for m in ("rope", "fixed"):
        assert set(res["methods"][m]) == {"32", "64"} and res["seeds_done"][m] == 1
        assert all(0.0 <= res["methods"][m][L] <= 1.0 for L in ("32", "64"))
        assert len(res["entropy"][m]["64"]["per_layer"]) == 2
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    first = res["runs"]["rope/seed7"]
    capsys.readouterr()
    # rerun with one more method: finished runs are kept untouched, the new one is added
    assert syn.run(_args(tmp_path, methods="rope,gape")) == 0
    out = capsys.readouterr().out
    assert "rope/seed7: done" in out
    res2 = json.loads(path.read_text())
    assert res2["runs"]["rope/seed7"] == first
    assert set(res2["methods"]) == {"rope", "fixed", "gape"}
    assert "gates" in res2["runs"]["gape/seed7"]
    with pytest.raises(ValueError, match="different configuration"):
        syn.run(_args(tmp_path, steps=4))


def test_cli_flag_errors(tmp_path):
    with pytest.raises(ValueError, match="--methods"):
        syn.resolve(_args(tmp_path, methods="rope,alibi"))
    with pytest.raises(ValueError, match="--train-len"):
        syn.resolve(_args(tmp_path, train_len=8))
    cfg = syn.resolve(_args(tmp_path, eval_lens=None, full=True))
    assert cfg["eval_lens"] == [32, 64, 128, 256, 512]


def test_merge_seeds_run_in_separate_processes(tmp_path):
    # two folders as two parallel processes would leave them, then merged into the first
    assert syn.run(_args(tmp_path, methods="rope", out=str(tmp_path / "a"))) == 0
    assert syn.run(_args(tmp_path, methods="rope", seed=8, out=str(tmp_path / "b"))) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    merged = syn.merge(str(tmp_path / "a"), [str(tmp_path / "b")])
    assert set(merged["runs"]) == {"rope/seed7", "rope/seed8"}
    assert merged["config"]["seeds"] == [7, 8] and merged["seeds_done"]["rope"] == 2
    mean = (a["runs"]["rope/seed7"]["accuracy"]["64"] + b["runs"]["rope/seed8"]["accuracy"]["64"]) / 2
    assert merged["methods"]["rope"]["64"] == pytest.approx(mean)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["seeds_done"]["rope"] == 2
    with pytest.raises(ValueError, match="repeats runs"):
        syn.merge(str(tmp_path / "a"), [str(tmp_path / "b")])
    assert syn.run(_args(tmp_path, methods="rope", steps=4, out=str(tmp_path / "c"))) == 0
    with pytest.raises(ValueError, match="different experiment"):
        syn.merge(str(tmp_path / "a"), [str(tmp_path / "c")])
    # into a new folder: the first source is the start, the sources stay as they were
    assert syn.run(_args(tmp_path, methods="rope", seed=9, out=str(tmp_path / "d"))) == 0
    fresh = syn.merge(str(tmp_path / "new"), [str(tmp_path / "b"), str(tmp_path / "d")])
    assert set(fresh["runs"]) == {"rope/seed8", "rope/seed9"} and (tmp_path / "new" / "accuracy.png").exists()
    assert json.loads((tmp_path / "b" / "results.json").read_text())["seeds_done"]["rope"] == 1
