"""`bertode.analysis`: reading the flow of a model without dense Jacobians.

Everything works on one sequence and on flat states (``seq * hidden`` numbers), through
Jacobian-vector products (`torch.func.jvp`) and vector-Jacobian products, so nothing of
size n x n is ever formed at real sizes:

* `site_dynamics(model, input_ids, layer, site)`: one ODE site's vector field
  ``f(t, v)`` on flat states, its input and its time interval (attention runs eagerly,
  which forward-mode differentiation needs).
* `eigenvalues(f, z, k)`: the k eigenvalues of largest magnitude of J = df/dz at z
  (Arnoldi iteration on JVPs); `singular_values(f, z, k)`: the k largest singular values
  (Lanczos on JᵀJ with JVPs and VJPs). A Krylov space as large as the state is exact.
* `lyapunov_exponents(f, z0, t0, t1, steps, k)`: the k finite-time Lyapunov exponents of
  the flow from z0 (RK4 on the state and the variational equation dQ/dt = J Q, QR
  re-orthonormalisation every step); `token_lyapunov(...)`: per token, the largest
  finite-time exponent of perturbations of that token, (1/T) log σ_max(Φ(T) P_token).
* `deq_spectral_radius(model, input_ids)`: ρ(df/dz) of a DEQ's map at its fixed point z*.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import jvp, vjp, vmap



@contextlib.contextmanager
def eager_attention(model):
    """Attention through the written-out path (forward-mode AD has no rule for fused SDPA)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def _encoder_input(model, input_ids, attention_mask):
    from .layers.sublayers import sdpa_mask

    base = model.base_model
    hidden = base.embeddings(input_ids=input_ids)
    return hidden, sdpa_mask(attention_mask, model.config.is_decoder, hidden.shape[1], hidden.device)


@torch.no_grad()
def site_dynamics(model, input_ids: torch.Tensor, layer: int = 0, site: str = "attention", attention_mask=None):
    """``(f, z0, t0, t1)`` for the ODE site ``site`` (``attention`` or ``feed_forward``) of
    layer ``layer``, for one sequence: ``f(t, v)`` maps a flat state to its flat dz/dt
    (no dropout), ``z0`` is the site's input in this forward."""
    if model.config.mode != "ode":
        raise ValueError(f"site_dynamics needs mode='ode', got mode={model.config.mode!r}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"site_dynamics reads one sequence; got input_ids of batch {input_ids.shape[0]}")
    encoder = model.base_model.encoder
    residual = getattr(encoder.layer[layer if len(encoder.layer) > 1 else 0], site)
    solves = model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_trajectory=True).trajectory
    solve = next(s for s in solves if s["name"] == f"layer.{layer}.{site}")
    z0 = solve["states"][0]
    shape = z0.shape
    _, mask = _encoder_input(model, input_ids, attention_mask)

    def f(t, v):
        t = torch.as_tensor(t, dtype=v.dtype)
        with eager_attention(model):
            return residual.evaluate(t, v.view(shape), mask, None).reshape(-1)

    return f, z0.reshape(-1), float(solve["times"][0]), float(solve["times"][-1])


def _arnoldi(matvec, start: torch.Tensor, size: int) -> torch.Tensor:
    """The Hessenberg matrix of ``size`` Arnoldi steps (modified Gram-Schmidt, twice)."""
    n = start.numel()
    size = min(size, n)
    basis = torch.zeros(n, size + 1, dtype=start.dtype)
    hessenberg = torch.zeros(size + 1, size, dtype=start.dtype)
    basis[:, 0] = start / start.norm()
    for j in range(size):
        w = matvec(basis[:, j])
        for _ in range(2):  # re-orthogonalise: Krylov bases lose orthogonality fast
            coefficients = basis[:, :j + 1].T @ w
            w = w - basis[:, :j + 1] @ coefficients
            hessenberg[:j + 1, j] += coefficients
        hessenberg[j + 1, j] = w.norm()
        if hessenberg[j + 1, j] < 1e-12 * max(1.0, hessenberg[:j + 1, j].abs().max().item()):
            return hessenberg[:j + 1, :j + 1]  # an invariant subspace: exact
        basis[:, j + 1] = w / hessenberg[j + 1, j]
    return hessenberg[:size, :size]


def _jvp_at(f, t, z):
    return lambda v: jvp(lambda x: f(t, x), (z,), (v,))[1]


def eigenvalues(f, z: torch.Tensor, k: int = 6, t: float = 0.0, krylov: int = 64, seed: int = 0) -> torch.Tensor:
    """The ``k`` eigenvalues of largest magnitude of df/dz at (t, z), complex, by magnitude."""
    z = z.detach()
    start = torch.randn(z.numel(), generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    values = torch.linalg.eigvals(_arnoldi(_jvp_at(f, t, z), start, krylov))
    return values[values.abs().argsort(descending=True)][:k]


def singular_values(f, z: torch.Tensor, k: int = 6, t: float = 0.0, krylov: int = 64, seed: int = 0) -> torch.Tensor:
    """The ``k`` largest singular values of df/dz at (t, z) (Lanczos on JᵀJ)."""
    z = z.detach()
    forward = _jvp_at(f, t, z)
    _, backward = vjp(lambda x: f(t, x), z)
    start = torch.randn(z.numel(), generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    gram = _arnoldi(lambda v: backward(forward(v))[0], start, krylov)
    values = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0).sqrt()
    return values.flip(0)[:k]


def _rk4_tangent(f, t: float, z: torch.Tensor, tangents: torch.Tensor, h: float):
    """One RK4 step of (z, Q) under dz/dt = f(t, z), dQ/dt = J(t, z) Q (columns of Q)."""

    def both(time, state, q):
        value, push = f(time, state), vmap(lambda column: jvp(lambda x: f(time, x), (state,), (column,))[1],
                                           in_dims=1, out_dims=1)(q)
        return value, push

    k1, q1 = both(t, z, tangents)
    k2, q2 = both(t + h / 2, z + h / 2 * k1, tangents + h / 2 * q1)
    k3, q3 = both(t + h / 2, z + h / 2 * k2, tangents + h / 2 * q2)
    k4, q4 = both(t + h, z + h * k3, tangents + h * q3)
    return z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tangents + h / 6 * (q1 + 2 * q2 + 2 * q3 + q4)


def lyapunov_exponents(f, z0: torch.Tensor, t0: float, t1: float, steps: int = 64, k: int = 4,
                       seed: int = 0) -> torch.Tensor:
    """The ``k`` largest finite-time Lyapunov exponents of the flow of ``f`` from z0 over [t0, t1]."""
    z = z0.detach()
    q = torch.linalg.qr(torch.randn(z.numel(), k, generator=torch.Generator().manual_seed(seed), dtype=z.dtype))[0]
    logs = torch.zeros(k, dtype=z.dtype)
    h = (t1 - t0) / steps
    with torch.no_grad():
        for step in range(steps):
            z, q = _rk4_tangent(f, t0 + step * h, z, q, h)
            q, r = torch.linalg.qr(q)
            logs += r.diagonal().abs().log()
    return (logs / (t1 - t0)).sort(descending=True).values


def token_lyapunov(f, z0: torch.Tensor, t0: float, t1: float, shape, steps: int = 16) -> torch.Tensor:
    """Per token i, (1/T) log σ_max(Φ(T) P_i): how much the flow can stretch a perturbation
    of token i's vector (``shape`` is (1, seq, hidden) of the flat state)."""
    _, seq, hidden = shape
    z = z0.detach()
    h = (t1 - t0) / steps
    exponents = []
    with torch.no_grad():
        for token in range(seq):
            q = torch.zeros(z.numel(), hidden, dtype=z.dtype)
            q[token * hidden:(token + 1) * hidden] = torch.eye(hidden, dtype=z.dtype)
            state = z
            for step in range(steps):
                state, q = _rk4_tangent(f, t0 + step * h, state, q, h)
            exponents.append(torch.linalg.matrix_norm(q, ord=2).log() / (t1 - t0))
    return torch.stack(exponents)


@torch.no_grad()
def deq_spectral_radius(model, input_ids: torch.Tensor, attention_mask=None, krylov: int = 64) -> float:
    """ρ(df/dz) of a DEQ model's map at its fixed point z*, for one sequence (Arnoldi)."""
    if model.config.mode != "deq":
        raise ValueError(f"deq_spectral_radius needs mode='deq', got mode={model.config.mode!r}")
    encoder = model.base_model.encoder
    with eager_attention(model):
        embeddings, mask = _encoder_input(model, input_ids, attention_mask)
        z_star = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        z_star = z_star.reshape(1, -1).to(torch.promote_types(z_star.dtype, torch.float32))
        f = encoder.layer_map(embeddings, mask, z_star.dtype)
        values = eigenvalues(lambda t, v: f(v.view(1, -1)).reshape(-1), z_star.reshape(-1), k=1, krylov=krylov)
    return float(values.abs().max())
