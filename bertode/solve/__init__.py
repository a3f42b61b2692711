"""bertode's numerics: ODE solves (torchdyn, torchdiffeq), fixed-point solves, their
registries (solvers, sensitivity methods, fixed-point solvers) and statistics. Nothing here
imports the model: a solve gets a ``dynamics(t, z)`` callable or a map ``f(z)``."""
