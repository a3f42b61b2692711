"""`python -m bertode.generate checkpoint=DIR prompt='...'`: continue a prompt with a causal LM.

    python -m bertode.generate checkpoint=outputs/.../final prompt='the whale' max_new_tokens=30
    python -m bertode.generate checkpoint=DIR do_sample=true temperature=0.8 top_k=20 num_return_sequences=3
    python -m bertode.generate checkpoint=DIR solver=rk4 solver.steps=4     # another solve than trained
    python -m bertode.generate checkpoint=DIR depth.steps=16 exit=kl exit.threshold=0.01   # a looped or DEQ model

DIR holds a `BertODEForCausalLM` and its tokenizer (``bertode.train objective=clm``'s
``final/``). The prompt is tokenized without special tokens after the tokenizer's [CLS]
(where it has one), as training rows begin; transformers' ``generate`` continues it
(greedy, or sampling seeded by ``seed``), with a key/value cache wherever it is exact (``use_cache``:
null; true refuses an adaptive solver or ``exit=`` in one line; false recomputes the prefix; `causal_lm.py`).
``depth.steps=N`` dials the depth of every forward (a DEQ's iterations, a looped core's
applications, an untied ODE's steps per solve) and ``exit=`` a per-token exit criterion
(DEQ and weight-tied models; `bertode.training.depth`).
A masked LM, which cannot generate, and every bad option are refused in one line, exit 2,
before the model is loaded. Prints each sequence (prompt and continuation) on a line; writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from .causal_lm import BertODEForCausalLM
from .training import solve_overrides
from .training.checks import check_count, torch_device
from .training.cli import hydra_entry, import_plugins, prechecked, usage_errors
from .training.corpus import load_tokenizer
from .training.depth import inference_dial, inference_dialed
from .training.evaluate import read_checkpoint


def _check_number(key: str, value, low: float, high: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > low
    if not ok or (high is not None and value > high):
        bound = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
        raise ValueError(f"{key}={value!r} is invalid; allowed: a number {bound}")


def validate(cfg) -> tuple[Path, dict, dict]:
    """Every check that needs neither the model's weights nor its tokenizer: the folder and its config.json."""
    import_plugins(cfg.get("plugins"))
    folder, saved = read_checkpoint(cfg)
    if "BertODEForCausalLM" not in (saved.get("architectures") or []) or not saved.get("is_decoder"):
        kind = ", ".join(saved.get("architectures") or ["a model without a language-model head"])
        raise ValueError(f"checkpoint={str(folder)!r} is invalid for generation: it is {kind} (bidirectional "
                         "attention), which cannot generate; allowed: a causal LM's directory (bertode.train "
                         "objective=clm, or a converted GPT-2 / BertLMHeadModel saved with its tokenizer)")
    if not isinstance(cfg.prompt, str):
        raise ValueError(f"prompt={cfg.prompt!r} is invalid; allowed: a string (quote it: prompt='...')")
    check_count("max_new_tokens", cfg.max_new_tokens, 1)
    check_count("top_k", cfg.top_k, 0)
    check_count("num_return_sequences", cfg.num_return_sequences, 1)
    check_count("seed", cfg.seed, 0)
    if cfg.do_sample not in (True, False):
        raise ValueError(f"do_sample={cfg.do_sample!r} is invalid; allowed: true, false")
    _check_number("temperature", cfg.temperature, 0.0)
    _check_number("top_p", cfg.top_p, 0.0, 1.0)
    greedy_defaults = {"num_return_sequences": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    for key, default in greedy_defaults.items():  # what greedy search would silently ignore
        if not cfg.do_sample and cfg[key] != default:
            raise ValueError(f"{key}={cfg[key]!r} is invalid with do_sample=false (greedy search does not sample); "
                             f"allowed: {default!r}, or do_sample=true")
    torch_device(cfg.device)
    fields = solve_overrides.checkpoint_fields(cfg, saved)
    solve_overrides.check_parameters(BertODEForCausalLM, folder, saved, fields)
    _, criterion = inference_dial(cfg, {**saved, **fields}, "generate")  # depth.steps=N and exit=: checked
    use_cache = cfg.get("use_cache")
    if use_cache not in (None, True, False):
        raise ValueError(f"use_cache={use_cache!r} is invalid; allowed: null (wherever exact), true, false")
    if use_cache:
        from .configuration import BertODEConfig
        from .layers.kv_cache import config_refusal

        refusal = config_refusal(BertODEConfig(**{**saved, **fields}))
        refusal = refusal or (f"exit={criterion.registry_name!r} (per-token exit)" if criterion is not None else None)
        if refusal:
            raise ValueError(f"use_cache=true is invalid with {refusal}; allowed: use_cache=false or null")
    return folder, saved, fields


def run(cfg, run_dir: Path | None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from . import causal_lm  # noqa: F401  (registers AutoModelForCausalLM)

    with usage_errors():
        folder, saved, chosen = prechecked(cfg, validate)
        tokenizer = load_tokenizer(folder)
        ids = tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]
        start = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
        if not ids and not start:
            raise ValueError("prompt='' is invalid for a tokenizer without a [CLS] token; allowed: a non-empty prompt")
        ids = start + ids
        limit = int(saved["max_position_embeddings"])
        if len(ids) + cfg.max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} is invalid: the prompt's {len(ids)} tokens plus "
                             f"it exceed the model's {limit} positions; allowed: <= {limit - len(ids)}")
    device = torch_device(cfg.device)
    with usage_errors():
        model = solve_overrides.load(AutoModelForCausalLM, folder, chosen).to(device).eval()
    torch.manual_seed(int(cfg.seed))
    sampling = dict(temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p)) \
        if cfg.do_sample else {}
    # Rows that stop early are padded: the tokenizer's pad, else its (or the model's) end of text.
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, model.generation_config.eos_token_id)
                if isinstance(t, int)), 0)
    depth, criterion = inference_dial(cfg, {**saved, **chosen}, "generate")
    use_cache = cfg.get("use_cache")
    if use_cache is None:  # wherever exact: the model's default, and no cache beside per-token exit
        use_cache = bool(model.generation_config.use_cache) and criterion is None
    with torch.no_grad(), inference_dialed(depth, criterion):  # every forward at depth.steps, with exit=
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=int(cfg.max_new_tokens),
                             do_sample=bool(cfg.do_sample), num_return_sequences=int(cfg.num_return_sequences),
                             pad_token_id=pad, use_cache=use_cache, **sampling)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out.tolist()]  # the prompt and its continuation
    for text in texts:
        print(text, flush=True)
    return texts


main = hydra_entry("generate", run, precheck=validate, lock=False)  # writes into the shared "."

if __name__ == "__main__":
    main()
