"""The ODE-Transformer block schemes (Li et al. 2021, arXiv 2104.02308) as torchdyn solvers.

A block takes one step of size h on dy/dt = F(y), where F(y) = Layer(y) - y is the whole
layer's increment, reusing the layer's parameters in every stage (the paper's equations,
not its released code, which adds the residual twice):

* ``rk2``        y' = y + h (F1 + F2) / 2,            F1 = F(y), F2 = F(y + h F1)  (Heun)
* ``rk2_gated``  y' = y + h (g F1 + (1 - g) F2),      g = sigmoid(w . [F1; F2] + b), one
                 gate per token, w = 0 and b = 0 at initialisation so g = 1/2
* ``rk4``        torchdyn's classical RK4: y' = y + h (F1 + 2 F2 + 2 F3 + F4) / 6

Being torchdyn solver modules, they run inside `NeuralODE` like the named solvers.
"""

from __future__ import annotations

import torch
from ._torchdyn import DiffEqSolver, RungeKutta4


class Heun(DiffEqSolver):
    """Explicit trapezoidal rule (Heun's method), order 2: the ODE-Transformer's RK2 block."""

    def __init__(self, dtype=torch.float32):
        super().__init__(order=2, stepping_class="fixed")
        self.dtype = dtype

    def step(self, f, x, t, dt, k1=None, args=None):
        k1 = f(t, x) if k1 is None else k1
        k2 = f(t + dt, x + dt * k1)
        return None, x + dt * 0.5 * (k1 + k2), None


class GatedHeun(DiffEqSolver):
    """Heun's stages mixed by a learned per-token gate g = sigmoid(gate([F1; F2])).

    ``gate`` (an ``nn.Linear(2 * hidden, 1)`` owned by the layer) and ``hidden_size`` are
    set by the caller before each solve; the state is (batch, seq * hidden).
    """

    def __init__(self, dtype=torch.float32):
        super().__init__(order=2, stepping_class="fixed")
        self.dtype = dtype
        self.gate, self.hidden_size = None, None

    def step(self, f, x, t, dt, k1=None, args=None):
        k1 = f(t, x) if k1 is None else k1
        k2 = f(t + dt, x + dt * k1)
        batch = x.shape[0]
        stages = torch.cat([k1.view(batch, -1, self.hidden_size), k2.view(batch, -1, self.hidden_size)], dim=-1)
        g = torch.sigmoid(self.gate(stages)).to(x.dtype).expand(batch, -1, self.hidden_size).reshape(x.shape)
        return None, x + dt * (g * k1 + (1 - g) * k2), None


BLOCK_SCHEMES = {"rk2": Heun, "rk2_gated": GatedHeun, "rk4": RungeKutta4}
