"""Probability-flow ODE log-likelihoods (Song et al. 2021, Appendix D) for the σ family and for PSLD / CLD / VP-SDE.

Both families integrate an ODE dz/dt = h(z, t) from the data end t_0 up to the prior end t_1 together with
the instantaneous change of variables,

    log p_{t_0}(z(t_0)) = log p_{t_1}(z(t_1)) + ∫_{t_0}^{t_1} ∇·h(z(t), t) dt,

and use the family's prior for p_{t_1}. σ family: t = σ, h = (x − D(x; σ))/σ (Karras et al. 2022, Eq. 4) on
[σ_min, σ_max], prior N(0, σ_max² I): what is measured is the density of the data smoothed by
N(0, σ_min² I), at x. PSLD: h = f(z, t) − ½ G(t)² s_θ(z, t) (Song et al. 2021, Eq. 13; PSLD paper Eq. 11)
on [t_min, T], prior N(0, I) × N(0, M I) (N(0, I) for the VP-SDE) — `psld_ode_log_likelihood` says what
that reports for x.

The divergence is exact (forward-mode Jacobian trace, for small dims) or Hutchinson's estimate E[vᵀ J v]
with K fixed probes per image (Rademacher or Gaussian), each probe giving its own log p; we report their
mean and its standard error. Integration: adaptive Dormand–Prince 5(4) (`ode.dopri5`) or fixed-step Heun.
Each image is integrated (and error-controlled) on its own, by vmap, so its result never depends on its
batch.

Dequantisation (for bits/dim of 8-bit images): images x ∈ [−1, 1] come from pixels u ∈ {0 … 255} as
x = (u + U)·(data_range/255) − 1 with U ~ Uniform[0, 1) (uniform dequantisation, one draw per pixel, done
by the caller). The density of u + U on [0, 256)^d is then p_x · (data_range/255)^d, i.e. log p −
d·log(127.5) for data_range = 2, and `bits_per_dim` reports −log p_pixels / (d ln 2), d the data's dims.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion import ksigmas
from edm_jax.diffusion.ode import dopri5
from edm_jax.diffusion.psld import PhaseSpaceSDE
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["sigma_ode_log_likelihood", "psld_ode_log_likelihood", "pf_ode_drift", "bits_per_dim",
           "gaussian_log_prob", "given_settings", "MOMENTUM_STREAM", "PROBE_STREAM"]

# psld_ode_log_likelihood: image i draws its momentum from fold_in(k_i, MOMENTUM_STREAM) and its probes
# from fold_in(k_i, PROBE_STREAM). (sigma_ode_log_likelihood draws only probes, from k_i itself.)
MOMENTUM_STREAM, PROBE_STREAM = 0, 1


def gaussian_log_prob(x, mean, var):
    """log N(x; mean, var·I) summed over all but the leading axis, [N]. var scalar or [N]."""
    d = int(np.prod(x.shape[1:]))
    sq = jnp.sum(((x - mean) ** 2).reshape(x.shape[0], -1), axis=-1)
    return -0.5 * sq / var - 0.5 * d * jnp.log(2 * math.pi * var)


def bits_per_dim(log_p, num_dims, data_range=2.0):
    """−log p / (d ln 2), after the change of variables to [0, 256) pixels (data_range = 2: [−1, 1] images).

    `data_range=None` reports the continuous density's bits/dim with no change of variables.
    """
    log_p = jnp.asarray(log_p)
    if data_range is not None:
        log_p = log_p + num_dims * math.log(data_range / 255)
    return -log_p / (num_dims * math.log(2))


def given_settings(process_name, overrides, allowed) -> dict:
    """The overrides that are set (None = keep the default); one a family does not have is refused."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"the {process_name} process's likelihood has no setting(s) {unknown}; it takes "
                         f"{sorted(allowed)}")
    return given


def _check(divergence, probe, solver, key):
    if divergence not in ("exact", "hutchinson") or probe not in ("rademacher", "gaussian"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson' and probe 'rademacher' or 'gaussian', got "
                         f"{divergence!r}, {probe!r}")
    if solver not in ("rk45", "heun"):
        raise ValueError(f"solver must be 'rk45' or 'heun', got {solver!r}")
    if divergence == "hutchinson" and key is None:
        raise ValueError("the Hutchinson estimator draws probes: pass `key`")


def _integrate(drift, z, class_labels, probe_keys, *, t0, t1, divergence, probe, num_probes, solver, rtol,
               atol, heun_grid, split=None):
    """Per image: z(t1) [N, ...], the divergence integrals Δ [N, K] (one per probe; K = 1 if exact), NFE [N].

    drift(y, t, label) -> dy/dt for one image y (no batch axis), t a scalar, label one row or None.
    heun_grid: host times t0 … t1 for solver='heun' (NFE 2(len − 1) per probe batch).
    split: None, or (residual(y, t, label), trace(t)) with drift = L(t) y + residual and trace(t) = tr L(t):
      Hutchinson then probes only the residual and adds the linear part's trace exactly (a control variate:
      L's off-diagonal entries, e.g. PSLD's skew coupling of x and m, add variance but no trace).
    """
    shape, dtype = z.shape[1:], z.dtype
    k = 1 if divergence == "exact" else int(num_probes)

    def one(zi, label, ki):
        f = lambda y, t: drift(y, t, label)  # noqa: E731
        if divergence == "exact":
            def div(y, t):
                jac = jax.jacfwd(lambda u: f(u.reshape(shape), t).reshape(-1))(y.reshape(-1))
                return jnp.trace(jac)[None]
        else:
            draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
            v = draw(ki, (k, *shape), dtype)
            probed, trace = (f, None) if split is None else (lambda y, t: split[0](y, t, label), split[1])

            def div(y, t):
                jv = jax.vmap(lambda vi: jax.jvp(lambda u: probed(u, t), (y,), (vi,))[1])(v)
                est = jnp.sum((jv * v).reshape(k, -1), axis=-1)
                return est if trace is None else est + trace(t)

        rhs = lambda t, state: (f(state[0], t), div(state[0], t))  # noqa: E731
        state0 = (zi, jnp.zeros((k,), dtype))
        if solver == "rk45":
            (z_t, delta), info = dopri5(rhs, state0, t0, t1, rtol=rtol, atol=atol)
            return z_t, delta, info["nfe"]
        (z_t, delta), nfe = _heun(rhs, state0, heun_grid, dtype)
        return z_t, delta, nfe

    return jax.vmap(one, in_axes=(0, None if class_labels is None else 0, 0))(z, class_labels, probe_keys)


def _result(log_p_probes, num_dims, data_range, **extra):
    """Mean over probes [N, K] -> the returned dict (module docstring), bits/dim over `num_dims` data dims."""
    k = log_p_probes.shape[1]
    log_p = jnp.mean(log_p_probes, axis=1)
    std_err = jnp.std(log_p_probes, axis=1, ddof=1) / math.sqrt(k) if k > 1 else jnp.zeros_like(log_p)
    return dict(log_p=log_p, log_p_std_err=std_err, bits_per_dim=bits_per_dim(log_p, num_dims, data_range), **extra)


def _row(label):
    return None if label is None else label[None]


def sigma_ode_log_likelihood(denoise_fn, x, class_labels=None, *, sigma_min=0.002, sigma_max=80.0, key=None,
                             num_probes=1, divergence="hutchinson", probe="rademacher", solver="rk45", rtol=1e-5,
                             atol=1e-5, num_steps=64, data_range=2.0):
    """log p_{σ_min}(x) in nats per image by the probability-flow ODE (module docstring).

    Args:
      denoise_fn: D(x, sigma[N], class_labels). x: [N, ...] data (e.g. dequantised [−1, 1] images).
      key: one key (image i uses fold_in(key, i)) or N keys; needed for 'hutchinson'.
      divergence: 'exact' | 'hutchinson'; probe: 'rademacher' | 'gaussian'; num_probes K ≥ 1.
      solver: 'rk45' (rtol, atol) | 'heun' (num_steps Karras grid points, NFE 2(num_steps − 1) per probe batch).
    Returns:
      dict: log_p [N] (mean over probes), log_p_std_err [N] (0 for 'exact' or K = 1), bits_per_dim [N],
      nfe [N], prior_log_p [N], delta_log_p [N] (the divergence integral), x_sigma_max [N, ...].
    """
    _check(divergence, probe, solver, key)
    x = jnp.asarray(x)
    keys = per_example_keys(key if key is not None else jax.random.key(0), x.shape[0])
    drift = lambda y, s, label: (y - denoise_fn(y[None], s[None], _row(label))[0]) / s  # noqa: E731
    grid = ksigmas.karras_sigmas(num_steps, sigma_min, sigma_max)[:-1][::-1].copy()  # dense at small σ
    x_t, delta, nfe = _integrate(drift, x, class_labels, keys, t0=sigma_min, t1=sigma_max, divergence=divergence,
                                 probe=probe, num_probes=num_probes, solver=solver, rtol=rtol, atol=atol,
                                 heun_grid=grid)
    prior = gaussian_log_prob(x_t, 0.0, jnp.asarray(sigma_max, x.dtype) ** 2)
    return _result(prior[:, None] + delta, int(np.prod(x.shape[1:])), data_range, nfe=nfe, prior_log_p=prior,
                   delta_log_p=jnp.mean(delta, axis=1), x_sigma_max=x_t)


def pf_ode_drift(sde, eps_net, z, t):
    """Forward-time probability-flow drift h(z, t) = f(z, t) − ½ G(t)² s_θ(z, t) (Song et al. 2021, Eq. 13)
    of a `PhaseSpaceSDE` or `VPSDE`, with s_θ = −L_t^{−T} ε̂ (PSLD Eq. 10). z, eps_net NHWC, t scalar or [N].
    Written in t itself (not as −f̄ at τ = T − t), so t_min = 1e-5 is not rounded through T − t in float32."""
    return sde.drift(z, t) + _score_drift(sde, eps_net, z, t)


def _score_drift(sde, eps_net, z, t):
    """−½ G(t)² s_θ(z, t): the PF-ODE drift's nonlinear part (the forward drift f = F(t) z is linear)."""
    return -0.5 * sde.diffusion_like(z, t) ** 2 * sde.score_from_eps(eps_net, t, z)


def _linear_drift_trace(sde, t, num_state_dims):
    """tr ∇·f(z, t) for the linear forward drift: (β/2)·tr A per (x, m) pair, A = [[−Γ, M⁻¹], [−1, −ν]]
    (PSLD Eq. 7), or −β/2 per dim for the VP-SDE."""
    if isinstance(sde, PhaseSpaceSDE):
        return -0.5 * sde.beta(t) * (sde.gamma + sde.nu) * (num_state_dims // 2)
    return -0.5 * sde.beta(t) * num_state_dims


def psld_ode_log_likelihood(eps_fn, x, class_labels=None, *, sde, t_min=None, key=None, num_probes=1,
                            divergence="hutchinson", probe="rademacher", solver="rk45", rtol=1e-5, atol=1e-5,
                            num_steps=64, data_range=2.0):
    """log p(x) in nats per image for a PSLD / CLD (`PhaseSpaceSDE`) or VP-SDE (`VPSDE`) model, by the PF-ODE.

    What is reported. VP-SDE: log p_{t_min}(x), the model's density at forward time t_min (the data smoothed
    by the kernel at t_min), as for the σ family. Phase space: the ODE gives the density of the joint state
    z = (x, m), and x alone has no ODE. With m drawn from its initial law q(m) = N(0, κM I) (the HSM kernel's
    m₀), each image reports

        log p_{t_min}(x, m) − log q(m),   m ~ q,

    whose mean over m is the evidence lower bound E_q[log p(x, m) − log q(m)] ≤ log ∫ p(x, m) dm = log p(x)
    (Jensen), equal when the model's p(m | x) is q — as it is for the true process at t → 0, where m₀ is
    drawn independently of x₀. This is CLD's convention (Dockhorn et al. 2022: NLL ≤ E[−log p(x, v)] −
    H(q)); subtracting log q(m) per draw instead of the entropy H(q) has the same mean and removes m's
    noise when p(m | x) = q. Bits/dim count the data's dims (x only). One m per image (shared by its
    probes), so `log_p_std_err` is the probes' error only; a dataset's spread over images includes m's.

    Args:
      eps_fn: ε_θ(z, t [N], class_labels), the process's model (z NHWC [N, H, W, 2C]; C channels out for
        the reduced modes, e.g. CLD). x: [N, H, W, C] data (e.g. dequantised [−1, 1] images).
      sde: the process's SDE. t_min: the data end of the integral, default `sde.train_eps` (the smallest
        time the network was trained at; Song et al. 2021 use 1e-5 too); the prior end is sde.T.
      key: one key or N keys (image i: fold_in(k_i, MOMENTUM_STREAM) draws m, fold_in(k_i, PROBE_STREAM)
        its probes); needed for phase space or 'hutchinson'.
      divergence, probe, num_probes, solver, rtol, atol: as `sigma_ode_log_likelihood`; solver='heun' runs
        on num_steps times t_min + (T − t_min)·u², u uniform on [0, 1] (dense near the data). Hutchinson
        probes only −½G²s_θ; the linear drift f = F(t) z enters by its exact trace (its skew x–m coupling
        would add variance: 3.4 instead of 0.25 nats standard error at K = 48 on tests' Gaussian case).
    Returns:
      dict as `sigma_ode_log_likelihood` with z_T [N, H, W, 2C] (or C) instead of x_sigma_max, plus
      log_q_m [N] (log q(m) subtracted; 0 for the VP-SDE) and m [N, H, W, C] (or None).
    """
    _check(divergence, probe, solver, key)
    phase_space = isinstance(sde, PhaseSpaceSDE)  # z = (x, m); the VP-SDE's z is x
    if phase_space and key is None:
        raise ValueError("the phase-space likelihood draws the momentum m ~ N(0, κM I): pass `key`")
    x = jnp.asarray(x)
    n, dtype = x.shape[0], x.dtype
    keys = per_example_keys(key if key is not None else jax.random.key(0), n)
    stream = lambda s: jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)  # noqa: E731
    if phase_space:
        var_m = sde.kappa * sde.M
        m = math.sqrt(var_m) * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], dtype))(stream(MOMENTUM_STREAM))
        z, log_q = jnp.concatenate([x, m], axis=-1), gaussian_log_prob(m, 0.0, var_m)
    else:
        m, z, log_q = None, x, jnp.zeros((n,), dtype)
    t_min = float(sde.train_eps if t_min is None else t_min)
    if not 0 < t_min < sde.T:
        raise ValueError(f"t_min must lie in (0, T = {sde.T}), got {t_min}")

    def part(fn):  # one image's drift term from the batched ε̂
        return lambda y, t, label: fn(sde, eps_fn(y[None], jnp.full((1,), t, y.dtype), _row(label)), y[None], t)[0]

    num_state_dims = int(np.prod(z.shape[1:]))
    split = (part(_score_drift), lambda t: _linear_drift_trace(sde, t, num_state_dims))
    grid = t_min + (sde.T - t_min) * np.linspace(0.0, 1.0, num_steps) ** 2
    z_t, delta, nfe = _integrate(part(pf_ode_drift), z, class_labels, stream(PROBE_STREAM), t0=t_min, t1=sde.T,
                                 divergence=divergence, probe=probe, num_probes=num_probes, solver=solver,
                                 rtol=rtol, atol=atol, heun_grid=grid, split=split)
    prior = sde.prior_log_prob(z_t)
    return _result(prior[:, None] + delta - log_q[:, None], int(np.prod(x.shape[1:])), data_range, nfe=nfe,
                   prior_log_p=prior, delta_log_p=jnp.mean(delta, axis=1), z_T=z_t, log_q_m=log_q, m=m)


def _heun(rhs, state, grid, dtype):
    """Fixed-step Heun (trapezoidal predictor–corrector) over the host grid t_0 … t_K. NFE 2K."""
    add = lambda a, b, c: jax.tree.map(lambda p, q: p + c * q, a, b)  # noqa: E731

    def step(st, s):
        h = s[1] - s[0]
        d0 = rhs(s[0], st)
        d1 = rhs(s[1], add(st, d0, h))
        return add(st, jax.tree.map(lambda p, q: (p + q) / 2, d0, d1), h), None

    grid = np.asarray(grid, np.float64)
    pairs = jnp.asarray(np.stack([grid[:-1], grid[1:]], axis=1), dtype)
    state, _ = jax.lax.scan(step, state, pairs)
    return state, jnp.asarray(2 * (len(grid) - 1), jnp.int32)
