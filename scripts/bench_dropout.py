"""A rank's training-step time with split-invariant dropout at simulated world sizes (issue 27).

    python scripts/bench_dropout.py --size small --device cpu --out results/bench_dropout_cpu.json
    python scripts/bench_dropout.py --size base --device cuda --dtype bf16 --batch 32

In one process, one bertode model converted from a seeded HF BERT (`_bench_common`; Euler
with one step, = BERT, eager attention) with hidden and attention dropout ``--p`` (0.1,
BERT's default) times one training step (MLM forward, backward, AdamW step) of a rank
whose local batch is fixed, inside `bertode.layers.dropout.split_invariant` as
`bertode.train` enters it: rank 0's rows (0, world, 2 world, ...) of a micro-batch of
``world * batch`` rows, for each ``--worlds`` size. Two implementations of the draw:

* ``streams``: `bertode.layers.dropout` as shipped (each row's own counter-based stream:
  this rank's rows only);
* ``global``: the draw before it, reimplemented here in a few lines (`global_keep_mask`):
  a Bernoulli mask of the *global* shape from torch's generator, this rank's rows kept.

Rounds are interleaved (each round times one step of every (implementation, world)
row) so a shared machine's drifting load falls on all rows alike; the table reports the
median over ``--steps`` rounds and the ratio to the same implementation at world 1.
Each row also reports this process's CPU time per step (``time.process_time``; on a
shared CPU machine, with ``--threads 1``, the steadier measure of the work done). The
model's weights move with every step, which changes no step's cost.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
from bertode.layers import dropout, encoder, sublayers  # noqa: E402
from bertode.layers.dropout import split_invariant  # noqa: E402

IMPLEMENTATIONS = ("streams", "global")
CALLERS = (dropout, encoder, sublayers)  # the modules that call keep_mask by name


def global_keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """The earlier `keep_mask`: drawn for the global batch, this process's rows kept."""
    split = dropout._ACTIVE.split
    if split is None:
        return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)
    full = torch.empty((split.global_rows, *like.shape[1:]), dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    return full.index_select(0, split.rows).div_(1 - p)


def use(implementation: str) -> None:
    """Point every caller of ``keep_mask`` at the implementation's."""
    shipped = dropout.__dict__.setdefault("_shipped_keep_mask", dropout.keep_mask)
    for module in CALLERS:
        module.keep_mask = shipped if implementation == "streams" else global_keep_mask


def main() -> None:
    p = common.parser(__doc__, steps=7, warmup=1)
    p.add_argument("--worlds", default="1,8,64", help="simulated world sizes (comma-separated)")
    p.add_argument("--p", type=float, default=0.1, help="hidden and attention dropout probability")
    p.add_argument("--implementations", default="streams,global")
    args = p.parse_args()
    device = common.setup(args)
    worlds = [int(w) for w in args.worlds.split(",")]
    implementations = common.row_names(p, args.implementations, IMPLEMENTATIONS)
    sizes = common.sizes_of(args)
    model = common.bertode_model(common.hf_source(sizes, args.seed), solver="euler", steps=1,
                                 hidden_dropout_prob=args.p, attention_probs_dropout_prob=args.p).to(device).train()
    batch, source = common.mlm_batch(sizes, device, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = common.make_step(model, batch, optimizer, device, args.dtype)
    rows = [(impl, world) for impl in implementations for world in worlds]

    def timed(impl: str, world: int, micro_batch: int) -> tuple[float, float]:
        """(wall ms, this process's CPU ms) of one step."""
        use(impl)
        own = torch.arange(sizes["batch"]) * world  # rank 0's rows of the global micro-batch
        common.sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with split_invariant(micro_batch, own, sizes["batch"] * world, device):
            step()
        common.sync(device)
        return 1e3 * (time.perf_counter() - start), 1e3 * (time.process_time() - cpu_start)

    times = {row: [] for row in rows}
    for round_ in range(args.warmup + args.steps):
        for impl, world in rows:
            measured = timed(impl, world, round_)
            if round_ >= args.warmup:
                times[(impl, world)].append(measured)
    use("streams")

    def median(impl, world, which):
        return statistics.median(t[which] for t in times[(impl, world)])

    results = []
    for impl, world in rows:
        wall, cpu = median(impl, world, 0), median(impl, world, 1)
        results.append(dict(name=f"{impl}_world{world}", implementation=impl, world=world,
                            local_batch=sizes["batch"], global_rows=sizes["batch"] * world,
                            ms_per_step=wall, ratio_to_world1=wall / median(impl, worlds[0], 0),
                            cpu_ms_per_step=cpu, cpu_ratio_to_world1=cpu / median(impl, worlds[0], 1),
                            times_ms=[t[0] for t in times[(impl, world)]]))
    payload = dict(common.header(args, device, sizes, data=source, dropout=args.p, worlds=worlds,
                                 model="from_bert, solver=euler steps=1, eager attention"), rows=results)
    common.print_header(payload)
    print(common.markdown_table(results, [("name", "row", ""), ("world", "world", "d"), ("global_rows", "global rows", "d"),
                                          ("ms_per_step", "ms/step", ".1f"), ("ratio_to_world1", "ratio to world 1", ".3f"),
                                          ("cpu_ms_per_step", "CPU ms/step", ".1f"), ("cpu_ratio_to_world1", "CPU ratio", ".3f")]))
    print("wrote", common.write_json(args.out, payload, "bench_dropout", device))


if __name__ == "__main__":
    main()
