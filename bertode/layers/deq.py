"""DEQ mode: the BERT layer stack as a fixed-point map z = f(z; x) (Bai, Kolter, Koltun 2019).

The map is ``num_hidden_layers`` of the *same* `BertODELayer` modules the ODE mode uses,
with discrete residuals, and the embedding output e(x) injected at every evaluation:
``add`` gives f(z) = Layers(z + U e) (U starts as the identity, so f(0) is BERT's first
layer on the embeddings); ``qkv`` adds U e to the attention's Q, K and V projections
(the DEQ-Transformer's injection). z0 = 0.

The forward solve runs without a graph in fp32, even under autocast, with the registered
fixed-point solver ``deq_solver`` (`solve/fixed_point.py`); the sensitivity method
(``sensitivity``: ift, phantom, unrolled or a registered one, `solve/deq_sensitivities.py`)
gives z* its gradient path. This module owns the DEQ's training semantics, so that
`bertode.train` and `transformers.Trainer` behave the same:

* stabilisers: the Hutchinson Jacobian penalty E|eps^T J_f(z*)|^2 / dim (the forward's
  penalty, times ``jac_weight``: ``jac_reg_weight``, plus 0.1 per ``jac_reg_increment_every``
  training forwards when that is set), weight normalisation, one dropout mask per forward
  reused by every evaluation, and an unrolled warm-up for the first ``deq_pretrain_steps``
  training forwards;
* ``deq_on_nonfinite="skip"``: a non-finite value in the forward solve (the forward
  returns ``skipped``, and the heads a zero loss) or in the implicit backward solve (the
  gradients of the model's parameters are rolled back at the end of the backward pass,
  `rollback_guard`) skips the batch and counts it;
* counters (``training_forwards``, ``skipped_batches``, ``nonconverged_solves``) are
  persistent buffers: ``save_pretrained``, ``from_pretrained`` and Trainer checkpoints
  carry them, so a resumed warm-up continues where it stopped.

`build_encoder` picks the encoder of a config's mode (`ENCODERS`): `modeling.py` never reads the mode.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils import logging

from ..solve import observe
from ..solve.deq_sensitivities import FixedPointProblem
from ..solve.dial import current_dial
from ..solve.fixed_point import (FIXED_POINT_SOLVERS, DEQSolveError, checking_every, damped, get_fixed_point_solver,
                                  reporting)
from ..solve.sensitivities import build_sensitivity
from ..solve.stats import FixedPointRecord, SolverStats
from . import kv_cache, segment_memory
from .dropout import keep_mask
from .disentangled import share_relative_embeddings
from .encoder import BertODEEncoder, BertODELayer, Encoder, EncoderOutput, Pass
from .loop import iterate, refuse_training_exit, valid_tokens

logger = logging.get_logger(__name__)
COUNTERS = ("training_forwards", "skipped_batches", "nonconverged_solves")
# What to do when the implicit backward of the current forward is skipped: set by
# `rollback_guard` around the model's forward, read when the map is built, so each forward keeps its own.
ON_BACKWARD_SKIP: contextvars.ContextVar = contextvars.ContextVar("bertode_on_backward_skip", default=None)


def apply_weight_norm(layers: nn.Module) -> None:
    """Weight-normalise every linear map of the DEQ map (w = g v / |v|, per output row)."""
    for module in list(layers.modules()):
        if isinstance(module, nn.Linear) and not hasattr(module, "parametrizations"):
            torch.nn.utils.parametrizations.weight_norm(module)


class BertDEQEncoder(Encoder):
    """The layers as one fixed-point map, solved per forward; its attention is reported at z*."""

    observed_attention = "last"

    def __init__(self, config):
        from .init import identity_init

        super().__init__()
        self.config = config
        # Discrete residuals, and no attention dropout: the map must be one deterministic
        # function during a solve (hidden dropout uses one mask per forward instead).
        self.layer = nn.ModuleList(BertODELayer(config, integrate=False, attention_dropout=0.0)
                                   for _ in range(config.num_hidden_layers))
        width = config.hidden_size * (3 if config.deq_injection == "qkv" else 1)
        self.injection = nn.Linear(config.hidden_size, width)
        if config.deq_injection == "add":
            identity_init(self.injection)
        if config.deq_weight_norm:
            apply_weight_norm(self.layer)
        self.sensitivity = build_sensitivity(config)
        self.compiled_map = None  # torch.compile(BertDEQEncoder.evaluate_map), set by compile_model
        for name in COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.last_forward_info = self.last_backward_info = None  # SolveInfo, with residual history
        self.last_stats = SolverStats()

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "compiled_map": None}  # copies and pickles are uncompiled

    # --- the map -----------------------------------------------------------------------
    def layer_map(self, embeddings, attn_mask, dtype=torch.float32):
        """f(.; x) on flat (batch, seq * hidden) states of ``dtype``, for these embeddings.

        One call fixes the per-forward context (injection, dropout masks), so every
        evaluation of the returned map is the same function."""
        shape = embeddings.shape
        injected = self.injection(embeddings)
        masks: dict = {}
        add = injected if self.config.deq_injection == "add" else None
        qkv = injected if self.config.deq_injection == "qkv" else None
        compute_dtype = embeddings.dtype  # the layers' dtype (a bf16 model computes in bf16)
        evaluate = self.compiled_map or type(self).evaluate_map

        def f(z_flat):
            return evaluate(self, z_flat, shape, add, qkv, attn_mask, masks, compute_dtype, dtype)

        def f_eager(z_flat):  # compiled graphs have no double backward (Jacobian penalty)
            return self.evaluate_map(z_flat, shape, add, qkv, attn_mask, masks, compute_dtype, dtype)

        f.eager = f_eager
        return f

    def evaluate_map(self, z_flat, shape, add, qkv, attn_mask, masks: dict, compute_dtype, dtype):
        """One evaluation of f (what ``compile_model(scope="fields")`` compiles). Under a key/value cache every
        evaluation reads the same slots: the past's equilibrium keys and values (`kv_cache`)."""
        session = kv_cache.active()
        if session is not None:
            session.rewind()
        z = z_flat.view(shape).to(compute_dtype)
        hidden = z + add if add is not None else z
        for index, layer in enumerate(self.layer):
            hidden, _ = layer(hidden, attn_mask, Pass(index, qkv, masks))
        return hidden.reshape(z_flat.shape).to(dtype)

    def _name(self, what):
        return f"DEQ {what} solve of the map over layers 0-{len(self.layer) - 1}"

    def _solve(self, f, z0, solver, max_iter, tol, name):
        cfg = self.config
        with checking_every(cfg.deq_check_every):
            return get_fixed_point_solver(solver)(f, z0, max_iter, tol, stop_mode=cfg.deq_stop_mode,
                                                  damping=cfg.deq_damping, memory=cfg.deq_memory, name=name)

    # --- forward -----------------------------------------------------------------------
    def caching_refusal(self) -> str | None:
        refusal = super().caching_refusal()
        if refusal is None and self.training and torch.is_grad_enabled():
            return "mode='deq' while training with gradients on (caching is an inference path here)"
        return refusal

    def forward(self, embeddings: torch.Tensor, attn_mask: torch.Tensor | None,
                output_hidden_states: bool = False, cross=None) -> EncoderOutput:
        """This forward's output; its penalty: ``jac_weight`` times the Jacobian penalty (when drawn). Under a
        key/value cache the solve reads the past's cached keys and values, and one more evaluation of the map at
        z* appends the new tokens' (`kv_cache`); under a segment memory that evaluation is what the next segment
        remembers (`segment_memory`). (``cross``: refused by the config; a DEQ decoder has no
        cross-attention.)"""
        session, memory = kv_cache.active(), segment_memory.active()
        if session is not None:
            session.map_start = session.slot
        with kv_cache.appending(False):
            encoded = self._forward(embeddings, attn_mask, output_hidden_states)
        if memory is not None:  # the next segment remembers the layer inputs at z*, not the solve's last iterate
            memory.restart()
        if (session is not None or memory is not None) and not encoded.skipped:
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            with torch.no_grad():
                self.layer_map(embeddings, attn_mask, dtype)(encoded.hidden.reshape(embeddings.shape[0], -1).to(dtype))
        return encoded

    def _forward(self, embeddings, attn_mask, output_hidden_states) -> EncoderOutput:
        cfg = self.config
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        z0 = embeddings.new_zeros(embeddings.shape[0], embeddings[0].numel(), dtype=dtype)
        self.jac_loss = None
        dial = current_dial()
        max_iter = dial.steps(cfg.deq_max_iter)  # the dialled depth: the solve's iteration budget
        if dial.exit is not None and not (self.training and cfg.deq_pretrain_steps
                                          and int(self.training_forwards) < cfg.deq_pretrain_steps):
            return self._forward_with_exit(embeddings, attn_mask, dtype, max_iter, dial, output_hidden_states)
        f = self.layer_map(embeddings, attn_mask, dtype)
        record = FixedPointRecord("deq")
        shape = embeddings.shape
        report = (lambda n, z: dial.on_iterate(n, z.view(shape).to(embeddings.dtype))) if dial.on_iterate else None
        problem = FixedPointProblem(f, z0, cfg.deq_damping, cfg.deq_tol, max_iter,
                                    lambda: self._solve_forward(f, z0, record, shape, max_iter, report),
                                    self._backward_solver(record, ON_BACKWARD_SKIP.get()), record,
                                    backprop=dial.backprop, on_iterate=report)
        if self.training:
            self.training_forwards += 1
        every = cfg.jac_reg_increment_every  # locuslab/deq's --jac_incremental: +0.1 per period
        self.jac_weight = cfg.jac_reg_weight + (0.1 * (int(self.training_forwards) // every) if every else 0.0)
        if self.training and cfg.deq_pretrain_steps and int(self.training_forwards) <= cfg.deq_pretrain_steps:
            z = z0
            for _ in range(cfg.deq_pretrain_depth):
                z = f(z)
            record.nfe_forward = cfg.deq_pretrain_depth
            record.extra.update(pretrain=True, forward_iterations=cfg.deq_pretrain_depth)
            out = z
        else:
            try:
                out = self.sensitivity(problem)
            except DEQSolveError as error:
                if cfg.deq_on_nonfinite != "skip":
                    raise
                self.skipped_batches += 1
                logger.warning("skipping a batch: %s", error)
                return EncoderOutput(torch.zeros_like(embeddings), None, SolverStats([record]), skipped=True)
            z_star = out.detach()
            solved = self.sensitivity.solves_fixed_point
            if solved and self.training and self.jac_weight > 0 and torch.is_grad_enabled() \
                    and torch.rand(()) < cfg.jac_reg_freq:
                self.jac_loss = self._jacobian_penalty(f.eager, z_star, record)
            if solved and not self.training and cfg.deq_spectral_radius:
                record.extra["spectral_radius"] = self._spectral_radius(f.eager, z_star)
        stats = SolverStats([record], counters=self.counters(on_device=True))
        self.last_stats = stats
        hidden = out.view(embeddings.shape).to(embeddings.dtype)
        penalty = self.jac_weight * self.jac_loss if self.jac_loss is not None else None
        return EncoderOutput(hidden, (embeddings, hidden) if output_hidden_states else None, stats, penalty)

    def _forward_with_exit(self, embeddings, attn_mask, dtype, max_iter, dial, output_hidden_states) -> EncoderOutput:
        """Damped plain iteration of the map, each token stopping on the dial's exit criterion
        (`loop.iterate`): an exited token keeps its state, and at every layer supplies the keys and
        values of its last active iteration; the others compute their rows only."""
        cfg = self.config
        refuse_training_exit(dial.exit, self)
        injected = self.injection(embeddings)
        add = injected if cfg.deq_injection == "add" else None
        qkv = injected if cfg.deq_injection == "qkv" else None
        masks: dict = {}
        cache: dict = {}
        compute_dtype = embeddings.dtype
        if self.training:
            self.training_forwards += 1

        def step(z, active):
            hidden = z.to(compute_dtype)
            hidden = hidden + add if add is not None else hidden
            for index, layer in enumerate(self.layer):
                if active is not None and index > 0:  # exited tokens: the layer inputs they last had
                    hidden = torch.where(active.mask[..., None], hidden, cache[index])
                cache[index] = hidden
                hidden, _ = layer(hidden, attn_mask, Pass(index, qkv, masks, active=active))
            return damped(z, hidden.to(dtype), cfg.deq_damping)

        report = (lambda n, z: dial.on_iterate(n, z.to(embeddings.dtype))) if dial.on_iterate else None
        valid = valid_tokens(attn_mask, embeddings.shape)
        z0 = embeddings.new_zeros(embeddings.shape, dtype=dtype)
        readout = (lambda z: dial.readout(z.to(compute_dtype))) if dial.readout is not None else None
        result = iterate(step, z0, max_iter, graph_from=dial.graph_from(max_iter), criterion=dial.exit,
                         readout=readout, on_iterate=report, valid=valid)
        record = FixedPointRecord("deq")
        record.nfe_forward = result.iterations
        record.extra.update(forward_iterations=result.iterations)
        stats = SolverStats([record], counters={**self.counters(), **result.exit_summary(valid)})
        stats.exit_depths = result.exit_depths
        self.last_stats = stats
        hidden = result.state.to(embeddings.dtype)
        return EncoderOutput(hidden, (embeddings, hidden) if output_hidden_states else None, stats)

    def _solve_forward(self, f, z0, record, shape=None, max_iter=None, report=None):
        observer = observe.active()
        if observer is not None and observer.wants_trajectory:  # output_trajectory: every iterate
            observer.begin("deq.forward", 0, z0.view(shape or z0.shape))
            solve_map, iterate = f, [0]

            def f(z):
                observer.note(iterate[0], z)
                iterate[0] += 1
                return solve_map(z)

        max_iter = self.config.deq_max_iter if max_iter is None else max_iter
        with torch.no_grad(), torch.autocast(z0.device.type, enabled=False), reporting(report):
            z_star, info = self._solve(f, z0, self.config.deq_solver, max_iter, self.config.deq_tol,
                                       self._name("forward"))
        if observer is not None and observer.wants_trajectory:
            observer.end(iterate[0], z_star)
        self.last_forward_info = info
        if info.converged_fraction < 1:  # the summaries came with the solve's last transfer
            self.nonconverged_solves += 1
        record.nfe_forward = info.iterations
        record.extra.update(forward_iterations=info.iterations, forward_converged_at=info.converged_at,
                            forward_abs_residual=info.worst_abs_residual, forward_rel_residual=info.worst_rel_residual,
                            converged_fraction=info.converged_fraction)
        return z_star

    def _backward_solver(self, record, on_skip):
        """The implicit backward's linear solve for this forward, with ``deq_on_nonfinite``."""

        def solve_backward(h, g0, solver=None, max_iter=30, tol=1e-5):
            try:
                g, info = self._solve(h, g0, solver or FIXED_POINT_SOLVERS.default, max_iter, tol,
                                      self._name("backward (implicit-function)"))
            except DEQSolveError as error:
                if self.config.deq_on_nonfinite != "skip":
                    raise
                self.skipped_batches += 1
                logger.warning("skipping a batch: %s", error)
                if on_skip is not None:
                    on_skip()
                return torch.zeros_like(g0)
            self.last_backward_info = info
            if info.converged_fraction < 1:
                self.nonconverged_solves += 1
            record.nfe_backward = info.iterations
            record.extra.update(backward_iterations=info.iterations, backward_converged_at=info.converged_at,
                                backward_rel_residual=info.worst_rel_residual)
            return g

        return solve_backward

    def _jacobian_penalty(self, f, z_star, record=None):
        z = z_star.detach().requires_grad_()
        # The penalty is differentiated twice; fused SDPA kernels have no double backward.
        with sdpa_kernel(SDPBackend.MATH):
            fz = f(z)
        # Rademacher probes (keep_mask(p=1/2) - 1), as the ODE regularisers' and with a lower variance than
        # Gaussian ones: inside `split_invariant` each row's from its own stream, the same at any world size.
        eps = keep_mask(fz, 0.5).sub_(1)
        vjp = torch.autograd.grad(fz, z, eps, create_graph=True)[0]
        penalty = vjp.pow(2).sum() / eps.numel()
        if record is not None:
            record.extra["jac_loss"] = penalty.detach()  # read when statistics are asked for (no sync here)
        return penalty

    def _spectral_radius(self, f, z_star, iterations=20):
        with torch.enable_grad():
            z = z_star.detach().requires_grad_()
            fz = f(z)
            v = torch.randn_like(fz)
            estimate = torch.zeros(())
            for _ in range(iterations):
                v = v / (v.norm(dim=1, keepdim=True) + 1e-12)
                w = torch.autograd.grad(fz, z, v, retain_graph=True)[0]
                estimate = w.norm(dim=1)
                v = w
        return estimate.max().item()

    def checkpointing_refusal(self) -> str | None:
        return ("mode='deq': the implicit gradient keeps no activations of the solve (memory is already "
                "constant in its iterations)")

    @contextlib.contextmanager
    def rollback_guard(self, parameters):
        """If this forward's implicit backward is skipped, restore every one of ``parameters()``'s gradients to
        their values before this batch, at the end of that backward pass (the outermost guard acts)."""
        if not (self.config.deq_on_nonfinite == "skip" and self.training and torch.is_grad_enabled()
                and ON_BACKWARD_SKIP.get() is None):
            yield
            return
        before = [(p, None if p.grad is None else p.grad.clone()) for p in parameters() if p.requires_grad]

        def restore():
            for parameter, grad in before:
                parameter.grad = grad

        def on_skip():  # called inside the backward pass: restore once it has finished
            torch.autograd.Variable._execution_engine.queue_callback(restore)
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                logger.warning_once("deq_on_nonfinite='skip' rolled this rank's gradients back; the other ranks must "
                                    "skip this step too (bertode.train does), or their replicas drift apart")

        token = ON_BACKWARD_SKIP.set(on_skip)
        try:
            yield
        finally:
            ON_BACKWARD_SKIP.reset(token)

    def counters(self, on_device: bool = False) -> dict:
        """The running counters (persistent buffers: checkpoints carry them); ``on_device``: copies of the
        buffers as they are now, which `SolverStats` reads when statistics are asked for (no sync per forward)."""
        if on_device:
            return {name: getattr(self, name).clone() for name in COUNTERS}
        return dict(zip(COUNTERS, torch.stack([getattr(self, name) for name in COUNTERS]).tolist()))

    def solver_stats(self) -> dict:
        return SolverStats(self.last_stats.records, self.counters()).summary()


# The encoder of each mode (`configuration.MODES`): the sites integrate in ODE mode only.
ENCODERS = {"ode": partial(BertODEEncoder, integrate=True), "discrete": partial(BertODEEncoder, integrate=False),
            "deq": BertDEQEncoder}


def build_encoder(config) -> Encoder:
    """The encoder of ``config.mode`` (inside a prelude and a coda when the config has them)."""
    if getattr(config, "prelude_layers", 0) or getattr(config, "coda_layers", 0):
        from .prelude_coda import PreludeCodaEncoder

        return share_relative_embeddings(PreludeCodaEncoder(config, ENCODERS), config)
    return share_relative_embeddings(ENCODERS[config.mode](config), config)  # DeBERTa's table: the encoder's
