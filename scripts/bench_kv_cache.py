"""Milliseconds per new token with and without a key/value cache, at two context lengths (issue 26).

    python scripts/bench_kv_cache.py --size tiny --device cpu --out results/bench_kv_cache_cpu_tiny.json
    python scripts/bench_kv_cache.py --size small --device cpu --threads 1

One seeded HF `BertLMHeadModel` (a decoder, `_bench_common`'s sizes) is the peer and the source of
every bertode row (`from_bert`: the same weights): HF itself, bertode at Euler-1 (= BERT), an ODE
solve of rk4 with 2 steps per site (8 attention evaluations per layer), and a DEQ (the layers as one
fixed-point map, ``deq_tol`` 1e-4). For each row and each ``--contexts`` length N, one decoding step
is timed: the logits of token N + 1 given N tokens, batch ``--batch`` (default 1, as generation):

* ``cache``: the N tokens' keys and values are in a `DynamicCache` (filled once, untimed); the step
  is the forward of the one new token; the cache is cut back after it, so every step sees N;
* ``no cache``: the forward of all N + 1 tokens (``logits_to_keep=1``), what generation without a
  cache does at every step.

Rounds are interleaved (each round times one step of every row), and the table reports the median
over ``--steps`` rounds (wall and this process's CPU time, the steadier measure on a shared machine with
``--threads 1``), the speed-up of the cache, and the growth from the shortest context to the
longest (sublinear with the cache: the new token's work is one query against N keys).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertLMHeadModel, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
import bertode  # noqa: E402

MODELS = {"hf": None, "euler1": dict(solver="euler", steps=1), "rk4x2": dict(solver="rk4", steps=2),
          "deq": dict(mode="deq", deq_tol=1e-4, deq_max_iter=40)}


def hf_decoder(sizes: dict, seed: int, contexts: list[int]) -> BertLMHeadModel:
    config = BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
                        num_attention_heads=sizes["heads"], intermediate_size=sizes["intermediate"],
                        max_position_embeddings=max(512, max(contexts) + 1), is_decoder=True,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertLMHeadModel._from_config(config, attn_implementation="sdpa").eval()


def main() -> None:
    p = common.parser(__doc__, steps=9, warmup=2)
    p.add_argument("--contexts", default="32,256", help="context lengths (comma-separated)")
    p.add_argument("--rows", default=",".join(MODELS), help=f"models, of {', '.join(MODELS)}")
    args = p.parse_args()
    device = common.setup(args)
    sizes = common.sizes_of(args)
    batch = args.batch or 1
    contexts = [int(c) for c in args.contexts.split(",")]
    names = common.row_names(p, args.rows, MODELS)
    source = hf_decoder(sizes, args.seed, contexts).to(device)
    models = {name: (source if MODELS[name] is None else bertode.from_bert(source, **MODELS[name]).eval())
              for name in names}
    tokens = torch.randint(5, sizes["vocab"], (batch, max(contexts) + 1),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    caches, gaps = {}, {}
    with torch.no_grad():
        for name, model in models.items():
            for n in contexts:
                cache = DynamicCache()
                model(tokens[:, :n], cache=cache, use_cache=True)
                caches[(name, n)] = cache
                # what is timed computes the same logits either way (a DEQ: to its tolerance)
                cached = model(tokens[:, n:n + 1], cache=cache, use_cache=True).logits[:, -1]
                cache.crop(-1)
                whole = model(tokens[:, :n + 1], use_cache=False, logits_to_keep=1).logits[:, -1]
                gaps[(name, n)] = (cached - whole).abs().max().item()

    def step(name: str, n: int, cached: bool):
        model = models[name]
        with torch.no_grad(), common.autocast(device, args.dtype):
            if cached:
                cache = caches[(name, n)]
                model(tokens[:, n:n + 1], cache=cache, use_cache=True)
                cache.crop(-1)  # back to the N context tokens (transformers counts from the end)
            else:
                model(tokens[:, :n + 1], use_cache=False, logits_to_keep=1)

    rows = [(name, n, cached) for name in names for n in contexts for cached in (True, False)]
    times = {row: [] for row in rows}
    for round_ in range(args.warmup + args.steps):
        for row in rows:
            common.sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(*row)
            common.sync(device)
            if round_ >= args.warmup:
                times[row].append((1e3 * (time.perf_counter() - start), 1e3 * (time.process_time() - cpu_start)))

    def ms(name, n, cached, which=0):
        return statistics.median(t[which] for t in times[(name, n, cached)])

    results = []
    for name, n, cached in rows:
        results.append(dict(name=f"{name}_{'cache' if cached else 'no_cache'}_{n}", model=name, context=n,
                            cache=cached, ms_per_token=ms(name, n, cached),
                            cache_speedup=ms(name, n, False) / ms(name, n, True) if cached else None,
                            growth_from_shortest=ms(name, n, cached) / ms(name, contexts[0], cached),
                            ratio_to_hf=ms(name, n, cached) / ms("hf", n, cached) if "hf" in names else None,
                            max_logit_gap=gaps[(name, n)],
                            cpu_ms_per_token=ms(name, n, cached, 1),
                            cpu_cache_speedup=ms(name, n, False, 1) / ms(name, n, True, 1) if cached else None,
                            cpu_growth_from_shortest=ms(name, n, cached, 1) / ms(name, contexts[0], cached, 1),
                            times_ms=[t[0] for t in times[(name, n, cached)]]))
    payload = dict(common.header(args, device, sizes, batch=batch, contexts=contexts,
                                 models={k: MODELS[k] for k in names}), rows=results)
    common.print_header(payload)
    print(common.markdown_table(results, [("model", "model", ""), ("context", "context", "d"), ("cache", "cache", ""),
                                          ("ms_per_token", "ms/token", ".2f"), ("cache_speedup", "cache speed-up", ".2f"),
                                          ("growth_from_shortest", f"x vs {contexts[0]}", ".2f"),
                                          ("ratio_to_hf", "ratio to HF", ".2f"), ("cpu_ms_per_token", "CPU ms", ".2f"),
                                          ("cpu_cache_speedup", "CPU speed-up", ".2f"),
                                          ("cpu_growth_from_shortest", f"CPU x vs {contexts[0]}", ".2f")]))
    print("wrote", common.write_json(args.out, payload, "bench_kv_cache", device))


if __name__ == "__main__":
    main()
