"""A researcher's own vector field with a zero-initialised linear layer, in one file,
through the public API only: `bertode.zero_init` keeps it zero through `post_init` and
through `from_pretrained` of a checkpoint that lacks it (a plain `nn.Linear` gets BERT's
random initialisation, which is what makes the marker necessary), and the field is
Euler-1-exact with BERT at initialisation and trains from Python."""

import json

import torch
from torch import nn
from transformers import BertConfig, BertModel

import bertode


@bertode.register_vector_field("gated_residual")
class GatedResidual(bertode.VectorField):
    """dz/dt = G(z) + W z with W zero at initialisation (so it starts as `residual`)."""

    def __init__(self, config, marked: bool = True):
        super().__init__(config)
        linear = nn.Linear(config.hidden_size, config.hidden_size)
        self.mix = bertode.zero_init(linear) if marked else linear

    def forward(self, t, z, branch, norm):
        return branch(z) + self.mix(z)

    def finish(self, z, norm):
        return norm(z)


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _mixes(model):
    return [site.field.mix for layer in model.encoder.layer for site in (layer.attention, layer.feed_forward)]


def test_zero_init_survives_post_init_and_a_plain_linear_does_not():
    marked = bertode.BertODEModel(bertode.BertODEConfig(**TINY, vector_field="gated_residual"))
    assert all(m.weight.abs().max() == 0 and m.bias.abs().max() == 0 for m in _mixes(marked))
    plain = bertode.BertODEModel(bertode.BertODEConfig(**TINY, vector_field="gated_residual",
                                                       vector_field_kwargs={"marked": False}))
    assert all(m.weight.abs().max() > 0 for m in _mixes(plain))


def test_converted_and_reloaded_models_keep_it_zero_and_equal_bert(tmp_path):
    torch.manual_seed(0)
    hf = BertModel(BertConfig(**TINY)).eval()
    converted = bertode.from_bert(hf, vector_field="gated_residual").eval()
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted(ids).last_hidden_state - hf(ids).last_hidden_state).abs().max() <= 1e-5
    # a checkpoint without the field's weights (saved from a residual-field model)
    bertode.from_bert(hf).save_pretrained(tmp_path)
    config = bertode.BertODEConfig.from_pretrained(tmp_path)
    config.vector_field = "gated_residual"
    loaded = bertode.BertODEModel.from_pretrained(tmp_path, config=config)
    assert all(m.weight.abs().max() == 0 and m.bias.abs().max() == 0 for m in _mixes(loaded))


def test_trained_for_a_few_steps_from_python(tmp_path):
    from bertode.train import compose, train

    cfg = compose(["vector_field=gated_residual", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
                   "data.vocab_size=300", "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3",
                   "trainer.warmup_steps=1", "model.hidden_size=32", "model.intermediate_size=64",
                   "model.num_attention_heads=2"])
    train(cfg, tmp_path)
    loaded = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "final")
    moved = max(m.weight.abs().max().item() for m in _mixes(loaded.bert))
    assert moved > 0  # trained away from zero
    assert json.loads((tmp_path / "final" / "config.json").read_text())["vector_field_kwargs"] == {"marked": True}
