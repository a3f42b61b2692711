"""DEQ mode: the BERT layer stack as a fixed-point map z = f(z; x) (Bai, Kolter, Koltun 2019).

The map is ``num_hidden_layers`` of the *same* `BertODELayer` modules the ODE mode uses,
with discrete residuals, and the embedding output e(x) injected at every evaluation:
``add`` gives f(z) = Layers(z + U e) (U starts as the identity, so f(0) is BERT's first
layer on the embeddings); ``qkv`` adds U e to the attention's Q, K and V projections
(the DEQ-Transformer's injection). z0 = 0.

Forward: solve for z* without a graph, in fp32 even under autocast (`deq_solvers.py`).
Gradient (``deq_grad``):

* ``ift``: z_out = f(z*) with a graph; a hook replaces the incoming gradient v by the
  solution g of g = v + g J_f(z*) (solved with ``deq_backward_solver``), so
  dL/dtheta = g df/dtheta. Memory is one evaluation of f, whatever the iteration count.
* ``phantom``: ``deq_phantom_steps`` damped steps z <- (1 - tau) z + tau f(z) from z*,
  backpropagated (Jacobian-free backprop for one step).
* ``unrolled``: damped fixed-point iterations from z0 with a graph, to ``deq_tol`` or
  ``deq_max_iter`` (for tests and small runs).

Stabilisers: Hutchinson Jacobian penalty E|eps^T J_f(z*)|^2 / dim (added to the loss by
the heads), weight normalisation, one dropout mask per forward reused by every
evaluation, and an unrolled warm-up for the first ``deq_pretrain_steps`` forwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .deq_solvers import SOLVERS, DEQSolveError
from .encoder import BertODELayer, Pass


def apply_weight_norm(layers: nn.Module) -> None:
    """Weight-normalise every linear map of the DEQ map (w = g v / |v|, per output row)."""
    for module in list(layers.modules()):
        if isinstance(module, nn.Linear) and not hasattr(module, "parametrizations"):
            torch.nn.utils.parametrizations.weight_norm(module)


class BertDEQEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(BertODELayer(config) for _ in range(config.num_hidden_layers))
        width = config.hidden_size * (3 if config.deq_injection == "qkv" else 1)
        self.injection = nn.Linear(config.hidden_size, width)
        if config.deq_injection == "add":
            self.injection._bertode_identity_init = True
            nn.init.eye_(self.injection.weight)
            nn.init.zeros_(self.injection.bias)
        if config.deq_weight_norm:
            apply_weight_norm(self.layer)
        self.compiled_map = None  # torch.compile(BertDEQEncoder.evaluate_map), set by compile_model
        self.training_forwards = 0
        self.skipped_batches = 0
        self.nonconverged_solves = 0
        self._stats: dict = {}
        self.last_forward_info = self.last_backward_info = None  # SolveInfo, with residual history

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
        """One evaluation of f (what ``compile_model(scope="fields")`` compiles)."""
        z = z_flat.view(shape).to(compute_dtype)
        hidden = z + add if add is not None else z
        for index, layer in enumerate(self.layer):
            hidden = layer(hidden, attn_mask, Pass(None, index, qkv, masks))
        return hidden.reshape(z_flat.shape).to(dtype)

    def _name(self, what):
        return f"DEQ {what} solve of the map over layers 0-{len(self.layer) - 1}"

    def _solve(self, f, z0, solver, max_iter, tol, name):
        cfg = self.config
        return SOLVERS[solver](f, z0, max_iter, tol, stop_mode=cfg.deq_stop_mode, damping=cfg.deq_damping,
                               memory=cfg.deq_memory, name=name)

    # --- forward -----------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, attn_mask: torch.Tensor | None, output_hidden_states: bool = False):
        cfg = self.config
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        batch = embeddings.shape[0]
        z0 = embeddings.new_zeros(batch, embeddings[0].numel(), dtype=dtype)
        self._stats = {}
        self.jac_loss = None
        f = self.layer_map(embeddings, attn_mask, dtype)

        if self.training:
            self.training_forwards += 1
        if self.training and self.training_forwards <= cfg.deq_pretrain_steps:
            z = z0
            for _ in range(cfg.deq_pretrain_depth):
                z = f(z)
            self._stats = {"pretrain": True, "forward_iterations": cfg.deq_pretrain_depth}
            out = z
        elif cfg.deq_grad == "unrolled":
            out = self._unrolled(f, z0)
        else:
            with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
                z_star, info = self._solve(f, z0, cfg.deq_solver, cfg.deq_max_iter, cfg.deq_tol, self._name("forward"))
            self._record_forward(info)
            out = self._attach_gradient(f, z_star) if torch.is_grad_enabled() else z_star
            if self.training and cfg.jac_reg_weight > 0 and torch.is_grad_enabled() and torch.rand(()) < cfg.jac_reg_freq:
                self.jac_loss = self._jacobian_penalty(f.eager, z_star)
            if not self.training and cfg.deq_spectral_radius:
                self._stats["spectral_radius"] = self._spectral_radius(f.eager, z_star)
        hidden = out.view(embeddings.shape).to(embeddings.dtype)
        return hidden, ((embeddings, hidden) if output_hidden_states else None)

    def _unrolled(self, f, z0):
        tau, z, relative = self.config.deq_damping, z0, float("nan")
        for iteration in range(1, self.config.deq_max_iter + 1):
            fz = f(z)
            if not bool(torch.isfinite(fz).all()):
                raise DEQSolveError(f"{self._name('unrolled')}: non-finite value in f(z) at iteration {iteration} "
                                    f"(relative residual before it {relative:.3e})")
            relative = ((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max().item()
            z = (1 - tau) * z + tau * fz
            if relative < self.config.deq_tol:
                break
        self._stats = {"forward_iterations": iteration, "forward_rel_residual": relative}
        return z

    def _attach_gradient(self, f, z_star):
        cfg = self.config
        if cfg.deq_grad == "phantom":
            z = z_star
            for _ in range(cfg.deq_phantom_steps):
                z = (1 - cfg.deq_damping) * z + cfg.deq_damping * f(z)
            return z
        z_star = z_star.detach().requires_grad_()
        # The implicit backward takes many VJPs through this one evaluation (retain_graph),
        # which compiled graphs refuse (donated buffers): it runs eagerly.
        z_out = f.eager(z_star)
        if not z_out.requires_grad:
            return z_out
        # The hook sits on a view of z_out, so the backward solve's own vector-Jacobian
        # products (which start from z_out) do not re-enter it.
        out = z_out.view_as(z_out)
        out.register_hook(lambda grad: self._implicit_backward(z_out, z_star, grad))
        return out

    def _implicit_backward(self, z_out, z_star, grad):
        """Solve g = grad + g J_f(z*) (row vector), J_f(z*) applied by vector-Jacobian products."""
        cfg = self.config

        def h(g):
            vjp = torch.autograd.grad(z_out, z_star, g, retain_graph=True)[0]
            return vjp + grad

        g, info = self._solve(h, torch.zeros_like(grad), cfg.deq_backward_solver, cfg.deq_backward_max_iter,
                              cfg.deq_backward_tol, self._name("backward (implicit-function)"))
        self.last_backward_info = info
        if not bool(info.converged.all()):
            self.nonconverged_solves += 1
        self._stats.update(backward_iterations=info.iterations,
                           backward_rel_residual=info.rel_residual.max().item())
        return g

    def _jacobian_penalty(self, f, z_star):
        z = z_star.detach().requires_grad_()
        # The penalty is differentiated twice; fused SDPA kernels have no double backward.
        with sdpa_kernel(SDPBackend.MATH):
            fz = f(z)
        eps = torch.randn_like(fz)
        vjp = torch.autograd.grad(fz, z, eps, create_graph=True)[0]
        penalty = vjp.pow(2).sum() / eps.numel()
        self._stats["jac_loss"] = penalty.item()
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

    def _record_forward(self, info):
        self.last_forward_info = info
        converged = info.converged.float().mean().item()
        if converged < 1:
            self.nonconverged_solves += 1
        self._stats.update(
            forward_iterations=info.iterations,
            forward_abs_residual=info.abs_residual.max().item(),
            forward_rel_residual=info.rel_residual.max().item(),
            converged_fraction=converged,
        )

    COUNTERS = ("training_forwards", "nonconverged_solves", "skipped_batches")

    def counters(self) -> dict:
        """Training-progress counters a checkpoint must carry (the warm-up depends on them)."""
        return {name: getattr(self, name) for name in self.COUNTERS}

    def load_counters(self, counters: dict) -> None:
        for name in self.COUNTERS:
            setattr(self, name, int(counters[name]))

    def solver_stats(self) -> dict:
        return dict(self._stats, nonconverged_solves=self.nonconverged_solves, skipped_batches=self.skipped_batches)
