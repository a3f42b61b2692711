"""The LM head's training step over a word vocabulary: ``lm_head_type=adaptive`` against the tied full softmax
(``lm_head_type=linear``, bertode's fused `linear_cross_entropy`), in one process, on the same hidden states.

    python scripts/bench_adaptive.py --vocab 33278 --hidden 256 --rows 4096 --cutoffs 2000,10000

Both heads take sparse prediction's path (``cls.predictions.scored``: the scored rows' loss; the returned
logits computed too, as training logs them) and its backward. Measured: the median time of ``--steps`` steps
(forward + backward of the head's loss) after ``--warmup``, and the bytes autograd saves for the backward.
Writes a table and JSON (``--out``) with the device, dtype, sizes and versions; ratios are adaptive / linear.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import bertode
from bertode.modeling import BertODEForMaskedLM


def _head(kind: str, args):
    extra = {"lm_head_type": kind}
    if kind == "adaptive":
        extra.update(adaptive_cutoffs=[int(c) for c in args.cutoffs.split(",")], adaptive_div_value=args.div_value)
    config = bertode.BertODEConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=4 * args.hidden, mode="discrete", **extra)
    torch.manual_seed(0)
    return BertODEForMaskedLM(config).cls.predictions


def _saved_bytes(step) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(backward=False)
    return total


def measure(kind: str, args, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
    head = _head(kind, args)

    def step(backward: bool = True):
        loss, _ = head.scored(hidden, labels, "mean")
        if backward:
            loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - started)
    return {"head": kind, "seconds": statistics.median(times), "saved_bytes": _saved_bytes(step),
            "loss": loss.item(), "parameters": sum(p.numel() for p in head.parameters())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=33278)  # WikiText-2's word vocabulary
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cutoffs", default="2000,10000")
    parser.add_argument("--div-value", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=generator, requires_grad=True)
    # Zipf-like targets, as words are: most rows in the head cluster
    ranks = torch.arange(1, args.vocab + 1, dtype=torch.float64)
    labels = torch.multinomial(1 / ranks, args.rows, replacement=True, generator=generator)
    rows = [measure(kind, args, hidden, labels) for kind in ("linear", "adaptive")]
    result = {"rows": rows, "ratio_seconds": rows[1]["seconds"] / rows[0]["seconds"],
              "ratio_saved_bytes": rows[1]["saved_bytes"] / rows[0]["saved_bytes"], "device": "cpu",
              "dtype": "fp32", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "sizes": vars(args)}
    print(f"{'head':10s} {'ms/step':>10s} {'saved MB':>10s} {'params':>10s} {'loss':>8s}")
    for row in rows:
        print(f"{row['head']:10s} {1000 * row['seconds']:10.1f} {row['saved_bytes'] / 2**20:10.1f} "
              f"{row['parameters']:10,d} {row['loss']:8.3f}")
    print(f"adaptive / linear: time {result['ratio_seconds']:.3f}, saved bytes {result['ratio_saved_bytes']:.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
