"""A researcher's own ODE-Transformer block, in one file, through the public API only:
Kutta's third-order scheme over the whole layer, once written out as a `bertode.Block`
and once as a `bertode.SchemeBlock` of its Butcher tableau; both match the equations
written here with HF's `BertLayer` as the layer, and the block trains from Python."""

import json

import torch
from transformers import BertConfig, BertModel

import bertode

KUTTA3 = bertode.ButcherTableau(c=[0.0, 1 / 2, 1.0], a=[[], [1 / 2], [-1.0, 2.0]], b=[1 / 6, 2 / 3, 1 / 6], order=3)


@bertode.register_block("kutta3")
class Kutta3Block(bertode.Block):
    """y' = y + (F1 + 4 F2 + F3) / 6, F1 = F(y), F2 = F(y + F1/2), F3 = F(y - F1 + 2 F2)."""

    def forward(self, layer, y):
        def increment(v):
            return layer(v) - v

        f1 = increment(y)
        f2 = increment(y + f1 / 2)
        f3 = increment(y - f1 + 2 * f2)
        return y + (f1 + 4 * f2 + f3) / 6


@bertode.register_block("kutta3_tableau")
class Kutta3Tableau(bertode.SchemeBlock):
    solver = KUTTA3


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _reference(hf, ids, mask):
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    y = hf.embeddings(input_ids=ids)
    for layer in hf.encoder.layer:
        def F(v, layer=layer):
            return layer(v, attention_mask=additive) - v

        f1 = F(y)
        f2 = F(y + f1 / 2)
        f3 = F(y - f1 + 2 * f2)
        y = y + (f1 + 4 * f2 + f3) / 6
    return y


def test_both_forms_match_the_equations_with_hf_layers():
    torch.manual_seed(0)
    hf = BertModel(BertConfig(**TINY)).eval()
    with torch.no_grad():  # BERT's init makes a layer nearly the identity: make F(y) sizeable
        for p in hf.encoder.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    ids = torch.randint(5, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = _reference(hf, ids, mask)
        for block in ("kutta3", "kutta3_tableau"):
            ours = bertode.from_bert(hf, block=block).eval()
            out = ours(ids, attention_mask=mask)
            assert (out.last_hidden_state - expected).abs().max() <= 1e-5, block
            blocks = [row for row in out.solver_stats["layers"] if row["name"].endswith(".block")]
            assert [row["nfe_forward"] for row in blocks] == [3, 3]  # three layer evaluations per block
        assert (hf(ids, attention_mask=mask).last_hidden_state - expected).abs().max() > 1e-2


def test_a_block_with_an_adjoint_is_refused():
    import pytest

    with pytest.raises(ValueError, match=r"sensitivity='adjoint' is invalid; allowed: one that does not re-evaluate"):
        bertode.BertODEConfig(**TINY, block="kutta3", sensitivity="adjoint").validate_ode()


def test_trained_for_a_few_steps_from_python(tmp_path):
    from bertode.train import compose, train

    cfg = compose(["block=kutta3", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.vocab_size=300",
                   "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1",
                   "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2"])
    train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    # per forward: 2 layers x 3 evaluations x 2 Euler-1 sites
    assert len(train_records) == 3 and all(r["nfe_forward"] == 2 * 3 * 2 + 2 * 3 for r in train_records)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["block"] == "kutta3"
