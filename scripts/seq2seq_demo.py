"""The ODE Transformer's seq2seq setting at small scale (issue 26, part 4): reversal of digit strings.

    python scripts/seq2seq_demo.py --out results/seq2seq_demo_cpu.json     # ~1 minute on 2 CPU cores
    python scripts/seq2seq_demo.py --steps 50                              # a dry run

Two `transformers.EncoderDecoderModel`s, a bertode encoder (`BertODEModel`) and a bertode decoder
(`BertODEForCausalLM`, ``is_decoder=True, add_cross_attention=True``), same sizes, seed, data and
optimizer steps, trained with `transformers.Trainer`:

* ``rk2_gated``: ``mode="discrete", block="rk2_gated"``, the ODE Transformer's block (Li et al. 2021,
  arXiv 2104.02308): every layer (self-attention, cross-attention, feed-forward) is F, and
  y' = y + g F(y) + (1 - g) F(y + F(y)) with a learned per-token gate g, 2 * hidden + 1 parameters
  per layer;
* ``residual``: ``mode="discrete", block="none"``, BERT's residual layers (the baseline).

The task: the source is a string of ``--min-length``..``--max-length`` digits, the target the same
digits reversed, then EOS. Reversal, not sorting: every target token is one source token picked by
position, so nothing but cross-attention can produce it (the decoder sees no source otherwise) and a
model that ignores its encoder scores 10^-length; sorting could be half-solved by counting, and needs
more steps at this size. The held-out strings never occur in training.

Score: exact match, the share of held-out sources whose greedy ``generate`` (key/value cache on)
output, up to and including its first EOS, is the whole reversed string and EOS; at the end and every
``--curve-every`` steps (a Trainer callback, its time left out of training's). Written as JSON
(``--out``) with versions, machine, sizes, parameter counts and wall times, and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import EncoderDecoderModel, Trainer, TrainerCallback, TrainingArguments

from bertode import BertODEConfig, BertODEForCausalLM, BertODEModel

PAD, START, EOS = 0, 1, 2
DIGIT0 = 3  # digit d is token DIGIT0 + d
VOCAB = DIGIT0 + 10
BLOCKS = {"residual": "none", "rk2_gated": "rk2_gated"}


@dataclass
class Setting:
    """Everything both models share: sizes, data and optimisation."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    min_length: int = 4
    max_length: int = 12
    train_size: int = 20000
    eval_size: int = 500
    steps: int = 400
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0


# --- data --------------------------------------------------------------------------------
def digit_strings(count: int, setting: Setting, seed: int, exclude: frozenset = frozenset()) -> list[tuple]:
    """``count`` distinct random digit strings of ``min_length``..``max_length`` digits, none in ``exclude``."""
    lengths = range(setting.min_length, setting.max_length + 1)
    available = sum(10 ** n for n in lengths) - len(exclude)
    if count > available:
        raise ValueError(f"count={count} is invalid for lengths {setting.min_length}..{setting.max_length}; "
                         f"allowed: at most {available} distinct strings")
    rng, chosen = random.Random(seed), {}
    while len(chosen) < count:
        digits = tuple(rng.randrange(10) for _ in range(rng.choice(lengths)))
        if digits not in exclude:
            chosen.setdefault(digits, None)
    return list(chosen)


def target(digits: tuple) -> tuple:
    """The task: the digits reversed."""
    return digits[::-1]


def tokens(digits: tuple) -> list[int]:
    return [DIGIT0 + d for d in digits]


def splits(setting: Setting) -> tuple[list[tuple], list[tuple]]:
    """(train, held-out) strings; no held-out string occurs in training."""
    held_out = digit_strings(setting.eval_size, setting, seed=setting.seed + 1)
    train = digit_strings(setting.train_size, setting, seed=setting.seed + 2, exclude=frozenset(held_out))
    return train, held_out


class Reversal(torch.utils.data.Dataset):
    """Examples for `EncoderDecoderModel`: ``input_ids`` the digits, ``labels`` the reversed digits and EOS
    (the model shifts them right behind ``decoder_start_token_id`` itself)."""

    def __init__(self, strings: list[tuple]):
        self.strings = strings

    def __len__(self):
        return len(self.strings)

    def __getitem__(self, index):
        digits = self.strings[index]
        return {"input_ids": tokens(digits), "labels": tokens(target(digits)) + [EOS]}


def collate(examples: list[dict]) -> dict:
    """Pad sources with PAD (masked out) and labels with -100 (no loss)."""
    def pad(rows, value):
        width = max(map(len, rows))
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    sources = [example["input_ids"] for example in examples]
    return {"input_ids": pad(sources, PAD), "attention_mask": pad([[1] * len(row) for row in sources], 0),
            "labels": pad([example["labels"] for example in examples], -100)}


# --- model -------------------------------------------------------------------------------
def build_model(block: str, setting: Setting) -> EncoderDecoderModel:
    """An encoder-decoder of two bertode models, ``mode="discrete"`` with ``block`` over each layer."""
    torch.manual_seed(setting.seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=setting.hidden, num_hidden_layers=setting.layers,
                 num_attention_heads=setting.heads, intermediate_size=setting.intermediate,
                 max_position_embeddings=setting.max_length + 2, pad_token_id=PAD, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, mode="discrete", block=block)
    encoder = BertODEModel(BertODEConfig(**sizes), add_pooling_layer=False)
    decoder = BertODEForCausalLM(BertODEConfig(**sizes, is_decoder=True, add_cross_attention=True,
                                               bos_token_id=START, eos_token_id=EOS))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, PAD, EOS
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model: EncoderDecoderModel, strings: list[tuple], setting: Setting, log_every: int | None = None,
          callbacks: tuple = ()) -> list[float]:
    """``setting.steps`` AdamW steps with `transformers.Trainer` (no checkpoints, no reporting); the
    training losses it logged, one per ``log_every`` steps (default: a tenth of the run)."""
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir, max_steps=setting.steps, per_device_train_batch_size=setting.batch,
            learning_rate=setting.lr, warmup_steps=setting.warmup, lr_scheduler_type="linear", weight_decay=0.0,
            logging_steps=log_every or max(1, setting.steps // 10), save_strategy="no", report_to=[], seed=setting.seed,
            data_seed=setting.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=arguments, train_dataset=Reversal(strings), data_collator=collate,
                          callbacks=list(callbacks))
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def exact_match(model: EncoderDecoderModel, strings: list[tuple], batch: int = 250, **generate) -> float:
    """The share of ``strings`` whose greedy output (the cache on), cut after its first EOS, is the target
    and EOS."""
    model.eval()
    correct = 0
    for first in range(0, len(strings), batch):
        chunk = strings[first:first + batch]
        inputs = collate(Reversal(chunk))
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=max(map(len, chunk)) + 1, do_sample=False, num_beams=1,
                             use_cache=True, **generate)
        for digits, row in zip(chunk, out[:, 1:].tolist()):  # drop decoder_start_token_id
            produced = row[:row.index(EOS) + 1] if EOS in row else row
            correct += produced == tokens(target(digits)) + [EOS]
    return correct / len(strings)


class ExactMatchCurve(TrainerCallback):
    """Exact match on the held-out strings after every ``every`` optimizer steps, and the seconds it took
    (left out of the training time)."""

    def __init__(self, held_out: list[tuple], every: int):
        self.held_out, self.every, self.points, self.seconds = held_out, every, {}, 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            start = time.perf_counter()
            self.points[state.global_step] = exact_match(model, self.held_out)
            model.train()
            self.seconds += time.perf_counter() - start


def run_one(name: str, setting: Setting, train_strings, held_out, curve_every: int = 0) -> dict:
    model = build_model(BLOCKS[name], setting)
    curve = ExactMatchCurve(held_out, curve_every)
    start = time.perf_counter()
    loss = train(model, train_strings, setting, callbacks=(curve,))[-1]
    train_s = time.perf_counter() - start - curve.seconds
    start = time.perf_counter()
    accuracy = exact_match(model, held_out)
    curve.points[setting.steps] = accuracy
    return dict(model=name, block=BLOCKS[name], parameters=parameter_count(model), final_train_loss=round(loss, 4),
                exact_match=accuracy, exact_match_by_step=curve.points, train_seconds=round(train_s, 1),
                generate_seconds=round(time.perf_counter() - start, 2))


# --- command line ------------------------------------------------------------------------
def environment() -> dict:
    return dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                torch_threads=torch.get_num_threads(), python=platform.python_version(), dtype="float32",
                torch=torch.__version__, transformers=metadata.version("transformers"))


def table(rows: list[dict]) -> str:
    steps = sorted(rows[0]["exact_match_by_step"])
    lines = ["| model | block | parameters | " + " | ".join(f"exact match @{n}" for n in steps)
             + " | final train loss | train s | generate s |", "|---|---|---:|" + "---:|" * (len(steps) + 3)]
    lines += [f"| {r['model']} | `{r['block']}` | {r['parameters']:,} | "
              + " | ".join(f"{r['exact_match_by_step'][n]:.3f}" for n in steps)
              + f" | {r['final_train_loss']:.4f} | {r['train_seconds']} | {r['generate_seconds']} |" for r in rows]
    return "\n".join(lines)


def parse(argv=None) -> tuple[Setting, argparse.Namespace]:
    defaults = Setting()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--curve-every", type=int, default=50,
                        help="also score the held-out set every this many steps (0: at the end only)")
    parser.add_argument("--models", nargs="+", choices=list(BLOCKS), default=list(BLOCKS))
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these matmuls are too small to share, and on a busy machine "
                             "OpenMP's spin-waits made 2 threads 40x slower)")
    args = parser.parse_args(argv)
    setting = Setting(**{field: getattr(args, field) for field in asdict(defaults)})
    if not 1 <= setting.min_length <= setting.max_length:
        parser.error(f"--min-length {setting.min_length} / --max-length {setting.max_length} is invalid; "
                     "allowed: 1 <= min-length <= max-length")
    return setting, args


def main(argv=None) -> dict:
    setting, args = parse(argv)
    torch.set_num_threads(args.threads)
    train_strings, held_out = splits(setting)
    rows = [run_one(name, setting, train_strings, held_out, args.curve_every) for name in args.models]
    result = dict(task="reversal of digit strings", mode="discrete", setting=asdict(setting),
                  environment=environment(), rows=rows)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
