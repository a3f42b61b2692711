"""Where a training step's time goes: a `torch.profiler` summary of bench_speed's rows.

    python scripts/profile_steps.py --size base --device cuda --dtype bf16 --rows euler_1,dopri5_1e-3

For each row (names as in ``bench_speed.py``; the same converted model, batch and dtype) it
runs ``--warmup`` untimed training steps, then profiles ``--steps`` steps and writes, per
row: the wall time per step, the device time per step (the sum of the kernels' and
copies' own device time; one stream, so they do not overlap), the share of the step spent
outside kernels (1 - device / wall: launch overhead, host work and synchronisation
waits), the number of kernel launches per step, and the top ``--top`` operators by device
time. Output: a text summary (``--out``, default stdout) and, with ``--json``, the numbers.
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import _bench_common as common
from bench_speed import ROWS


def profile_row(name: str, args, device, sizes) -> tuple[dict, str]:
    kind, overrides = ROWS[name]
    source = common.hf_source(sizes, args.seed, layers=1 if kind == "one_layer" else None,
                              weight_scale=args.weight_scale)
    model = source if kind == "hf" else common.bertode_model(source, **overrides)
    model.to(device).train()
    batch, _ = common.mlm_batch(sizes, device, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = common.make_step(model, batch, optimizer, device, args.dtype)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    device_s = sum(e.self_device_time_total for e in kernels) / 1e6
    numbers = dict(name=name, wall_ms_per_step=1e3 * wall / args.steps,
                   device_ms_per_step=1e3 * device_s / args.steps,
                   outside_kernels=(1 - device_s / wall) if kernels else None,
                   kernels_per_step=len(kernels) / args.steps)
    sort = "self_device_time_total" if kernels else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60)
    return numbers, table


def main(argv=None) -> None:
    p = common.parser(__doc__, steps=3, warmup=2)
    p.add_argument("--rows", default="euler_1,dopri5_1e-3", help="comma-separated bench_speed rows")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--weight-scale", type=float, default=4.0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    device = common.setup(args)
    sizes = common.sizes_of(args)
    names = common.row_names(p, args.rows, ROWS)
    payload = common.header(args, device, sizes, rows=[])
    out = open(args.out, "w") if args.out else None

    def emit(text: str) -> None:  # row by row: a row that hangs (a timeout) keeps the earlier ones
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()

    emit(f"device {payload['device']}, dtype {args.dtype}, sizes {sizes}, versions {payload['versions']}")
    for name in names:
        torch.manual_seed(args.seed)
        numbers, table = profile_row(name, args, device, sizes)
        payload["rows"].append(numbers)
        outside = numbers["outside_kernels"]
        emit(f"\n== {name}: {numbers['wall_ms_per_step']:.1f} ms/step wall, "
             f"{numbers['device_ms_per_step']:.1f} ms/step in kernels, "
             f"{'-' if outside is None else format(outside, '.1%')} outside kernels, "
             f"{numbers['kernels_per_step']:.0f} kernels/step\n{table}")
        if args.json:
            common.write_json(args.json, payload, "profile_steps", device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
