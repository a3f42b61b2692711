"""The built-in DEQ sensitivity methods, and `FixedPointProblem`, what one of them sees.

A `DEQSensitivity` is called with a `FixedPointProblem` and returns z* (flat, (batch, dim))
with the gradient path it defines:

* ``ift``: z_out = f(z*) with a graph; a hook replaces the incoming gradient v by the
  solution g of g = v + g J_f(z*) (the implicit function theorem; solved by
  ``deq_backward_solver``), so dL/dtheta = g df/dtheta. Memory: one evaluation of f,
  whatever the iteration count.
* ``phantom``: ``deq_phantom_steps`` damped steps z <- (1 - tau) z + tau f(z) from z*,
  backpropagated (Jacobian-free backprop for one step).
* ``unrolled``: damped fixed-point iterations from z0 with a graph, to ``deq_tol`` or
  ``deq_max_iter`` (for tests and small runs).
"""

from __future__ import annotations

from typing import Callable

import torch

from .fixed_point import DEQSolveError, damped
from .sensitivities import DEQSensitivity, register_sensitivity
from .stats import FixedPointRecord


class FixedPointProblem:
    """One DEQ solve. ``f`` maps flat states to flat states with a graph (``f.eager`` is
    the same map outside any compiled graph, for VJPs that retain the graph); ``z0`` is
    the initial state; ``damping``, ``tol``, ``max_iter`` are the forward options;
    ``record`` collects the statistics. ``solve_forward()`` runs the configured forward
    solver without a graph; ``solve_backward(h, g0)`` the configured linear solve of
    g = h(g) (the encoder supplies both, with its error handling)."""

    def __init__(self, f: Callable, z0: torch.Tensor, damping: float, tol: float, max_iter: int,
                 solve_forward: Callable, solve_backward: Callable, record: FixedPointRecord,
                 backprop: int | None = None, on_iterate: Callable | None = None):
        self.f, self.z0, self.damping, self.tol, self.max_iter = f, z0, damping, tol, max_iter
        self.solve_forward, self.solve_backward, self.record = solve_forward, solve_backward, record
        # The depth dial's k (differentiate the last k iterations or phantom steps; None: the method's own)
        # and its per-iterate report, called as on_iterate(n, z) with flat states.
        self.backprop, self.on_iterate = backprop, on_iterate

    def step(self, z):
        """One damped step (1 - tau) z + tau f(z), with a graph."""
        return damped(z, self.f(z), self.damping)


@register_sensitivity("ift", default=True)
class ImplicitGradient(DEQSensitivity):
    config_fields = {"backward_solver": "deq_backward_solver", "backward_max_iter": "deq_backward_max_iter",
                     "backward_tol": "deq_backward_tol"}

    def __init__(self, backward_solver: str | None = None, backward_max_iter: int = 30, backward_tol: float = 1e-5):
        self.backward_solver, self.backward_max_iter, self.backward_tol = backward_solver, backward_max_iter, backward_tol

    def __call__(self, problem: FixedPointProblem):
        z_star = problem.solve_forward()
        if not torch.is_grad_enabled():
            return z_star
        z_star = z_star.detach().requires_grad_()
        # The implicit backward takes many VJPs through this one evaluation (retain_graph),
        # which compiled graphs refuse (donated buffers): it runs eagerly.
        z_out = problem.f.eager(z_star)
        if not z_out.requires_grad:
            return z_out
        # The hook sits on a view of z_out, so the backward solve's own vector-Jacobian
        # products (which start from z_out) do not re-enter it.
        out = z_out.view_as(z_out)
        out.register_hook(lambda grad: self._implicit_backward(problem, z_out, z_star, grad))
        return out

    def _implicit_backward(self, problem, z_out, z_star, grad):
        """Solve g = grad + g J_f(z*) (row vector), J_f(z*) applied by vector-Jacobian products."""

        def h(g):
            return torch.autograd.grad(z_out, z_star, g, retain_graph=True)[0] + grad

        return problem.solve_backward(h, torch.zeros_like(grad), self.backward_solver, self.backward_max_iter,
                                      self.backward_tol)


@register_sensitivity("phantom")
class PhantomGradient(DEQSensitivity):
    config_fields = {"steps": "deq_phantom_steps"}
    takes_backprop = True  # the depth dial's k replaces deq_phantom_steps

    def __init__(self, steps: int = 1):
        self.steps = steps

    def __call__(self, problem: FixedPointProblem):
        z = problem.solve_forward()
        if torch.is_grad_enabled():
            for _ in range(self.steps if problem.backprop is None else problem.backprop):
                z = problem.step(z)
        return z


@register_sensitivity("unrolled")
class UnrolledGradient(DEQSensitivity):
    solves_fixed_point = False
    takes_backprop = True  # the depth dial's k: the last k iterations keep a graph
    def __call__(self, problem: FixedPointProblem):
        """Iterations without a graph until ``max_iter - backprop`` (or the tolerance), then at most
        ``backprop`` with one (all of them with one when ``backprop`` is None or >= ``max_iter``)."""
        z, relative, iteration = problem.z0, float("nan"), 0
        backprop = problem.max_iter if problem.backprop is None else min(problem.backprop, problem.max_iter)
        grad = torch.is_grad_enabled()
        for graph, budget in ((False, problem.max_iter - backprop), (grad, backprop)):
            with torch.set_grad_enabled(graph):
                for _ in range(budget):
                    iteration += 1
                    fz = problem.f(z)
                    # One transfer per iteration: finiteness and the worst relative residual.
                    image, point = fz.detach(), z.detach()
                    finite, worst = torch.stack([torch.isfinite(image).all().to(image.dtype),
                                                 ((image - point).norm(dim=1) / (image.norm(dim=1) + 1e-9)).max()]).tolist()
                    if not finite:
                        raise DEQSolveError(f"DEQ unrolled solve: non-finite value in f(z) at iteration {iteration} "
                                            f"(relative residual before it {relative:.3e})")
                    relative = worst
                    z = damped(z, fz, problem.damping)
                    if problem.on_iterate is not None:
                        problem.on_iterate(iteration, z)
                    if relative < problem.tol:
                        break
        problem.record.nfe_forward = iteration
        problem.record.extra.update(forward_iterations=iteration, forward_rel_residual=relative)
        return z
