"""`python -m bertode.train`: Hydra-configured language-model training (``objective=mlm``,
BERT's masked LM, or ``clm``, next-token prediction over causal attention; `objective.py`).

    python -m bertode.train                                   # tiny ODE-BERT on the embedded sample
    python -m bertode.train solver=dopri5 sensitivity=adjoint solver.atol=1e-4
    python -m bertode.train model=deq deq.solver=broyden sensitivity=phantom
    python -m bertode.train objective=clm model.norm_position=pre solver=rk4
    python -m bertode.train -m solver=euler,rk4 seed=1,2      # a sweep, one directory per run
    torchrun --nproc_per_node=2 -m bertode.train              # DDP (gloo on CPU, NCCL on GPU)

The run directory (Hydra's) receives ``.hydra/`` (the composed config), ``metrics.jsonl``,
``checkpoints/`` and ``final/`` (model + tokenizer, loadable with the Auto classes).
Bad input stops the run with one line on stderr naming the field, and exit status 2,
leaving the run directory as it was (absent if it was). Resuming (``trainer.resume``)
with a model setting other than the checkpoint's (``solver=rk4`` on an Euler run, any
`BertODEConfig` field but `resume.NEUTRAL_FIELDS`) is refused naming the key, before
Hydra rewrites ``.hydra/``, and so is another ``depth=`` (the depth drawn per optimizer
step, `depth.py`: the step logged as ``step: s`` runs at ``draw(seed, s)``, logged as
``depth``; evaluation runs at the model's own depth).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..analysis import dynamics_probe
from ..compile import compile_model, resolve_scope
from ..layers.dropout import split_invariant
from . import checkpoint, lock, resume
from .checks import check_run
from .cli import hydra_entry, import_plugins, prechecked, usage_errors
from .corpus import check_data, prepare, unigram_cross_entropy
from .depth import check_for_model, depth_setting
from .sources import DataError, check_sources
from .distributed import Distributed
from .stream import batch_order, check_layout, check_shards
from .lm import autocast, evaluate, fixed_eval_batches, masked_ce_sum, scored
from .objective import get_objective, make_objective
from .run_config import announced_vocab_size, forget_model_configs, model_config
from .run_log import RunLog, check_logger, keep_until, progress_line, write_model_card
from .schedule import lr_factor
from .segments import MemoryCarry, SegmentOrder, check_eval_memory, memory_length, ordered_eval_batches
from .words import perplexity_unit


def _optimizer(model, trainer, device):
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": trainer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=tuple(trainer.betas), fused=device.type == "cuda")


def _numeric_stats(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def validate(cfg: DictConfig, read_sources: bool = True):
    """Every check of the composed config that needs no data: also run before Hydra writes
    the run directory (`cli.hydra_entry`). Returns the model config (vocabulary size 1)."""
    trainer = cfg.trainer
    check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    import_plugins(cfg.get("plugins"))
    check_logger(cfg.logger.kind)
    head = get_objective(cfg.objective)(None).model_class
    config = model_config(cfg, announced_vocab_size(cfg))  # validates the model before any data work
    drawn = depth_setting(cfg.get("depth"))
    check_for_model(drawn, config.to_dict())
    if trainer.compile not in (False, None) and not drawn.fixed:
        raise ValueError(f"trainer.compile={trainer.compile} is invalid with depth={drawn.name!r}: each drawn depth "
                         "compiles a graph of its own, and torch.compile falls back to eager after 8; allowed: "
                         "trainer.compile=false, or depth=fixed")
    if trainer.get("dynamics_every") and config.mode == "discrete" and not config.weight_tying:
        raise ValueError(f"trainer.dynamics_every={trainer.dynamics_every} is invalid with mode='discrete' and untied "
                         "layers (no flow, no iterated map to read); allowed: 0, or an ODE, DEQ or weight-tied model")
    try:
        with torch.device("meta"):  # and its modules' own checks (a field's or block's arguments)
            head(config)
    except (RuntimeError, NotImplementedError):
        pass  # a module that cannot be built without data (reads a tensor): checked when built for real
    if trainer.compile not in (True, False):
        try:
            resolve_scope(trainer.compile, config)
        except ValueError as error:
            raise ValueError(str(error).replace("compile scope=", "trainer.compile=", 1)) from None
    check_data(cfg.data)
    check_eval_memory(trainer.get("eval_mem_len"), config.mem_len)
    if config.mem_len and cfg.data.get("streaming"):
        raise DataError(f"data.streaming=true is invalid with model.mem_len={config.mem_len} (a segment memory reads "
                        "each batch row's text in order, from packed rows); allowed: data.streaming=false")
    if cfg.data.get("streaming"):
        problem = check_layout(cfg.data.stream_shards, cfg.data.num_workers, int(os.environ.get("WORLD_SIZE", "1")))
        if problem:
            raise DataError(problem)
    if read_sources:  # a streaming pass over local files; `prepare` reads them with the same checks
        check_sources(cfg.data)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise DataError(f"data.seq_len={cfg.data.seq_len} is invalid; allowed: <= model.max_position_embeddings="
                        f"{config.max_position_embeddings}")
    return config


def setup(cfg: DictConfig, run_dir: Path, dist: Distributed):
    """Everything that can reject the input, before any file of ours is written."""
    # Hydra's copy of the config `cli.hydra_entry` checked reuses that check; else check now
    # (prepare() below reads the data with the same checks as the sources' own)
    config = prechecked(cfg, lambda checked: validate(checked, read_sources=False))
    if dist.main:
        def check(corpus):  # a DataError drops the cache entry this run began
            if cfg.data.streaming:  # every shard of a stream must pack a row (reads each shard's first documents)
                check_shards(cfg.data, corpus.tokenizer, dist.world)
            try:  # what depends on the vocabulary's size (lm_head_type=adaptive's cutoffs)
                model_config(cfg, vocab_size=len(corpus.tokenizer), pad_token_id=corpus.tokenizer.pad_token_id)
            except ValueError as error:
                raise DataError(str(error)) from None

        corpus = prepare(cfg.data, check=check)
    dist.barrier()
    if not dist.main:
        corpus = prepare(cfg.data)  # from the cache rank 0 wrote
    config = model_config(cfg, vocab_size=len(corpus.tokenizer), pad_token_id=corpus.tokenizer.pad_token_id)
    resume_from = checkpoint.resume_target(cfg.trainer.resume, run_dir / "checkpoints", dist.main)
    if resume_from is not None:
        resume.check_settings(cfg, resume_from, config)
    return corpus, config, resume_from


def train(cfg: DictConfig, run_dir: Path) -> dict:
    held = run_dir is not None and lock.holds(Path(run_dir))  # by `cli.hydra_entry`, which lets go itself
    try:
        return _train(cfg, run_dir)
    finally:
        forget_model_configs()
        if not held:
            lock.release_all()  # however the run ended, a long-lived process (a notebook) lets go


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    trainer = cfg.trainer
    with usage_errors():  # trainer.device=cuda (or trainer=gpu) without a visible GPU
        dist = Distributed(trainer.device)
    run_dir = Path(dist.broadcast(str(run_dir) if dist.main else None))  # every rank writes under rank 0's directory
    refusal = None
    if dist.main:  # before anything touches the run directory (staging clean-up included)
        try:
            lock.hold(run_dir)
        except ValueError as error:
            refusal = str(error)
    refusal = dist.broadcast(refusal)
    with usage_errors():
        if refusal:
            raise ValueError(refusal)
        corpus, config, resume_from = setup(cfg, run_dir, dist)
    if trainer.num_threads:
        torch.set_num_threads(int(trainer.num_threads))
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True)

    depth = depth_setting(cfg.get("depth"))  # checked by validate
    torch.manual_seed(cfg.seed)
    objective = make_objective(cfg.objective, corpus.tokenizer, cfg.data.mlm_probability)
    model = objective.model_class(config).to(dist.device)
    base = model
    optimizer = _optimizer(model, trainer, dist.device)
    state, data_state = {"step": 0, "tokens": 0, "elapsed": 0.0}, None
    if resume_from is not None:
        with usage_errors():
            saved = checkpoint.load(resume_from, model)
            trained = saved.get("objective") or get_objective(None).registry_name
            if trained != objective.name:  # the same parameters train either head
                raise ValueError(f"objective={objective.name!r} is invalid for resuming {resume_from}: it was trained "
                                 f"with objective={trained!r}; allowed: the run's own objective")
        optimizer.load_state_dict(saved["optimizer"])
        checkpoint.set_rng_state(saved["rng"])
        state, data_state = {k: saved[k] for k in state}, saved.get("data")
        if bool(cfg.data.streaming) != (data_state is not None):
            with usage_errors():
                raise DataError(f"data.streaming={cfg.data.streaming} is invalid for resuming {resume_from}: it was "
                                f"trained with data.streaming={not cfg.data.streaming}; allowed: the run's own setting")
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if trainer.compile:
        options = dict(backend=trainer.compile_backend, mode=trainer.compile_mode)
        model = compile_model(model, "auto" if trainer.compile is True else trainer.compile, **options)

    seq_len = cfg.data.seq_len
    micro = trainer.batch_size // trainer.grad_accumulation  # rows per micro-batch, all ranks together
    with usage_errors():  # a stream resumed with another data.stream_shards
        order = batch_order(cfg.data, corpus, micro, cfg.seed, dist, state["step"] * trainer.grad_accumulation, data_state)
        if config.mem_len:  # the text in order, each batch row continuing its own (`segments.py`)
            order = SegmentOrder(corpus.train, micro, cfg.seed, dist.rank, dist.world)
    if dist.main:  # one history: what came after the checkpoint (or all, starting over) is redone
        keep_until(run_dir / "metrics.jsonl", state["step"])
    log = RunLog(run_dir, cfg.logger.kind, enabled=dist.main, project=cfg.logger.get("project", "bertode"),
                 config=OmegaConf.to_container(cfg, resolve=True))
    own_rows = torch.arange(micro)[dist.rank::dist.world]  # this rank's rows of every micro-batch
    carry = MemoryCarry(own_rows) if config.mem_len else None
    if carry is not None and resume_from is not None:
        carry.load(saved.get("memory"), dist.device)
    with usage_errors():
        eval_batches = (ordered_eval_batches if config.mem_len else fixed_eval_batches)(
            corpus.eval, objective, cfg.seed, max(1, trainer.batch_size // dist.world), cfg.data.max_eval_sequences)
    baseline = unigram_cross_entropy(corpus.counts, corpus.eval[:cfg.data.max_eval_sequences or len(corpus.eval)])
    parameters = sum(p.numel() for p in base.parameters())
    if resume_from is not None:
        log.print(f"resumed from {resume_from} at step {state['step']}")
    log.print(f"bertode.train: {config.mode} model, {parameters / 1e6:.2f} M parameters, {dist.world} process(es) on "
              f"{dist.device}, {'streamed' if corpus.train is None else len(corpus.train)} train rows x {seq_len} "
              f"tokens, run dir {run_dir}")

    def run_eval(step: int) -> dict:
        with memory_length(base, trainer.get("eval_mem_len")):  # a segment memory's evaluation length
            result = evaluate(base, eval_batches, objective, dist.device, trainer.precision)
        log.write({"step": step, "kind": "eval", **result, "unigram_baseline": baseline})
        log.print(f"eval @ step {step}: {objective.label} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
                  f"per {perplexity_unit(corpus.tokenizer)}, "
                  f"accuracy {result['accuracy']:.3f} (unigram baseline loss {baseline:.4f})")
        return result

    step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
    result = None
    started = time.perf_counter() - elapsed
    window_start, window_tokens = time.perf_counter(), 0
    while True:
        if step >= trainer.max_steps or (trainer.max_tokens and tokens >= trainer.max_tokens):
            break
        out_of_time = bool(trainer.max_time) and elapsed >= trainer.max_time
        if dist.broadcast(out_of_time):
            break
        factor = lr_factor(step, elapsed, trainer)
        for group in optimizer.param_groups:
            group["lr"] = trainer.lr * factor
        micro_batches = [order.local_batch(step * trainer.grad_accumulation + a, objective.make_batch)
                         for a in range(trainer.grad_accumulation)]
        total_targets = int(dist.all_sum([float(sum(objective.targets(labels) for _, labels in micro_batches))])[0])
        # The loss of a step is the mean over every target token of the global batch: the
        # model divides its sum by this rank's share of the count (DDP averages over ranks).
        items = torch.tensor(max(total_targets, 1) / dist.world, device=dist.device)  # a tensor: no recompiles
        skipped_before = base.skipped_batches
        with usage_errors():  # a user distribution's draw that is not a depth
            drawn = depth.draw(cfg.seed, step + 1)  # the step logged as step + 1: the same on every rank and on resume
        ce_total, correct_total = 0.0, 0
        for a, (inputs, labels) in enumerate(micro_batches):
            inputs, labels = inputs.to(dist.device), labels.to(dist.device)
            sync = a == trainer.grad_accumulation - 1 or dist.world == 1
            context = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
            # Each global row draws its dropout masks from its own stream: the same at any world size.
            noise = split_invariant(order.noise_seed(step * trainer.grad_accumulation + a), own_rows, micro, dist.device)
            with context, noise, depth.dial(drawn):
                with autocast(dist.device, trainer.precision):
                    # The penalty (a mean over positions) weighted by this part's share of the rows (DDP averages
                    # over ranks, hence * world): the step's penalty is the mean over all its positions.
                    out = model(input_ids=inputs, labels=labels, num_items_in_batch=items,
                                penalty_share=len(inputs) * dist.world / trainer.batch_size,
                                **(carry.before(order, step * trainer.grad_accumulation + a) if carry else {}))
                if carry is not None:
                    carry.after(out)
                ce_sum, correct = masked_ce_sum(*scored(objective, out.logits.detach(), labels))
                if out.loss.requires_grad:  # a skipped DEQ batch has no path to any parameter
                    out.loss.backward()
            ce_total += ce_sum.item()
            correct_total += int(correct)
        if dist.all_sum([float(base.skipped_batches - skipped_before)])[0] > 0:
            optimizer.zero_grad(set_to_none=True)  # a DEQ solve on some rank failed and was skipped: skip the step
        grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), trainer.grad_clip or float("inf"))
        if math.isfinite(grad_norm.item()):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = trainer.batch_size * seq_len
        tokens += step_tokens
        window_tokens += step_tokens
        elapsed = time.perf_counter() - started
        ce_total, correct_total = dist.all_sum([ce_total, float(correct_total)])
        record = {"step": step, "kind": "train", "loss": ce_total / max(total_targets, 1),
                  "accuracy": correct_total / max(total_targets, 1), "lr": trainer.lr * factor,
                  "grad_norm": grad_norm.item(), "tokens": tokens, "elapsed": elapsed,
                  **_numeric_stats(out.solver_stats.summary()),  # every bertode model's (a discrete one's: 0 NFE)
                  "depth": drawn}  # the dialled depth (null: the model's own)
        if trainer.get("dynamics_every") and step % trainer.dynamics_every == 0 and dist.main:
            # the map's spectral radius (DEQ, looped core) or the flow's top Lyapunov exponent, on one sequence
            probe = dynamics_probe(base, inputs[:1].to(dist.device))
            record.update({f"dynamics_{key}": value for key, value in probe.items()})
        if step % trainer.log_every == 0 or step == 1:
            now = time.perf_counter()
            record["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
            record["peak_memory_mb"] = _peak_memory_mb(dist.device)
            window_start, window_tokens = now, 0
            log.print(progress_line(record, trainer, elapsed) + (f" | depth {drawn}" if drawn is not None else ""))
        log.write(record)
        if step % trainer.eval_every == 0 and step < trainer.max_steps:
            result = run_eval(step)
        if step % trainer.checkpoint_every == 0:
            failure, data_position = None, order.state(dist)  # a collective call for streams
            memory = carry.state(dist) if carry is not None else None  # and for a memory
            if dist.main:
                try:
                    checkpoint.save(run_dir / "checkpoints", step, base,
                                    {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
                                     "step": step, "tokens": tokens, "elapsed": elapsed, "data": data_position,
                                     "objective": objective.name, "depth": depth.describe, "memory": memory},
                                    keep=trainer.keep_checkpoints)
                except checkpoint.CheckpointError as error:  # full or read-only disk: keep what was saved
                    failure = str(error)
            failure = dist.broadcast(failure)
            if failure:  # every rank stops (none waits in a barrier for rank 0)
                log.close()
                if dist.main:
                    print(f"error: {failure}", file=sys.stderr, flush=True)
                dist.close()
                sys.exit(1)
        dist.barrier()

    result = run_eval(step)
    if dist.main:
        final = run_dir / "final"
        base.save_pretrained(final)
        corpus.tokenizer.save_pretrained(final)
        summary = {"step": step, "tokens": tokens, "elapsed": elapsed, "eval": result, "unigram_baseline": baseline,
                   "solver_stats": _numeric_stats(base.solver_stats())}
        (final / "train_results.json").write_text(json.dumps(summary, indent=2, default=float))
        write_model_card(final, objective.causal, mode=config.mode, loss=result["loss"], step=step)
        log.print(f"final model: {final}")
    log.close()
    dist.barrier()
    dist.close()
    return {"eval": result, "unigram_baseline": baseline, "step": step, "run_dir": str(run_dir)}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


main = hydra_entry("train", train, precheck=validate, distributed=True, prerun=resume.check_resume)

if __name__ == "__main__":
    main()
