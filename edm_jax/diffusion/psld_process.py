"""PSLD (Pandey & Mandt 2023) — and the VP-SDE and CLD of the same recipe — behind the process seam.

The state is z = (x, m), 2·C channels (x block first); the network ε_θ(z_t, t) predicts the unit noise of
the perturbation kernel (paper Eq. 10, HSM) and sees the forward time t through its noise embedding:
log t (float32) for Fourier features, t itself for the positional embedding (reference notes §2.2). The
drivers get the same contract as for the σ family (edm_jax.diffusion.process): `model_fn(z, t, labels)`
is ε_θ, the prior is N(0, I) × N(0, M I), `to_data` keeps the x block, and the samplers are those of
edm_jax.diffusion.psld_samplers.

Loss reduction: the reference averages (target − ε̂)² over every element of the batch. The trainer sums
the per-element loss over each example and averages over the batch (EDM's convention) and reports the sum
over the batch's image elements N·H·W·C. `loss` scales by C / C_out (C_out: the network's output channels,
2·C for PSLD), so the reported loss is the reference's mean exactly, and the objective is that mean times
H·W·C — the constant factor EDM's summed loss has too, which Adam's step does not see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from edm_jax.diffusion import likelihood, psld_samplers
from edm_jax.diffusion.psld import PhaseSpaceSDE, VPSDE, _bc, _split
from edm_jax.diffusion.psld_loss import psld_loss, train_times, vpsde_loss
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["PSLDSamplerSettings", "PSLDProcess", "psld_process", "gaussian_data_eps", "PSLD_SAMPLERS"]

PSLD_SAMPLERS = ("em", "sscs", "ode_euler", "ode_heun", "ode_rk45")


@dataclasses.dataclass(frozen=True)
class PSLDSamplerSettings:
    """sampler: 'em' (Euler–Maruyama, reverse SDE) | 'sscs' (symmetric splitting) | 'ode_euler' |
    'ode_heun' (fixed-step PF-ODE) | 'ode_rk45' (adaptive Dormand–Prince, per-image error control).
    num_steps: network calls of the fixed-step samplers (K = num_steps − 1 steps + the denoising step).
    stride: 'uniform' | 'quadratic' time grid. rtol / atol: ode_rk45's tolerances."""

    sampler: str = "em"
    num_steps: int = 1000
    stride: str = "uniform"
    rtol: float = 1e-5
    atol: float = 1e-5

    def __post_init__(self):
        if self.sampler not in PSLD_SAMPLERS:
            raise ValueError(f"unknown PSLD sampler {self.sampler!r}; choose one of {list(PSLD_SAMPLERS)}")
        if self.stride not in ("uniform", "quadratic"):
            raise ValueError(f"stride must be 'uniform' or 'quadratic', got {self.stride!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"num_steps must be an integer ≥ 2, got {self.num_steps!r}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got {self.rtol}, {self.atol}")


# The paper's settings (Tables 1 and 3): CIFAR-10 EM with uniform striding at NFE 1000; CelebA-64 EM with
# quadratic striding at NFE 250.
_DATASET_SETTINGS = {32: dict(num_steps=1000), 64: dict(num_steps=250, stride="quadratic")}


@dataclasses.dataclass(frozen=True)
class PSLDProcess:
    """sde: a `PhaseSpaceSDE` (PSLD, CLD) or `VPSDE`. hsm: hybrid score matching (m₀ integrated out, every
    reported model) or DSM. embedding: the network's noise embedding, 'fourier' (log t) or 'positional' (t).
    eps_skip: None (the paper: the network output is ε̂) or a data standard deviation s: ε̂ = ε_G(z, t) +
    network, ε_G the exact ε for data N(0, s² I) (`gaussian_data_eps`), so the network learns the residual
    — EDM's c_skip idea in ε form; not in the reference, used by the CPU quickstart only. t_lognormal:
    None (the paper: t ~ U(ε_train, T)) or (P_mean, P_std), training times log-normal in t
    (`psld_loss.train_times`); not in the reference, used by the CPU quickstart only."""

    sde: Any
    hsm: bool = True
    embedding: str = "fourier"
    name: str = "psld"
    eps_skip: Optional[float] = None
    t_lognormal: Optional[tuple[float, float]] = None

    def __post_init__(self):
        if self.embedding not in ("fourier", "positional"):
            raise ValueError(f"embedding must be 'fourier' or 'positional', got {self.embedding!r}")
        if self.t_lognormal is not None and not (len(self.t_lognormal) == 2 and self.t_lognormal[1] > 0):
            raise ValueError(f"t_lognormal must be (P_mean, P_std) with P_std > 0, got {self.t_lognormal!r}")

    @property
    def phase_space(self) -> bool:
        return isinstance(self.sde, PhaseSpaceSDE)

    # ---- The network.
    def network_channels(self, data_channels: int) -> tuple[int, int]:
        return self.sde.network_channels(data_channels)

    def data_channels(self, network_in_channels: int) -> int:
        return network_in_channels // 2 if self.phase_space else network_in_channels

    def noise_label(self, t):
        """The network's noise input for forward time t [N] (float32)."""
        t = jnp.asarray(t, jnp.float32)
        return jnp.log(t) if self.embedding == "fourier" else t

    def model(self, net_apply: Callable) -> Callable:
        """ε_θ(variables, z, t, class_labels=None, augment_labels=None, **kw), float32, z NHWC [N, H, W, 2C]."""

        def eps(variables, z, t, class_labels=None, augment_labels=None, **kwargs):
            z = jnp.asarray(z, jnp.float32)
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
            out = jnp.asarray(net_apply(variables, z, self.noise_label(t), class_labels, augment_labels, **kwargs),
                              jnp.float32)
            return out if self.eps_skip is None else out + gaussian_data_eps(self.sde, z, t, self.eps_skip)

        return eps

    # ---- Training.
    def loss(self, model_fn: Callable, images, labels=None, *, key, augment_labels=None):
        """Per-element ε-MSE [N, H, W, C_out] · C / C_out (module docstring)."""
        fn = lambda z, t, y: model_fn(z, t, y, augment_labels)  # noqa: E731
        if self.phase_space:
            loss = psld_loss(fn, images, labels, sde=self.sde, key=key, hsm=self.hsm, t_lognormal=self.t_lognormal)
        else:
            loss = vpsde_loss(fn, images, labels, sde=self.sde, key=key, t_lognormal=self.t_lognormal)
        return loss * (images.shape[-1] / loss.shape[-1])

    # ---- Sampling.
    def prior(self, keys, data_shape, dtype=jnp.float32):
        """z_T, one per key: N(0, I) × N(0, M I) on 2·C channels (N(0, I) for the VP-SDE)."""
        return self.sde.prior(per_example_keys(keys, keys.shape[0]), (keys.shape[0], *data_shape), dtype)

    def to_data(self, state):
        return self.sde.to_data(state)

    def sampler_settings(self, *, resolution=None, dataset=None, base: Optional[PSLDSamplerSettings] = None,
                         **overrides) -> PSLDSamplerSettings:
        """The paper's settings for the resolution (or `base`) with named overrides (None = keep); a
        setting of another family (e.g. sigma_min) is refused in one sentence."""
        if base is None:
            base = PSLDSamplerSettings(**_DATASET_SETTINGS.get(resolution, {}))
        given = {k: v for k, v in overrides.items() if v is not None}
        fields = {f.name for f in dataclasses.fields(PSLDSamplerSettings)}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ValueError(f"the {self.name} process has no sampler setting(s) {unknown}; it takes {sorted(fields)}")
        return dataclasses.replace(base, **given)

    def sampler(self, settings: PSLDSamplerSettings) -> Callable:
        """run(model_fn, z_T, class_labels=None, key=None) -> z_0 (samplers of psld_samplers)."""
        s = settings

        def run(model_fn, z, class_labels=None, key=None):
            kw = dict(sde=self.sde)
            if s.sampler == "em":
                out = psld_samplers.em_sampler(model_fn, z, class_labels, num_steps=s.num_steps, stride=s.stride,
                                               key=key, **kw)
            elif s.sampler == "sscs":
                out = psld_samplers.sscs_sampler(model_fn, z, class_labels, num_steps=s.num_steps,
                                                 stride=s.stride, key=key, **kw)
            elif s.sampler == "ode_rk45":
                out = psld_samplers.ode_adaptive_sampler(model_fn, z, class_labels, rtol=s.rtol, atol=s.atol, **kw)
            else:
                out = psld_samplers.ode_sampler(model_fn, z, class_labels, num_steps=s.num_steps,
                                                solver=s.sampler[len("ode_"):], **kw)
            return out[0]

        return run

    # ---- Guidance and the noise-aware classifier.
    def guide(self, model_fn: Callable, log_prob_fn: Callable, scale) -> Callable:
        """ε̂ of s + scale·∇_z log p(y | z, t): the reverse drift gains scale·G²∇log p (psld_samplers)."""
        return psld_samplers.psld_classifier_guided(model_fn, log_prob_fn, scale, sde=self.sde)

    def noisy(self, images, key=None, **unused):
        """(z_t, t [N]) with t ~ U(ε_train, T) and the HSM kernel: the state a noise-aware classifier sees."""
        n = images.shape[0]
        keys = per_example_keys(key, n)
        t = train_times(self.sde, jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), ()))(keys))
        eps_c = 2 * images.shape[-1] if self.phase_space else images.shape[-1]
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (*images.shape[1:-1], eps_c)))(keys)
        return self.sde.perturb(jnp.asarray(images, jnp.float32), t, eps)[0], t

    # ---- Likelihood (Song et al. 2021, App. D).
    def likelihood_settings(self, **overrides) -> dict:
        """{t_min}: the PF-ODE integral's data end, default ε_train (the override, None = keep); it runs to T."""
        given = likelihood.given_settings(self.name, overrides, ("t_min",))
        return dict(t_min=float(given.get("t_min", self.sde.train_eps)))

    def log_likelihood(self, model_fn: Callable, x, class_labels=None, *, key=None, **options) -> dict:
        """log p(x) per image, nats and bits/dim: for PSLD / CLD the bound E_m[log p(x, m) − log q(m)]
        with m ~ q = N(0, κM I), for the VP-SDE log p_{t_min}(x) (`likelihood.psld_ode_log_likelihood`,
        whose keywords `options` are: t_min, divergence, num_probes, solver, ...)."""
        return likelihood.psld_ode_log_likelihood(model_fn, x, class_labels, sde=self.sde, key=key, **options)

    def describe(self) -> dict:
        extra = {} if self.eps_skip is None else {"eps_skip": self.eps_skip}
        if self.t_lognormal is not None:
            extra["t_lognormal"] = list(self.t_lognormal)
        return {"kind": self.name, **dataclasses.asdict(self.sde), "hsm": self.hsm, "embedding": self.embedding,
                **extra}


def gaussian_data_eps(sde, z, t, s):
    """ε of z_t for data x₀ ~ N(0, s² I) under the HSM kernel (notes §9): per pixel, with a_t the x₀ column
    of the mean map and Σ_t the kernel covariance, the score is −(s² a aᵀ + Σ_t)⁻¹ z and ε = −L_tᵀ·score
    (the network's channels). VP-SDE: ε = σ z / (s² α² + σ²). z [N, H, W, 2C] (C), t [N]; float32."""
    if not isinstance(sde, PhaseSpaceSDE):
        a, sd = _bc(sde.mean_coeff(t), z), _bc(sde.std(t), z)
        return sd * z / (s * s * a * a + sd * sd)
    a, cov = sde.mean_matrix(t), sde.cov_hsm(t)
    ax, am = _bc(a.c11, z), _bc(a.c21, z)
    pxx, pxm, pmm = s * s * ax * ax + _bc(cov.xx, z), s * s * ax * am + _bc(cov.xm, z), s * s * am * am + _bc(cov.mm, z)
    det = pxx * pmm - pxm * pxm
    zx, zm = _split(z)
    score = jnp.concatenate([-(pmm * zx - pxm * zm) / det, -(pxx * zm - pxm * zx) / det], -1)
    return sde.eps_from_score(score, t)


def psld_process(kind: str = "psld", *, hsm: bool = True, embedding: str = "fourier", eps_skip=None,
                 t_lognormal=None, **hyperparameters):
    """'psld' / 'cld' (PhaseSpaceSDE; defaults: CIFAR-10 SOTA Γ = 0.01, resp. Γ = 0, ν = 4) or 'vpsde'
    (VPSDE), with the SDE's hyperparameters (beta_min, beta_max, gamma, nu, kappa, ...)."""
    cls = VPSDE if kind == "vpsde" else PhaseSpaceSDE
    defaults = {"cld": dict(gamma=0.0, nu=4.0)}.get(kind, {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise ValueError(f"the {kind!r} process has no hyperparameter(s) {unknown}; it takes "
                         f"{sorted(fields | {'hsm', 'embedding', 'eps_skip', 't_lognormal'})}")
    return PSLDProcess(sde=cls(**{**defaults, **hyperparameters}), hsm=bool(hsm), embedding=embedding, name=kind,
                       eps_skip=None if eps_skip is None else float(eps_skip),
                       t_lognormal=None if t_lognormal is None else tuple(float(v) for v in t_lognormal))
