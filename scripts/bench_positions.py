"""Training-step time of the position schemes, as a ratio to ``absolute`` measured in the same run.

    python scripts/bench_positions.py --size small --device cpu --threads 2 --out results/bench_positions_cpu_small.json

One causal LM per scheme (``absolute``, ``rotary``, ``transformer_xl``, ``deberta``: c2p and p2c over
``max_relative_positions`` = the model's positions) at `_bench_common`'s sizes
(``--seq`` overrides the length: the relative terms grow with it), each in ``--modes`` (``discrete``:
one attention evaluation per layer; ``rk4``: 2 rk4 steps, 8 per layer, where the position tables
are recomputed at every evaluation). A step is forward, backward and an AdamW step on one seeded
batch. Rounds are interleaved (each round times one step of every row) and the median over
``--steps`` rounds is reported, wall and this process's CPU time, with the ratio to the
``absolute`` row of the same mode.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
import bertode  # noqa: E402
from bertode.causal_lm import BertODEForCausalLM  # noqa: E402

SCHEMES = ("absolute", "rotary", "transformer_xl", "deberta")
MODES = {"discrete": dict(mode="discrete"), "rk4": dict(mode="ode", solver="rk4", steps=2)}


def build(sizes: dict, scheme: str, mode: str, seed: int, device) -> BertODEForCausalLM:
    torch.manual_seed(seed)
    config = bertode.BertODEConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], intermediate_size=sizes["intermediate"],
        max_position_embeddings=max(512, sizes["seq"]), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True, position_scheme=scheme, **MODES[mode])
    return BertODEForCausalLM(config).to(device).train()


def main() -> None:
    p = common.parser(__doc__, steps=5, warmup=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the size's)")
    p.add_argument("--modes", default="discrete,rk4", help=f"comma-separated, of {', '.join(MODES)}")
    args = p.parse_args()
    modes = common.row_names(p, args.modes, list(MODES))
    device = common.setup(args)
    sizes = dict(common.SIZES[args.size])
    sizes["seq"] = args.seq or sizes["seq"]
    if args.batch:
        sizes["batch"] = args.batch
    ids = torch.randint(5, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows = {(mode, scheme): build(sizes, scheme, mode, args.seed, device) for mode in modes for scheme in SCHEMES}
    optimizers = {key: torch.optim.AdamW(model.parameters(), lr=1e-4) for key, model in rows.items()}
    wall = {key: [] for key in rows}
    cpu = {key: [] for key in rows}
    for round_ in range(args.warmup + args.steps):
        for key, model in rows.items():
            common.sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            with common.autocast(device, args.dtype):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            common.sync(device)
            if round_ >= args.warmup:
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
    table = []
    for (mode, scheme) in rows:
        ms, cpu_ms = 1e3 * statistics.median(wall[(mode, scheme)]), 1e3 * statistics.median(cpu[(mode, scheme)])
        base, base_cpu = (1e3 * statistics.median(x[(mode, "absolute")]) for x in (wall, cpu))
        table.append(dict(mode=mode, scheme=scheme, step_ms=round(ms, 2), cpu_ms=round(cpu_ms, 2),
                          vs_absolute=round(ms / base, 3), cpu_vs_absolute=round(cpu_ms / base_cpu, 3)))
    payload = {**common.header(args, device, sizes), "rows": table}
    common.print_header(payload)
    print("| mode | scheme | step ms | CPU ms | wall / absolute | CPU / absolute |\n| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['mode']} | {row['scheme']} | {row['step_ms']} | {row['cpu_ms']} | {row['vs_absolute']} | "
              f"{row['cpu_vs_absolute']} |")
    print(f"wrote {common.write_json(args.out, payload, 'bench_positions', device)}")


if __name__ == "__main__":
    main()
