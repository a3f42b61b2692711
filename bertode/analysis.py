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
* `core_spectral_radius(model, input_ids)`: ρ of one application of a looped core
  (``weight_tying``) at its final state (Arnoldi on VJPs: the transposed Jacobian has the
  same spectrum, and reverse mode runs through every solver).
* `dynamics_probe(model, input_ids)`: the one number a training loop logs every N steps
  (``trainer.dynamics_every``): ``{"spectral_radius": ...}`` for a DEQ or a looped core,
  ``{"lyapunov_max": ...}`` (the first layer's attention site) for an untied ODE model.
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
    basis = torch.zeros(n, size + 1, dtype=start.dtype, device=start.device)
    hessenberg = torch.zeros(size + 1, size, dtype=start.dtype, device=start.device)
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
    start = torch.randn(z.numel(), generator=torch.Generator().manual_seed(seed), dtype=z.dtype).to(z.device)
    values = torch.linalg.eigvals(_arnoldi(_jvp_at(f, t, z), start, krylov).cpu())
    return values[values.abs().argsort(descending=True)][:k]


def singular_values(f, z: torch.Tensor, k: int = 6, t: float = 0.0, krylov: int = 64, seed: int = 0) -> torch.Tensor:
    """The ``k`` largest singular values of df/dz at (t, z) (Lanczos on JᵀJ)."""
    z = z.detach()
    forward = _jvp_at(f, t, z)
    _, backward = vjp(lambda x: f(t, x), z)
    start = torch.randn(z.numel(), generator=torch.Generator().manual_seed(seed), dtype=z.dtype).to(z.device)
    gram = _arnoldi(lambda v: backward(forward(v))[0], start, krylov).cpu()
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
    q = q.to(z.device)
    logs = torch.zeros(k, dtype=z.dtype, device=z.device)
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
    encoder = _core(model)  # the DEQ itself, inside a prelude and a coda too
    with eager_attention(model):
        embeddings, mask, z_star = _core_run(model, input_ids, attention_mask)  # the DEQ's input and its z*
        z_star = z_star.reshape(1, -1).to(torch.promote_types(z_star.dtype, torch.float32))
        f = encoder.layer_map(embeddings, mask, z_star.dtype)
        values = eigenvalues(lambda t, v: f(v.view(1, -1)).reshape(-1), z_star.reshape(-1), k=1, krylov=krylov)
    return float(values.abs().max())


def _core(model):
    """The encoder that iterates (a prelude/coda encoder's ``core``, else the encoder)."""
    encoder = model.base_model.encoder
    return encoder._modules.get("core", encoder)


@contextlib.contextmanager
def _probing(model):
    """Eval mode (no dropout), eager attention and a dial that keeps only its depth, restored after."""
    from .solve.dial import dialed

    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), dialed(backprop=None, exit=None, on_iterate=None):
            yield
    finally:
        model.train(was_training)


def _core_run(model, input_ids, attention_mask):
    """(core input, its attention mask, the core's final state) of one forward (a forward hook)."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)

    handle = _core(model).register_forward_hook(hook, with_kwargs=True)
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    args = list(seen["args"]) + [seen["kwargs"].get(k) for k in ("hidden", "attn_mask") if k in seen["kwargs"]]
    return args[0], args[1] if len(args) > 1 else None, seen["output"].hidden


def core_spectral_radius(model, input_ids: torch.Tensor, attention_mask=None, krylov: int = 64) -> float:
    """ρ(∂step/∂z) of one application of a looped core (``weight_tying``; with ``core_injection``
    its step is z -> layer(z + U e)) at the core's final state z_T, for one sequence: the
    largest |eigenvalue| of the Krylov space of ``krylov`` VJPs (exact when it is as large as
    the state, seq * hidden). The step is taken as the last application (its layer index:
    depth - 1, which an ODE core's time-dependent field reads)."""
    from .layers.encoder import Pass

    if not getattr(model.config, "weight_tying", False) or model.config.mode == "deq":
        raise ValueError(f"core_spectral_radius needs weight_tying=True (a looped core), got mode="
                         f"{model.config.mode!r}, weight_tying={getattr(model.config, 'weight_tying', False)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"core_spectral_radius reads one sequence; got input_ids of batch {input_ids.shape[0]}")
    core = _core(model)
    with torch.no_grad():
        core_input, mask, z_final = _core_run(model, input_ids, attention_mask)
        injected = core.injection(core_input) if getattr(core, "injection", None) is not None else None
    from .solve.dial import current_dial

    index = current_dial().steps(core.num_applications) - 1
    shape, dtype = z_final.shape, z_final.dtype
    work = torch.promote_types(dtype, torch.float32)

    def step(flat):
        z = flat.view(shape).to(dtype)
        out, _ = core.layer[0](z + injected if injected is not None else z, mask, Pass(index))
        return out.reshape(-1).to(work)

    with torch.enable_grad():
        z = z_final.detach().reshape(-1).to(work).requires_grad_()
        out = step(z)

        def transposed(v):  # Jᵀ v: the same eigenvalues as J
            return torch.autograd.grad(out, z, v, retain_graph=True)[0]

        start = torch.randn(z.numel(), generator=torch.Generator().manual_seed(0), dtype=work).to(z.device)
        hessenberg = _arnoldi(transposed, start, krylov)
    return float(torch.linalg.eigvals(hessenberg.detach().cpu()).abs().max())


def dynamics_probe(model, input_ids: torch.Tensor, attention_mask=None, krylov: int = 32, steps: int = 16,
                   k: int = 1) -> dict:
    """One reading of the model's dynamics on the first sequence of ``input_ids`` (what the
    training loop logs every ``trainer.dynamics_every`` steps; the model is left in the mode
    it was in, no gradient is accumulated):

    * a DEQ: ``{"spectral_radius": ρ(df/dz) at z*}`` (`deq_spectral_radius`);
    * a looped core (``weight_tying``, ODE or discrete): ``{"spectral_radius": ...}`` of one
      core application at the final state (`core_spectral_radius`);
    * an untied ODE model: ``{"lyapunov_max": ...}``, the largest of the ``k`` finite-time
      Lyapunov exponents (`lyapunov_exponents`, RK4 in ``steps`` steps) of the first layer's
      attention site flow over its interval (`site_dynamics`).

    ``krylov`` bounds the Arnoldi space (exact once it reaches seq * hidden; smaller, the
    largest Ritz value, which approaches ρ from below). An untied discrete model has no
    dynamics to read: ValueError."""
    input_ids = input_ids[:1]
    attention_mask = attention_mask[:1] if attention_mask is not None else None
    config = model.config
    with _probing(model):
        if config.mode == "deq":
            return {"spectral_radius": deq_spectral_radius(model, input_ids, attention_mask, krylov=krylov)}
        if getattr(config, "weight_tying", False):
            return {"spectral_radius": core_spectral_radius(model, input_ids, attention_mask, krylov=krylov)}
        if config.mode == "ode":
            f, z0, t0, t1 = site_dynamics(model, input_ids, 0, "attention", attention_mask)
            work = torch.promote_types(z0.dtype, torch.float32)
            exponents = lyapunov_exponents(lambda t, v: f(t, v.to(z0.dtype)).to(work), z0.to(work), t0, t1,
                                           steps=steps, k=k)
            return {"lyapunov_max": float(exponents.max())}
    raise ValueError(f"dynamics_probe reads a DEQ, a looped core (weight_tying) or an ODE model; got mode="
                     f"{config.mode!r} with untied layers, which has no dynamics to read")
