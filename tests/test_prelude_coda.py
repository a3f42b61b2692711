"""A prelude and a coda around the core (`bertode/layers/prelude_coda.py`): the split computes
what the unsplit stack computes (discrete, and ODE at Euler-1), `from_bert` maps a pretrained
stack onto prelude, core and coda (equal to HF with padding), a DEQ core and a weight-tied
core train and count as themselves, the names save and load, and the dial's ``on_iterate`` and
``readout`` see the coda applied."""

import re

import pytest
import torch
import transformers

import bertode
from bertode.layers.encoder import EncoderOutput, Pass
from bertode.layers.prelude_coda import PreludeCodaEncoder
from bertode.solve.stats import SolverStats
from conftest import TINY, tiny_bert_config

SPLIT = dict(TINY, num_hidden_layers=4, prelude_layers=1, coda_layers=1)
EULER_1 = dict(mode="ode", solver="euler", steps=1)
# The unsplit stack's layer -> the split's (prelude = layer 0, core = layers 1-2, coda = layer 3).
PLACES = {0: "prelude.0", 1: "core.layer.0", 2: "core.layer.1", 3: "coda.0"}


def _split_name(name: str) -> str:
    return re.sub(r"encoder\.layer\.(\d+)\.", lambda m: f"encoder.{PLACES[int(m[1])]}.", name)


@pytest.mark.parametrize("mode", [dict(mode="discrete"), EULER_1], ids=["discrete", "ode-euler-1"])
def test_a_split_stack_computes_the_unsplit_stack(batch, mode):
    torch.manual_seed(0)
    plain = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**{**TINY, "num_hidden_layers": 4, **mode})).eval()
    split = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**SPLIT, **mode)).eval()
    state = {_split_name(name): value for name, value in plain.state_dict().items()}
    assert set(state) == set(split.state_dict())
    split.load_state_dict(state)
    want = plain(**batch, output_hidden_states=True, output_attentions=True)
    got = split(**batch, output_hidden_states=True, output_attentions=True)
    assert (want.logits - got.logits).abs().max() <= 1e-6
    assert len(got.hidden_states) == len(want.hidden_states) == 5  # embeddings, then one per layer, none twice
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(want.hidden_states, got.hidden_states))
    assert len(got.attentions) == 4  # per layer of the whole stack, in order
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(want.attentions, got.attentions))


def test_from_bert_maps_the_stack_onto_prelude_core_and_coda(batch):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(tiny_bert_config(num_hidden_layers=4)).eval()
    ours = bertode.from_bert(hf, prelude_layers=1, coda_layers=1, **EULER_1).eval()
    assert (hf(**batch).logits - ours(**batch).logits).abs().max() <= 1e-5
    source = hf.bert.encoder.layer
    encoder = ours.bert.encoder
    for ours_layer, hf_layer in [(encoder.prelude[0], source[0]), (encoder.core.layer[0], source[1]),
                                 (encoder.core.layer[1], source[2]), (encoder.coda[0], source[3])]:
        assert torch.equal(ours_layer.attention.branch.query.weight, hf_layer.attention.self.query.weight)


def test_from_bert_splits_albert_s_one_shared_layer_applied_again(batch):
    """ALBERT applies one layer num_hidden_layers times: copies of it in the prelude and coda, the tied core its rest."""
    torch.manual_seed(0)
    hf = transformers.AlbertForMaskedLM(transformers.AlbertConfig(**{**TINY, "num_hidden_layers": 4},
                                                                  embedding_size=16)).eval()
    ours = bertode.from_bert(hf, prelude_layers=1, coda_layers=1, **EULER_1).eval()
    assert len(ours.bert.encoder.core.layer) == 1 and ours.bert.encoder.core.num_applications == 2
    assert (hf(**batch).logits - ours(**batch).logits).abs().max() <= 1e-5


def test_from_bert_gives_a_tied_core_the_first_or_the_mean_middle_layer(batch):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(tiny_bert_config(num_hidden_layers=3)).eval()
    once = bertode.from_bert(hf, prelude_layers=1, coda_layers=1, weight_tying=True, **EULER_1).eval()
    assert (hf(**batch).logits - once(**batch).logits).abs().max() <= 1e-5  # the core applied once
    deep = transformers.BertForMaskedLM(tiny_bert_config(num_hidden_layers=4)).eval()
    middle = [deep.bert.encoder.layer[i].intermediate.dense.weight for i in (1, 2)]
    for core_from, want in (("first", middle[0]), ("mean", (middle[0] + middle[1]) / 2)):
        tied = bertode.from_bert(deep, prelude_layers=1, coda_layers=1, weight_tying=True, core_from=core_from)
        assert len(tied.bert.encoder.core.layer) == 1
        assert torch.allclose(tied.bert.encoder.core.layer[0].feed_forward.branch.intermediate.weight, want)
    with pytest.raises(ValueError, match=r"^from_bert\(core_from='mean'\) is invalid without a weight-tied core"):
        bertode.from_bert(deep, core_from="mean")
    with pytest.raises(ValueError, match=r"^from_bert\(prelude_layers=2, coda_layers=2\) needs a source of more "
                                         r"than 4 layers, got 4; allowed: "):
        bertode.from_bert(deep, prelude_layers=2, coda_layers=2, weight_tying=True, num_hidden_layers=6)


def test_a_deq_core_trains_between_prelude_and_coda(batch):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**SPLIT, "num_hidden_layers": 3}, mode="deq", deq_max_iter=12)
    model = bertode.BertODEForMaskedLM(config).train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    encoder = model.bert.encoder
    for part in (encoder.prelude, encoder.core.layer, encoder.core.injection, encoder.coda):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    stats = model.solver_stats()
    assert 1 <= stats["forward_iterations"] <= 12 and stats["nfe_backward"] > 0
    assert stats["training_forwards"] == 1 and model.skipped_batches == 0
    assert encoder.observed_attention == "last" and encoder.checkpointing_refusal().startswith("mode='deq'")
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()


def test_a_weight_tied_core_is_one_layer_applied_again(batch):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**SPLIT, "num_hidden_layers": 5}, **EULER_1, weight_tying=True)
    model = bertode.BertODEModel(config).eval()
    encoder = model.encoder
    one_layer = sum(p.numel() for p in encoder.prelude[0].parameters())
    assert sum(p.numel() for p in encoder.core.parameters()) == one_layer
    assert sum(p.numel() for p in encoder.parameters()) == 3 * one_layer  # prelude, the core's one layer, coda
    mask = bertode.modeling.sdpa_mask(batch["attention_mask"], False, 10, torch.device("cpu"))
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        got = encoder(hidden, mask).hidden
        hidden = encoder.prelude[0](hidden, mask, Pass(0))[0]
        for index in range(3):
            hidden = encoder.core.layer[0](hidden, mask, Pass(index))[0]
        hidden = encoder.coda[0](hidden, mask, Pass(4))[0]
    assert (got - hidden).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", [dict(mode="deq"), dict(EULER_1, weight_tying=True, core_injection="add")],
                         ids=["deq", "looped"])
def test_save_and_load_keep_the_names_and_the_logits(batch, tmp_path, mode):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**SPLIT, **mode)).eval()
    model.save_pretrained(tmp_path)
    again = bertode.BertODEForMaskedLM.from_pretrained(tmp_path).eval()
    names = {re.sub(r"\.(\d+|weight|bias)(\..*)?$", "", n) for n, _ in again.named_parameters() if ".encoder." in n}
    assert names == {"bert.encoder.prelude", "bert.encoder.core.layer", "bert.encoder.core.injection",
                     "bert.encoder.coda"}
    assert torch.equal(model(**batch).logits, again(**batch).logits)


class StubCore(bertode.layers.encoder.Encoder):
    """A core that reports two iterates and reads the dial's readout, as an iterated core does."""

    def __init__(self, config):
        super().__init__()
        self.layer = torch.nn.ModuleList()
        self.skipped_batches = 0

    def forward(self, hidden, attn_mask, output_hidden_states=False):
        from bertode.solve.dial import current_dial

        dial = current_dial()
        dial.on_iterate(1, hidden * 2)
        dial.on_iterate(2, hidden * 3)
        self.read = dial.readout(hidden * 3)
        return EncoderOutput(hidden * 3, None, SolverStats())


def test_the_dial_sees_the_coda_applied(batch):
    torch.manual_seed(0)
    encoder = PreludeCodaEncoder(bertode.BertODEConfig(**SPLIT, mode="discrete"), {"discrete": StubCore}).eval()
    hidden, seen = torch.randn(2, 10, 32), []
    with torch.no_grad(), bertode.dialed(on_iterate=lambda n, h: seen.append((n, h)), readout=lambda h: h[..., :3]):
        out = encoder(hidden, None).hidden
        after_prelude = encoder.prelude[0](hidden, None, Pass(0))[0]
        coda = [encoder.coda[0](after_prelude * k, None, Pass(3))[0] for k in (2, 3)]
    assert [n for n, _ in seen] == [1, 2]
    assert (seen[0][1] - coda[0]).abs().max() <= 1e-6 and (seen[1][1] - coda[1]).abs().max() <= 1e-6
    assert (seen[-1][1] - out).abs().max() <= 1e-6  # the last iterate is the encoder's output
    assert (encoder.core.read - coda[1][..., :3]).abs().max() <= 1e-5


def test_a_looped_cores_last_iterate_is_the_models_output(batch):
    torch.manual_seed(0)
    model = bertode.BertODEModel(bertode.BertODEConfig(**SPLIT, **EULER_1, weight_tying=True)).eval()
    seen = []
    with torch.no_grad(), bertode.dialed(depth=3, on_iterate=lambda n, h: seen.append((n, h))):
        out = model(**batch).last_hidden_state
    assert [n for n, _ in seen] == [1, 2, 3]
    assert (seen[-1][1] - out).abs().max() <= 1e-6


def test_the_kl_exit_reads_the_heads_distributions_through_the_coda(batch):
    """A threshold every token passes at once: each token exits after one application (reported)."""
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**SPLIT, **EULER_1, weight_tying=True)).eval()
    with torch.no_grad():  # the coda's output is told apart by its mean: 5 per token (the core's: 0)
        model.bert.encoder.coda[0].feed_forward.norm.bias.fill_(5.0)
    read = []
    readout = model.readout
    model.readout = lambda hidden: read.append(hidden) or readout(hidden)
    with torch.no_grad(), bertode.dialed(depth=4, exit=bertode.make_exit_criterion("kl", 1e9)):
        early = model(**batch).logits
    stats = model.solver_stats()
    assert stats["exit_depth_max"] == 1 and stats["depth"] == 1
    with torch.no_grad(), bertode.dialed(depth=1):
        assert (model(**batch).logits - early).abs().max() <= 1e-6
    assert read and all(torch.allclose(h.mean(-1), torch.full((), 5.0), atol=1e-4) for h in read)  # the coda's


def test_activation_checkpointing_covers_prelude_core_and_coda_with_the_same_gradients(batch):
    torch.manual_seed(0)
    config = dict(SPLIT, **EULER_1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    plain = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**config)).train()
    checkpointed = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**config)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    calls = []
    for layer in checkpointed.modules():  # each layer checkpoints itself (transformers' GradientCheckpointingLayer)
        if isinstance(layer, bertode.layers.encoder.BertODELayer):
            func = layer._checkpoint
            layer._checkpoint = lambda *args, func=func, **kwargs: calls.append(1) or func(*args, **kwargs)
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert len(calls) == 4  # every layer: prelude, the core's two, coda
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is None or (p.grad - q.grad).abs().max() <= 1e-6, name


def test_a_split_leaving_no_core_is_refused():
    with pytest.raises(ValueError) as error:
        bertode.BertODEConfig(num_hidden_layers=4, prelude_layers=2, coda_layers=2).validate_ode()
    assert str(error.value) == ("BertODEConfig.prelude_layers=2 is invalid with coda_layers=2 and num_hidden_layers=4; "
                                "allowed: prelude_layers + coda_layers < 4 (the core keeps at least one layer)")
