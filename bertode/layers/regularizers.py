"""The ODE-regulariser registry: penalties on the dynamics, integrated along every solve.

A regulariser names integrands r(t) of the dynamics; while training, each ODE site
integrates them alongside its state, as extra channels of an augmented state (RNODE:
Finlay et al., "How to train your neural ODE", ICML 2020), so they are exact integrals
∫ r dt for any solver and are differentiated by whichever sensitivity method the model uses
(autograd through the solver, or the adjoint, which solves the augmented system
backwards). The model adds ``regularizer_weight`` x (their mean over batch and tokens,
summed over sites) to its loss and reports the integrals in ``solver_stats``.

Built in (per token, averaged over the hidden dimension):

* ``none``      no penalty (default);
* ``kinetic``   the kinetic energy ‖f(t, z)‖²;
* ``jacobian``  the Jacobian's Frobenius norm ‖∂f/∂z‖²_F, by Hutchinson's estimator
                ‖εᵀ ∂f/∂z‖² with one Rademacher ε per solve;
* ``rnode``     both (RNODE).

Register your own with ``@bertode.register_regularizer("name")`` on a `Regularizer`
subclass: ``names`` of its integrands and ``integrands(dz, jacobian_noise)``.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..registry import Registry


class Regularizer:
    """Base class: ``names`` of the integrands, ``uses_jacobian`` if `integrands` needs εᵀJ."""

    names: tuple[str, ...] = ()
    uses_jacobian: bool = False

    def integrands(self, dz: torch.Tensor, noise_jacobian: torch.Tensor | None) -> list[torch.Tensor]:
        """One (batch, seq) tensor per name, at this evaluation; ``dz`` is f(t, z) and
        ``noise_jacobian`` εᵀ ∂f/∂z (None unless ``uses_jacobian``)."""
        return []


REGULARIZERS = Registry("ODE regulariser", "regularizer", base=Regularizer, decorator="register_regularizer")


def register_regularizer(name: str, *, default: bool = False):
    """Class decorator: make a `Regularizer` subclass selectable as ``regularizer=name``."""
    return REGULARIZERS.register(name, default=default)


def available_regularizers() -> tuple[str, ...]:
    return REGULARIZERS.names()


@register_regularizer("none", default=True)
class NoRegularizer(Regularizer):
    """No penalty: the solve is not augmented."""


@register_regularizer("kinetic")
class Kinetic(Regularizer):
    names = ("kinetic_energy",)

    def integrands(self, dz, noise_jacobian):
        return [dz.pow(2).mean(-1)]


@register_regularizer("jacobian")
class JacobianFrobenius(Regularizer):
    names = ("jacobian_frobenius",)
    uses_jacobian = True

    def integrands(self, dz, noise_jacobian):
        return [noise_jacobian.pow(2).mean(-1)]


@register_regularizer("rnode")
class RNODE(Regularizer):
    names = ("kinetic_energy", "jacobian_frobenius")
    uses_jacobian = True

    def integrands(self, dz, noise_jacobian):
        return [dz.pow(2).mean(-1), noise_jacobian.pow(2).mean(-1)]


def augmented(evaluate, regularizer: Regularizer, noise: torch.Tensor | None, width: int):
    """dynamics(t, za) on states with ``len(regularizer.names)`` extra channels after the
    first ``width``: the field on the state, and the integrands on the extra channels."""

    def dynamics(t, state):
        z = state[..., :width]
        if not regularizer.uses_jacobian:
            dz = evaluate(t, z)
            return torch.cat([dz, *(r.unsqueeze(-1).to(dz.dtype) for r in regularizer.integrands(dz, None))], -1)
        building = torch.is_grad_enabled()  # False in an adjoint's forward solve
        # SDPA's math kernel: the fused CPU kernels have no double backward (the penalty's gradient).
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            dz = evaluate(t, z)
            (noise_jacobian,) = torch.autograd.grad(dz, z, noise, create_graph=building)
        if not building:
            dz, noise_jacobian = dz.detach(), noise_jacobian.detach()
        terms = regularizer.integrands(dz, noise_jacobian)
        return torch.cat([dz, *(r.unsqueeze(-1).to(dz.dtype) for r in terms)], -1)

    return dynamics
