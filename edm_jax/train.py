"""Training: train state, the pure train step, sharding over a device mesh, and the training loop.

Reference: NVlabs/edm `train.py` and `training/training_loop.py` (Karras et al. 2022, Appendix F.1 and
Table 7); see `../shared/reference/edm_reference_notes.md` §4. One step, for a global batch of B images:

    σ, n ~ p_train per example; y ← augment(y) (non-leaky, p > 0 only)
    L = loss_scaling / B · Σ_examples Σ_pixels λ(σ) ‖D(y + σn; σ) − y‖²          (Eq. 8, summed, not averaged)
    g = nan_to_num(∇L, nan=0, posinf=1e5, neginf=−1e5)                           (no norm clipping)
    θ ← Adam(θ, g; lr = lr_base · min(nimg / rampup_img, 1), β₁ 0.9, β₂ 0.999, ε 1e-8)
    θ_ema ← θ + β (θ_ema − θ),  β = 0.5^(B / max(min(halflife, 0.05 · nimg), 1e-8))

where nimg is the number of images seen *before* this step, so lr = 0 and β = 0 on the very first step, as
in the reference. Loss scaling is not undone before Adam, as in the reference (it divides Adam's ε by it).
PSLD's recipe (psld_reference_notes.md §3) takes two options instead: g clipped to global L2 norm 1 before
Adam (`make_optimizer(grad_clip_norm=)`) and a constant β = 0.9999 every step (`make_train_step(ema_decay=)`).

Randomness (DESIGN.md): the per-step key is `fold_in(base_key, state.step)` — done inside the step, so
the caller passes the run's base key unchanged every step, and a resumed run draws exactly what an
uninterrupted one does. Example i of the global batch gets `fold_in(step_key, i)`, and its σ, noise,
augmentation and dropout masks all derive from that key only (a network that draws dropout is vmapped over
examples so each example has its own dropout key; one that draws nothing is called on the whole batch).
A step therefore computes the same numbers on 1 device or 8 and with or without gradient accumulation, up
to the order of floating-point sums.

Parallelism: one `Mesh` over all devices (axis 'data'); the batch is sharded along 'data', the train
state replicated; the step is `jax.jit`-ed with explicit in/out shardings and the state donated. Inside,
the gradient is a `jax.shard_map` over 'data': each device sums its own examples' gradients, over the
gradient-accumulation rounds too (the reference's `--batch-gpu`; a `lax.scan` over micro-batches), and
one all-reduce per step follows, as the reference's DDP syncs only on the last round. Cost to know: the
per-example vmap (dropout > 0) makes the step ~1.5x slower to compile.

The loop (`run_loop`) is the one training skeleton: workdir lock, logs, resume policy, ticks, snapshots
and checkpoints (edm_jax/checkpoint.py) around an `Objective` — the diffusion model's
(`train_and_evaluate`, the only part that reads a diffusion config) or the noise-aware classifier's
(`classifier_train`). The snapshot grids are `--mode=sample`'s sample function (`generation.sample_fn`).

Messages go to the `edm_jax` loggers and, for the run's duration, to its log.txt; the library attaches no
console handler. main.py shows them on stdout; a Python caller (`train_and_evaluate(config, workdir)`)
sees them with `logging.basicConfig(level=logging.INFO)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edm_jax.diffusion import augment as augment_lib
from edm_jax import distributed
from edm_jax.distributed import make_mesh, replicated
from edm_jax import generate as generate_lib
from edm_jax.networks.build import build_network  # noqa: F401 (re-exported; moved to networks/)
from edm_jax.interop.rundir import as_dict as _as_dict

__all__ = [
    "learning_rate", "ema_beta", "TrainState", "make_optimizer", "create_train_state", "make_train_step",
    "plan_batch", "out_of_memory_message", "resume_changes", "make_mesh", "shard_batch", "compile_train_step",
    "maybe_initialize_distributed", "build_network", "make_grid_sampler", "save_image_grid", "train_and_evaluate",
    "run_loop", "Objective", "Schedule",
]

AUGMENT_DIM = 9  # width of the augmentation labels (edm_jax.augment)
_SAMPLE_AUGMENT_KEYS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac", "aniso_rotate_prob",
                        "rotate_frac_max")
_APPLY_AUGMENT_KEYS = ("scale_std", "aniso_std", "translate_frac_std")


# ---------------------------------------------------------------------------------------------------
# Schedules (training_loop.py): learning-rate ramp-up and EMA decay.

def learning_rate(nimg, base_lr, rampup_img):
    """Linear warm-up with no decay: lr = base_lr · min(nimg / max(rampup_img, 1e-8), 1).

    `nimg` is the number of training images seen before the step (a scalar, Python or jnp); lr is 0 at
    nimg = 0 even with no ramp-up, exactly as the reference. CIFAR-10: base 1e-3 over 10 Mimg. float32.
    """
    nimg = jnp.asarray(nimg, jnp.float32)
    return base_lr * jnp.minimum(nimg / max(float(rampup_img), 1e-8), 1.0)


def ema_beta(nimg, batch_size, halflife_img, rampup_ratio=0.05):
    """EMA decay per step: β = 0.5^(batch / max(h, 1e-8)), h = min(halflife_img, nimg · rampup_ratio).

    `rampup_ratio=None` disables the ramp-up (h = halflife_img). `nimg` counts images seen before the
    step, so β = 0 on the first step (the EMA starts as a copy of the network). CIFAR-10 steady state:
    0.5^(512 / 5e5) ≈ 0.99929. float32 scalar.
    """
    nimg = jnp.asarray(nimg, jnp.float32)
    halflife = jnp.asarray(float(halflife_img), jnp.float32)
    if rampup_ratio is not None:
        halflife = jnp.minimum(halflife, nimg * rampup_ratio)
    return jnp.power(jnp.float32(0.5), batch_size / jnp.maximum(halflife, 1e-8))


# ---------------------------------------------------------------------------------------------------
# Train state.

@flax.struct.dataclass
class TrainState:
    """Everything a step updates. All leaves float32 except `step` (int32 scalar).

    step: number of optimizer steps done (images seen = step · global batch).
    params: the network's trainable variables (the 'params' collection).
    buffers: the network's other collections, never trained or averaged (e.g. {'buffers': NCSN++ Fourier
      frequencies}); an empty dict for DDPM++/ADM.
    ema: exponential moving average of `params` (same tree); buffers are shared, as in the reference.
    opt_state: optax state of `make_optimizer` (Adam moments, count, injected learning rate).
    """
    step: jax.Array
    params: Any
    buffers: Any
    ema: Any
    opt_state: Any

    def variables(self, ema: bool = False):
        """The variables dict to pass to `module.apply`: {'params': params or ema, **buffers}."""
        return {"params": self.ema if ema else self.params, **self.buffers}


def make_optimizer(base_lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=None):
    """Adam with no weight decay (the reference's `torch.optim.Adam`); the lr is a hyperparameter the
    train step overwrites every step with the ramp-up schedule (`optax.inject_hyperparams`).

    grad_clip_norm: None (EDM: no clipping) or the global L2 norm the gradient is clipped to before Adam
    (PSLD: 1.0, Lightning's `gradient_clip_val`, i.e. torch's `clip_grad_norm_` up to its 1e-6 in the
    denominator). None builds exactly the EDM optimizer and state, so EDM runs and checkpoints are unchanged.
    """
    if grad_clip_norm is None:
        return optax.inject_hyperparams(optax.adam)(learning_rate=base_lr, b1=b1, b2=b2, eps=eps)
    if not grad_clip_norm > 0:
        raise ValueError(f"train.grad_clip_norm must be > 0 (or None for no clipping), got {grad_clip_norm}")

    def clipped_adam(learning_rate, b1, b2, eps, max_norm):
        return optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))

    return optax.inject_hyperparams(clipped_adam, static_args=("max_norm",))(
        learning_rate=base_lr, b1=b1, b2=b2, eps=eps, max_norm=float(grad_clip_norm))


def create_train_state(key, module, sample_shape, label_dim=0, augment_dim=0, tx=None, mesh=None,
                       compiler_options=None):
    """Initialise the network, its EMA copy and the optimizer state.

    key: typed PRNG key for the initialisation (the same on every process, so all agree without a
      broadcast). module: a flax module with the EDM network call signature. sample_shape: (H, W, C).
    label_dim / augment_dim: widths of the class and augmentation labels (0 = none).
    tx: the optax optimizer (default `make_optimizer()`). mesh: if given, the state is created replicated
      on it (jit with out_shardings) instead of on the default device. compiler_options: for XLA.
    Returns a `TrainState` with step 0 and ema = params.
    """
    tx = make_optimizer() if tx is None else tx
    x = jnp.zeros((1, *sample_shape), jnp.float32)
    noise_labels = jnp.zeros((1,), jnp.float32)
    class_labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
    augment_labels = jnp.zeros((1, augment_dim), jnp.float32) if augment_dim else None

    def init(key):
        k_params, k_dropout = jax.random.split(key)
        variables = module.init({"params": k_params, "dropout": k_dropout}, x, noise_labels, class_labels,
                                augment_labels, train=False)
        variables = dict(variables)
        params = variables.pop("params")
        ema = jax.tree.map(lambda p: p + 0, params)  # a distinct buffer: the state is donated each step
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=variables, ema=ema,
                          opt_state=tx.init(params))

    out_shardings = None if mesh is None else replicated(mesh)
    return jax.jit(init, out_shardings=out_shardings, compiler_options=compiler_options)(key)


# ---------------------------------------------------------------------------------------------------
# Batch planning and sharding.

def plan_batch(global_batch: int, num_devices: int, batch_per_device: Optional[int] = None):
    """Split a global batch as the reference does: returns (per-device batch per round, number of rounds).

    Each device sees global_batch / num_devices examples per step, in `rounds` micro-batches of
    `batch_per_device` (default: all at once). Raises ValueError when the numbers do not divide.
    """
    if global_batch <= 0:
        raise ValueError(f"train.batch_size={global_batch} must be positive (a multiple of the {num_devices} "
                         "devices)")
    if global_batch % num_devices:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {num_devices} devices; "
                         f"set it to a multiple of {num_devices}.")
    per_device = global_batch // num_devices
    if batch_per_device is None or batch_per_device <= 0 or batch_per_device >= per_device:
        return per_device, 1
    if per_device % batch_per_device:
        raise ValueError(f"train.batch_per_device={batch_per_device} does not divide the {per_device} examples "
                         f"each of the {num_devices} devices gets from train.batch_size={global_batch}; set "
                         f"it to a divisor of {per_device}.")
    return batch_per_device, per_device // batch_per_device


def out_of_memory_message(error: BaseException, batch_per_device: Optional[int]) -> Optional[str]:
    """The one sentence for XLA running out of device memory (RESOURCE_EXHAUSTED) in the train step, or None
    for any other error. `batch_per_device`: the examples each device holds per round; the advice is half of
    it (at least 1): gradient accumulation (`plan_batch`) then keeps train.batch_size, and the run its numbers."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or batch_per_device is None:
        return None
    detail = next((line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), "")[:160]
    if batch_per_device <= 1:
        return (f"the train step ran out of device memory with 1 example per device ({detail}); use a smaller "
                "model (model.model_channels) or an accelerator with more memory")
    return (f"the train step ran out of device memory at {batch_per_device} examples per device ({detail}); "
            f"lower train.batch_per_device to {max(1, batch_per_device // 2)}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh):
    """Turn this process's slice of the global batch (host arrays, leading axis = local examples) into
    global jax Arrays sharded along 'data' (`jax.make_array_from_process_local_data`)."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# One mesh for training, sampling and evaluation (devices in process order), and one start of the
# distributed runtime for every mode: both live in edm_jax/distributed.py.
maybe_initialize_distributed = distributed.initialize


# ---------------------------------------------------------------------------------------------------
# The train step.

def _draws_randomness(apply_fn, variables, x, c_noise, class_labels, augment_labels) -> bool:
    """Whether the network asks for a 'dropout' key in training mode (dropout or label dropout > 0).

    Traced abstractly on one example: Flax raises InvalidRngError when a module needs a key it was not given,
    and both networks ask only when they would draw (Dropout at rate 0 and label dropout 0 do not)."""
    first = lambda a: None if a is None else a[:1]  # noqa: E731
    try:
        jax.eval_shape(lambda: apply_fn(variables, first(x), first(c_noise), first(class_labels),
                                        first(augment_labels), train=True))
    except flax.errors.InvalidRngError:
        return True
    return False


def _per_example_net(apply_fn):
    """Wrap `apply_fn` into F(variables, x, c_noise, class_labels, augment_labels, dropout_keys) whose
    example i's dropout depends only on its own key [N]: the network vmapped over examples when it draws
    randomness, else one call on the whole batch (the same numbers; the quickstart's step on 2 CPU devices
    compiles in 44 s instead of 67 and runs 2.6 % faster, benchmarks/README.md)."""

    def net(variables, x, c_noise, class_labels, augment_labels, dropout_keys):
        if not _draws_randomness(apply_fn, variables, x, c_noise, class_labels, augment_labels):
            return apply_fn(variables, x, c_noise, class_labels, augment_labels, train=True)

        def one(x1, c1, cl1, al1, k1):
            add = lambda a: None if a is None else a[None]  # noqa: E731
            out = apply_fn(variables, x1[None], c1[None], add(cl1), add(al1), train=True, rngs={"dropout": k1})
            return out[0]
        return jax.vmap(one)(x, c_noise, class_labels, augment_labels, dropout_keys)

    return net


def make_train_step(*, apply_fn, process, tx: optax.GradientTransformation, global_batch: int, num_rounds: int = 1,
                    base_lr: float = 1e-3, lr_rampup_img: float = 10e6, ema_halflife_img: float = 500e3,
                    ema_rampup_ratio: Optional[float] = 0.05, ema_decay: Optional[float] = None,
                    loss_scaling: float = 1.0,
                    augment_p: float = 0.0, augment_kwargs: Optional[Mapping] = None,
                    mesh: Optional[Mesh] = None) -> Callable:
    """Build the pure `train_step(state, batch, key) -> (state, metrics)`.

    apply_fn: the network's raw `module.apply`. process: the forward process
      (`edm_jax.diffusion.process`): `process.model` wraps the network into the model it trains
      (EDM: D of Eq. 7) and `process.loss` is the per-element loss (Eq. 8). tx: `make_optimizer(...)`. global_batch: B, images per step over all devices.
    num_rounds: gradient-accumulation rounds R (from `plan_batch`); the batch is split into R micro-batches
      that each keep an equal share on every device, and their gradients are summed in a `lax.scan`.
    base_lr, lr_rampup_img: `learning_rate`. ema_halflife_img, ema_rampup_ratio: `ema_beta`.
    ema_decay: None (EDM's half-life EMA above) or a constant per-step decay β (PSLD: 0.9999 after every
      step from the first, no ramp-up; the EMA starts as a copy of the network in both cases).
    loss_scaling: multiplies the summed loss (and thus the gradient); not undone, as in the reference.
    augment_p: augmentation probability (0 = off, the network gets no augment labels); augment_kwargs:
      per-transform multipliers for `sample_augment_params` (xflip, yflip, scale, rotate_frac, aniso,
      translate_frac, ...) and the strengths for `apply_augment` (scale_std, aniso_std, translate_frac_std).
    mesh: if given, the gradient is computed per device with `jax.shard_map` (batch along 'data', state
      replicated) and all-reduced once per step, after the accumulation rounds.

    train_step: `state` a TrainState; `batch` {'images': float32 [B, H, W, C] in [−1, 1], 'labels':
      optional float32 [B, label_dim] one-hot (absent or width 0 = unconditional)}; `key` the run's base key
      (typed), the same every step — the step key `fold_in(key, state.step)` is derived inside.
    metrics: float32 scalars 'loss' (mean per-element loss over the batch, before loss scaling), 'lr' and
      'ema_beta' (the values used by this step), 'nonfinite_grads' (entries replaced by nan_to_num).
    """
    augment_kwargs = dict(augment_kwargs or {})
    apply_kwargs = {k: augment_kwargs.pop(k) for k in _APPLY_AUGMENT_KEYS if k in augment_kwargs}
    sample_kwargs = augment_kwargs
    if global_batch % num_rounds:
        raise ValueError(f"global batch {global_batch} is not divisible into {num_rounds} accumulation rounds")
    if ema_decay is not None and not 0 <= ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1) (or None for the half-life EMA), got {ema_decay}")
    model = process.model(_per_example_net(apply_fn))

    def split_rounds(x):
        # Round r takes the examples i with i % R == r of the batch it is given: this device's share under
        # a mesh (a multiple of R examples starting at a multiple of R, so the same split as over the
        # global batch), the whole batch without one.
        return jnp.swapaxes(x.reshape(x.shape[0] // num_rounds, num_rounds, *x.shape[1:]), 0, 1)

    def micro_grads(params, buffers, images, labels, index, step_key):
        """Gradient of loss_scaling / B · Σ loss over one micro-batch, and the unscaled Σ loss."""
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)
        k_aug, k_loss, k_drop = (jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(keys) for j in range(3))
        augment_labels = None
        if augment_p > 0:
            aug = augment_lib.sample_augment_params(k_aug, images.shape[0], p=augment_p, **sample_kwargs)
            images, augment_labels = augment_lib.apply_augment(images, aug, margin="image", **apply_kwargs)

        def objective(params):
            variables = {"params": params, **buffers}
            fn = lambda x, level, lab, al: model(variables, x, level, lab, al, dropout_keys=k_drop)
            loss = process.loss(fn, images, labels, key=k_loss, augment_labels=augment_labels)
            total = jnp.sum(loss)
            return total * (loss_scaling / global_batch), total

        grads, total = jax.grad(objective, has_aux=True)(params)
        return grads, total

    def local_grads(params, buffers, images, labels, index, step_key):
        """`micro_grads` summed over the R rounds of the examples given (a `lax.scan` when R > 1)."""
        if num_rounds == 1:
            return micro_grads(params, buffers, images, labels, index, step_key)
        xs = (split_rounds(images), None if labels is None else split_rounds(labels), split_rounds(index))

        def body(carry, xs):
            g_acc, t_acc = carry
            g, t = micro_grads(params, buffers, *xs, step_key)
            return (jax.tree.map(jnp.add, g_acc, g), t_acc + t), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, total), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), xs)
        return grads, total

    def train_step(state: TrainState, batch, key):
        images = jnp.asarray(batch["images"], jnp.float32)
        if images.shape[0] != global_batch:
            raise ValueError(f"batch has {images.shape[0]} images but the step was built for {global_batch}")
        labels = batch.get("labels")
        labels = None if labels is None or labels.shape[-1] == 0 else jnp.asarray(labels, jnp.float32)
        step_key = jax.random.fold_in(key, state.step)
        index = jnp.arange(global_batch, dtype=jnp.uint32)  # global example index

        if mesh is None:
            grads, total = local_grads(state.params, state.buffers, images, labels, index, step_key)
        else:
            # Data parallelism made explicit: each device sums the gradients of its own examples over all
            # rounds, then one all-reduce per step (the reference's DDP also syncs on the last round only;
            # left to the partitioner, the all-reduce landed inside the accumulation loop, once per round).
            rep, data = P(), P("data")
            grads, total = jax.shard_map(
                lambda *args: jax.lax.psum(local_grads(*args), "data"), mesh=mesh,
                in_specs=(rep, rep, data, data, data, rep), out_specs=rep, check_vma=False,
            )(state.params, state.buffers, images, labels, index, step_key)

        nonfinite = sum(jnp.sum(~jnp.isfinite(g)) for g in jax.tree.leaves(grads))
        grads = jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)

        nimg = state.step.astype(jnp.float32) * global_batch  # images seen before this step
        lr = learning_rate(nimg, base_lr, lr_rampup_img)
        opt_state = state.opt_state
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        if ema_decay is None:
            beta = ema_beta(nimg, global_batch, ema_halflife_img, ema_rampup_ratio)
        else:
            beta = jnp.float32(ema_decay)
        ema = jax.tree.map(lambda e, p: p + beta * (e - p), state.ema, params)

        new_state = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
        metrics = {"loss": total / images.size, "lr": lr, "ema_beta": beta,
                   "nonfinite_grads": nonfinite.astype(jnp.float32)}
        return new_state, metrics

    return train_step


def compile_train_step(train_step: Callable, mesh: Mesh, compiler_options: Optional[Mapping] = None) -> Callable:
    """`jax.jit` the step for `mesh`: state and key replicated, batch sharded along 'data', state donated.

    `compiler_options` go to XLA unchanged (the tests pass {'xla_backend_optimization_level': 0}, which
    compiles about 3x faster on CPU).
    """
    rep = replicated(mesh)
    return jax.jit(train_step, in_shardings=(rep, NamedSharding(mesh, P("data")), rep),
                   out_shardings=(rep, rep), donate_argnums=(0,),
                   compiler_options=None if compiler_options is None else dict(compiler_options))


# ---------------------------------------------------------------------------------------------------
# The training loop (training_loop.py): everything below reads the config; the pieces above never do.

log = logging.getLogger(__name__)
_PACKAGE_LOG = logging.getLogger("edm_jax")  # where a run's log.txt collects every module's lines



def _require(config, *names):
    for name in names:
        if name not in config:
            raise ValueError(f"the config has no '{name}' section; start from configs/quickstart.py or "
                             f"configs/cifar10_edm.py, which define data, model, process, augment, train "
                             f"and sample")


class _Logs:
    """log.txt (every `edm_jax` logger's lines, INFO and above, while the run lasts), metrics.jsonl and
    TensorBoard event files in tensorboard/ (edm_jax.tensorboard; the metrics records as scalars), written by
    process 0 only. The console is not the library's: main.py attaches its handler to the `edm_jax` logger;
    a Python caller sees the same lines with `logging.basicConfig(level=logging.INFO)`."""

    def __init__(self, workdir: str, active: bool):
        self.active = active
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")  # events files, made on the first record
        self._tensorboard = None
        self._purge_step = None  # first step a resumed run logs: TensorBoard drops the dead run's points from it on
        self._file = None
        self._level = None  # the package logger's own level to restore, when the run lowered it
        if active:
            self._file = logging.FileHandler(os.path.join(workdir, "log.txt"))
            self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            _PACKAGE_LOG.addHandler(self._file)
            # log.txt is the run's record whoever configured logging: with nothing configured the package
            # logger inherits the root's WARNING, which would keep the progress lines out of it. Lowered on
            # the package logger alone and for the run only (close() restores it); no handler is added.
            if _PACKAGE_LOG.getEffectiveLevel() > logging.INFO:
                self._level = _PACKAGE_LOG.level
                _PACKAGE_LOG.setLevel(logging.INFO)

    def truncate_metrics(self, after_step: int):
        """Drop records past `after_step` (written by a run that died before its next checkpoint), in
        metrics.jsonl here and in TensorBoard's view (the next events file purges them)."""
        self._purge_step = after_step + 1
        if not self.active or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        with open(self.metrics_path, "w") as f:
            f.writelines(keep)

    def metrics(self, record: Mapping[str, Any]):
        if self.active:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            # The same numbers as TensorBoard scalars at the record's step (its "time" as the wall time).
            scalars = {k: v for k, v in record.items() if k not in ("step", "time")
                       and isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))}
            if "step" in record and scalars:
                if self._tensorboard is None:
                    from edm_jax.tensorboard import SummaryWriter
                    self._tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step)
                self._tensorboard.scalars(scalars, int(record["step"]), wall_time=record.get("time"))

    def fatal(self, message: str):
        """Write the run's fatal sentence to log.txt only (main.py prints it, as the last line on screen)."""
        if self._file is not None:
            self._file.emit(logging.LogRecord("edm_jax", logging.ERROR, "", 0, message, None, None))

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._file is not None:
            _PACKAGE_LOG.removeHandler(self._file)
            self._file.close()
            self._file = None
        if self._level is not None:
            _PACKAGE_LOG.setLevel(self._level)
            self._level = None


def _memory_text() -> str:
    """Peak device memory where the backend reports it (GPU/TPU), else the host's peak RSS."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        pass
    if stats and "peak_bytes_in_use" in stats:
        return f"devmem {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
    try:
        import resource

        return f"hostmem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    except Exception:  # noqa: BLE001
        return "mem n/a"


def make_grid_sampler(module, process, *, mesh: Mesh, shape, label_dim: int, num_images: int, seed: int,
                      settings=None):
    """A function EMA variables -> uint8 images [num_images, H, W, C] for the snapshot grids.

    `--mode=sample`'s sample function (`generate.make_sample_fn`) over seeds 0 .. num_images−1 with
    base_seed `seed`: grid cell s is the image `--mode=sample --seeds=s --base_seed=seed` gives for the same
    snapshot (start state, class and sampler noise from the seed's key), and successive snapshots show the
    same seeds as training progresses. `settings`: the process's sampler settings (default
    `process.sampler_settings()`; σ family: Heun, Algorithm 1, σ range clamped).
    """
    from edm_jax import generate

    sample_fn = generate.make_sample_fn(generate.BoundDenoiser(process.model(module.apply), None),
                                        image_shape=tuple(shape), label_dim=label_dim,
                                        settings=process.sampler_settings() if settings is None else settings,
                                        mesh=mesh, process=process)
    # The batch must split over the mesh: pad with the last seed, as generate() does, and drop the copies.
    padded = -(-num_images // sample_fn.data_size) * sample_fn.data_size
    seeds = [min(i, num_images - 1) for i in range(padded)]
    keys = sample_fn.keys_for(seeds, seed)

    def grid(variables):
        images = sample_fn(keys, variables)[0]
        if jax.process_count() > 1:  # each host holds only its rows
            from jax.experimental import multihost_utils
            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(images)[:num_images]

    return grid


save_image_grid = generate_lib.save_grid  # the one grid writer: snapshots look like --mode=sample's grid.png


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the shared loop (`run_loop`) ticks and snapshots, in steps (training_loop.py's kimg_per_tick,
    snapshot_ticks, state_dump_ticks). A tick (one log line, one metrics.jsonl record) follows the first
    step, every `steps_per_tick` steps and the last; a snapshot (checkpoint + the objective's outputs)
    follows the first step, every `snapshot_every` steps and the last. Multiples of absolute steps, so a
    resumed run ticks and snapshots where an uninterrupted one does."""

    total_steps: int
    steps_per_tick: int
    snapshot_every: int
    global_batch: int
    seed: int
    max_to_keep: int = 3
    keep_period: Optional[int] = None  # checkpoints at multiples of this many steps are kept forever
    async_save: bool = True
    progress_sec: float = 30.0
    batch_per_device: Optional[int] = None  # examples per device and round (the out-of-memory advice)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What one kind of training run puts on the shared loop: the diffusion model (`train_and_evaluate`)
    and the noise-aware classifier (`classifier_train.train_classifier`) differ only in these.

    The loop owns the rest: the workdir lock, log.txt / metrics.jsonl / TensorBoard, the resume policy
    (newest intact checkpoint; batch size must match; the checkpoint's seed wins), the step key
    fold_in(key(seed), 1) and init key fold_in(key(seed), 0), ticks, snapshots, graceful stops.
    """

    init: Callable            # key -> a fresh, replicated state (a new run only)
    abstract: Any             # the state's ShapeDtypeStructs with shardings: what a checkpoint restores into
    make_step: Callable       # () -> compiled step(state, sharded batch, key) -> (state, metrics)
    batches: Callable         # (seed, start_step) -> iterator of host batches, with close()
    summarize: Callable       # the tick's metrics (host values, one dict per step) -> record fields
    tick_text: Callable       # a tick record -> its log line after the progress text
    write_config: Callable = lambda: None  # the run's config file(s); only once a resume is validated
    snapshot: Optional[Callable] = None    # (state, step, first) -> text of what it wrote beside the checkpoint
    finish: Callable = lambda state, trained: state  # (final state, whether steps ran) -> the run's result
    checkpoint_meta: Mapping = dataclasses.field(default_factory=dict)  # extra metadata of every checkpoint
    restore_hint: Callable = lambda: ""    # appended to a checkpoint error (what changed in the config)
    done_text: str = ""                    # appended to the final log line


def _step_of(state) -> int:
    return int(jax.device_get(state["step"] if isinstance(state, Mapping) else state.step))


def _params_of(state):
    return state["params"] if isinstance(state, Mapping) else state.params


def run_loop(workdir: str, setup: Callable, *, matmul_precision=None, compilation_cache_dir=None):
    """The one training skeleton: `setup(mesh) -> (Objective, Schedule)` inside the run's lock and logs,
    then resume, the loop, ticks, snapshots; returns `objective.finish(state, trained)` (the state if
    stopped by a signal). Progress goes to the `edm_jax` loggers and the run's log.txt (`_Logs`)."""
    from edm_jax import data as data_lib
    from edm_jax import progress as progress_lib
    from edm_jax.checkpoint import CheckpointError
    from edm_jax.interrupts import GracefulStop

    t_start = time.time()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    from edm_jax.interop.runlock import WorkdirLock
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None  # before anything is written
    try:
        logs = _Logs(workdir, active=jax.process_index() == 0)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if compilation_cache_dir:  # the config's folder (train.compilation_cache_dir) moves the cache main.py enabled
        from edm_jax import compile_cache

        compile_cache.enable(os.path.expanduser(compilation_cache_dir))
    ckpt = stream = None
    step_batch = None  # examples per device and round, once the train step runs (for the out-of-memory advice)
    stop = GracefulStop()
    try:
        with stop, jax.default_matmul_precision(matmul_precision):
            mesh = make_mesh()
            objective, plan = setup(mesh)
            ckpt, state, seed = _resume(objective, plan, workdir, logs)
            objective.write_config()
            start_step = _step_of(state)
            logs.truncate_metrics(start_step)
            if start_step >= plan.total_steps:
                log.info("nothing to do: the newest checkpoint is at step %d of %d", start_step, plan.total_steps)
                return objective.finish(state, False)
            step_fn = objective.make_step()
            train_key = jax.random.fold_in(jax.random.key(seed), 1)
            global_batch, total_steps, steps_per_tick = plan.global_batch, plan.total_steps, plan.steps_per_tick

            def snapshot(state, step):
                """Checkpoint (async) and the objective's outputs; returns the seconds spent (maintenance)."""
                t0 = time.time()
                nimg = step * global_batch
                saved = ckpt.save(step, state, {"step": step, "nimg": nimg, "kimg": nimg / 1000,
                                                **objective.checkpoint_meta, "global_batch": global_batch,
                                                "seed": seed, "time": time.time()})
                extra = objective.snapshot(state, step, step == first) if objective.snapshot else ""
                log.info("snapshot at step %d: checkpoint %s%s%s", step, os.path.join(ckpt.directory, str(step)),
                         "" if saved else " (already there)", extra)
                return time.time() - t0

            # ---- The loop (training_loop.py's while True), with one host sync per tick.
            stream = objective.batches(seed, start_step)
            log.info("training from step %d to %d", start_step, total_steps)
            step_batch = plan.batch_per_device
            step, pending, last, first = start_step, [], {}, start_step + 1
            tick_start_step, tick_start_time, maintenance = step, time.time(), 0.0
            progress = progress_lib.Progress(start_step, total_steps, plan.progress_sec)
            log.info("compiling the train step (the first step includes it)...")
            while step < total_steps:
                state, metrics = step_fn(state, shard_batch(next(stream), mesh), train_key)
                pending.append(metrics)
                step += 1
                done = step >= total_steps
                at_tick = step == 1 or step % steps_per_tick == 0 or done
                if step == first:
                    jax.block_until_ready(metrics)
                    log.info("first step done (compiled) in %s", progress_lib.hms(time.time() - tick_start_time))
                    progress.begin(step)
                if stop.requested(step, at_tick):
                    maintenance = snapshot(state, step)
                    ckpt.wait()
                    log.warning("stopped by %s at %s: checkpoint %s saved; rerun the same command to resume",
                                stop.signal_name, progress.text(step), os.path.join(ckpt.directory, str(step)))
                    return state
                if not at_tick:
                    if progress.due():
                        loss = float(jax.device_get(metrics["loss"]))
                        log.info("%s loss %.4f", progress.text(step), loss)
                    continue
                pending = jax.device_get(pending)
                dt = time.time() - tick_start_time
                n = (step - tick_start_step) * global_batch
                last = {"step": step, "tick": step // steps_per_tick, "kimg": step * global_batch / 1000,
                        **objective.summarize(pending),
                        "sec_per_tick": dt, "sec_per_kimg": dt / (n / 1000), "img_per_sec": n / dt,
                        "maintenance_sec": maintenance, "time": time.time()}
                logs.metrics(last)
                progress.ticked()
                log.info("%s %s", progress.text(step), objective.tick_text(last))
                pending, maintenance = [], 0.0
                if step == 1 or step % plan.snapshot_every == 0 or done:
                    maintenance = snapshot(state, step)
                tick_start_step, tick_start_time = step, time.time()
            ckpt.wait()
            log.info("done: step %d, %.1f kimg; this process ran steps %d-%d in %s; last tick's loss %.4f; "
                     "checkpoints in %s%s", step, step * global_batch / 1000, start_step, step,
                     _hms(time.time() - t_start), last.get("loss", float("nan")), ckpt.directory, objective.done_text)
            return objective.finish(state, True)
    except (ValueError, OSError, CheckpointError, data_lib.DatasetUnavailableError) as e:
        logs.fatal(f"error: {e}")  # the same sentence main.py prints last, in log.txt too
        raise
    except jax.errors.JaxRuntimeError as e:
        message = out_of_memory_message(e, step_batch)
        if message is None:
            raise
        logs.fatal(f"error: {message}")
        raise ValueError(message) from None
    finally:
        if lock is not None:
            lock.release()
        if stream is not None:
            stream.close()
        if ckpt is not None:
            ckpt.close()
        logs.close()


# Fields a run may change on resume (fine-tuning does) but never silently: another dataset or optimisation.
RESUME_WATCHED = ("data.", "train.lr", "train.adam_", "train.ema_", "train.loss_scaling")


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """{'a.b': value} of a nested dict."""
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(old: Mapping, new: Mapping) -> list[str]:
    """"data.path 'a.zip' -> 'b.zip'"-style changes of the `RESUME_WATCHED` fields between the checkpoint's
    resolved config `old` and this run's `new` (plain dicts); none when `old` is empty (older checkpoints)."""
    if not old:
        return []
    a, b = _flatten(old), _flatten(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k.startswith(RESUME_WATCHED) and a.get(k) != b.get(k)]


def _resume(objective: Objective, plan: Schedule, workdir: str, logs):
    """(checkpointer, state, seed): the newest loadable checkpoint, or a fresh initialisation."""
    from edm_jax.checkpoint import CheckpointError, Checkpointer

    seed = plan.seed
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=plan.max_to_keep,
                        keep_period=plan.keep_period, async_save=plan.async_save)
    try:
        restored = ckpt.restore_latest(objective.abstract, move_damaged=logs.active)
    except CheckpointError as e:
        ckpt.close()
        raise CheckpointError(f"{e}{objective.restore_hint()}") from None
    except BaseException:
        ckpt.close()
        raise
    if restored is None:
        state = objective.init(jax.random.fold_in(jax.random.key(seed), 0))
        log.info("new run: %s parameters", f"{sum(x.size for x in jax.tree.leaves(_params_of(state))):,}")
        return ckpt, state, seed
    state, meta = restored
    if int(meta["global_batch"]) != plan.global_batch:
        ckpt.close()
        raise ValueError(f"the checkpoint at step {meta['step']} in {ckpt.directory} was trained with "
                         f"train.batch_size={meta['global_batch']}, this config says {plan.global_batch}; "
                         f"set train.batch_size={meta['global_batch']} or use a new --workdir")
    if int(meta["seed"]) != seed:
        log.warning("train.seed=%d differs from the checkpoint's seed %d; continuing with %d so that "
                    "the run stays reproducible", seed, meta["seed"], meta["seed"])
        seed = int(meta["seed"])
    log.info("resumed from %s/%d: step %d, %.1f kimg", ckpt.directory, meta["step"], meta["step"],
             meta["nimg"] / 1000)
    changed = resume_changes(meta.get("config") or {}, objective.checkpoint_meta.get("config") or {})
    if changed:
        log.warning("resuming step %d with %s; the checkpoint was trained with the old value(s)",
                    meta["step"], ", ".join(changed))
    return ckpt, state, seed


def train_and_evaluate(config, workdir: str):
    """Train as the config says, in `workdir`, resuming from its newest checkpoint if there is one.

    config: an ml_collections ConfigDict with sections data, model, process (older run directories: precond +
      loss), augment, train, sample (configs/cifar10_edm.py lists every field). workdir: the run directory; it receives checkpoints/
      (orbax: train state incl. EMA and Adam, step = data position, seed), config.json (the resolved
      config), log.txt, metrics.jsonl (one record per tick) and samples/ (a PNG grid of EMA samples per
      snapshot). Returns the final TrainState.

    Ticks and snapshots follow training_loop.py: a tick is `train.tick_kimg` of images (the first tick ends
    after the first step); a snapshot (checkpoint + sample grid) every `train.snapshot_ticks` ticks, after
    the first step, and at the end; checkpoints at multiples of `train.state_dump_ticks` ticks are kept
    forever, the others only while among the newest `train.max_to_keep`. Tick boundaries are multiples of
    the steps per tick (not restarted on resume), so a resumed run snapshots where an uninterrupted one does.
    """
    maybe_initialize_distributed()
    _require(config, "data", "model", "augment", "train", "sample")
    tc = config.train
    return run_loop(workdir, lambda mesh: _diffusion_objective(config, os.path.abspath(os.path.expanduser(workdir)),
                                                               mesh),
                    matmul_precision=tc.get("matmul_precision") or None,
                    compilation_cache_dir=tc.get("compilation_cache_dir"))


def _diffusion_objective(config, workdir: str, mesh: Mesh):
    """(Objective, Schedule) of the diffusion model: data, process, network, optimizer, train step, grids."""
    from edm_jax import data as data_lib
    from edm_jax import progress as progress_lib
    from edm_jax.interop.rundir import process_from_config

    tc, sc = config.train, config.sample
    # ---- Devices and the batch split (training_loop.py: batch_gpu, num_accumulation_rounds).
    global_batch = int(tc.batch_size)
    per_device, rounds = plan_batch(global_batch, mesh.size, tc.get("batch_per_device"))
    total_steps = int(math.ceil(float(tc.total_kimg) * 1000 / global_batch))
    steps_per_tick = max(1, int(math.ceil(float(tc.tick_kimg) * 1000 / global_batch)))
    snapshot_every = steps_per_tick * max(1, int(tc.snapshot_ticks))
    dump_ticks = int(tc.get("state_dump_ticks") or 0)
    if dump_ticks % max(1, int(tc.snapshot_ticks)):
        raise ValueError(f"train.state_dump_ticks={dump_ticks} is not a multiple of train.snapshot_ticks="
                         f"{tc.snapshot_ticks}, so no checkpoint would be kept; make it a multiple (or 0)")

    # ---- Data (train.py's dataset_kwargs); label_dim 0 when unconditional.
    data_kwargs = _as_dict(config.data)
    xflip = bool(data_kwargs.pop("xflip", False))
    # Image files: each process decodes only the images its rows of the run's batches read (from step 0,
    # since the step resumed from is known only after the network is built from the data's shape).
    only = functools.partial(data_lib.host_indices, stop_step=total_steps, global_batch=global_batch,
                             seed=int(tc.seed), process_index=jax.process_index(), process_count=jax.process_count())
    dataset = data_lib.load_dataset(**data_kwargs, only=only)
    label_dim = dataset.label_dim if config.data.get("use_labels", True) else 0
    shape = (dataset.resolution, dataset.resolution, dataset.channels)
    log.info("data: %r, %d images of %s, label_dim %d", dataset.name, len(dataset), "x".join(map(str, shape)),
             label_dim)
    if dataset.decoded is not None:  # every process says it on its console (log.txt is process 0's)
        log.info("data: process %d of %d decoded %d of %d images (those its batches read)", jax.process_index(),
                 jax.process_count(), int(dataset.decoded.sum()), len(dataset))

    # ---- Process (preconditioning + loss), network, augmentation (train.py's network/loss/augment kwargs).
    augment = _as_dict(config.augment)
    augment_p = float(augment.pop("p", 0.0))
    unknown = sorted(set(augment) - set(_SAMPLE_AUGMENT_KEYS) - set(_APPLY_AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"the augment section has unknown field(s) {unknown}; valid: p, "
                         f"{', '.join(_SAMPLE_AUGMENT_KEYS + _APPLY_AUGMENT_KEYS)}")
    augment_dim = AUGMENT_DIM if augment_p > 0 else 0
    process = process_from_config(config)
    in_channels, out_channels = process.network_channels(shape[2])
    module = build_network(_as_dict(config.model), resolution=shape[0], channels=in_channels,
                           label_dim=label_dim, augment_dim=augment_dim, out_channels=out_channels)
    tx = make_optimizer(tc.lr, tc.adam_b1, tc.adam_b2, tc.adam_eps, tc.get("grad_clip_norm"))
    log.info("devices: %d x %s in %d process(es); global batch %d = %d per device x %d round(s); %d steps "
             "(%.1f kimg), %d per tick, snapshot every %d", mesh.size, jax.devices()[0].device_kind,
             jax.process_count(), global_batch, per_device, rounds, total_steps,
             total_steps * global_batch / 1000, steps_per_tick, snapshot_every)

    # ---- State: what a checkpoint restores into, or a fresh initialisation.
    # XLA:CPU spends minutes optimising the initialisers' random draws, which run once: skip that there.
    cpu_init = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    net_shape = (*shape[:2], in_channels)  # the network's input: the process's state, not always the image
    init = lambda key, options=None: create_train_state(key, module, net_shape, label_dim, augment_dim, tx,
                                                        mesh, compiler_options=options)
    rep = replicated(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(init, jax.random.key(int(tc.seed))))
    resolved = json.loads(config.to_json_best_effort())
    samples_dir = os.path.join(workdir, "samples")

    def write_config():
        """Validated: only now the workdir's config.json may change (a refused rerun leaves it as it was)."""
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(json.dumps(resolved, indent=2, sort_keys=True) + "\n")

    # ---- The compiled step and the snapshot sampler.
    def make_step():
        os.makedirs(samples_dir, exist_ok=True)
        return compile_train_step(make_train_step(
            apply_fn=module.apply, process=process, tx=tx, global_batch=global_batch,
            num_rounds=rounds, base_lr=tc.lr, lr_rampup_img=tc.lr_rampup_kimg * 1000,
            ema_halflife_img=tc.ema_halflife_kimg * 1000, ema_rampup_ratio=tc.ema_rampup_ratio,
            ema_decay=tc.get("ema_decay"), loss_scaling=tc.loss_scaling, augment_p=augment_p,
            augment_kwargs=augment, mesh=mesh), mesh)

    grids = []  # the snapshot sampler, built with the first snapshot (a finished run needs none)

    def snapshot(state, step, first):
        path = "none (sample.num_images is 0)"
        if int(sc.num_images) > 0:
            if not grids:
                # The sample section's sampler fields, as the process's overrides (one path, as --mode=sample).
                overrides = {k: v for k, v in _as_dict(sc).items() if k not in ("num_images", "seed")}
                grids.append(make_grid_sampler(module, process, mesh=mesh, shape=shape, label_dim=label_dim,
                                               num_images=int(sc.num_images), seed=int(sc.seed),
                                               settings=process.sampler_settings(**overrides)))
            with progress_lib.phase(f"sampling the snapshot grid ({int(sc.num_images)} images, "
                                    f"{int(sc.num_steps)} steps{'; compiles first' if first else ''})"):
                images = grids[0](state.variables(ema=True))
            path = os.path.join(samples_dir, f"samples-{step * global_batch // 1000:06d}kimg-step{step:07d}.png")
            if jax.process_index() == 0:
                save_image_grid(images, path)
        return f", samples {path}"

    def summarize(pending):
        return {"loss": float(np.mean([m["loss"] for m in pending])), "lr": float(pending[-1]["lr"]),
                "ema_beta": float(pending[-1]["ema_beta"]),
                "nonfinite_grads": float(np.sum([m["nonfinite_grads"] for m in pending]))}

    def tick_text(r):
        return (f"tick {r['tick']:<5d} kimg {r['kimg']:<9.1f} loss {r['loss']:<8.4f} lr {r['lr']:.2e} ema_beta "
                f"{r['ema_beta']:.6f} sec/tick {r['sec_per_tick']:<7.1f} sec/kimg {r['sec_per_kimg']:<7.3f} img/s "
                f"{r['img_per_sec']:<7.1f} maint {r['maintenance_sec']:<5.1f} {_memory_text()}"
                + (f" nonfinite_grads {r['nonfinite_grads']:.0f}" if r["nonfinite_grads"] else ""))

    def batches(seed, start_step):
        data = dataset
        if seed != int(tc.seed) and dataset.decoded is not None:  # resumed with the checkpoint's seed: the
            data = data_lib.load_dataset(**data_kwargs, only=functools.partial(only, seed=seed))  # stream's images
        return data_lib.batches(data, global_batch=global_batch, seed=seed, start_step=start_step,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                xflip=xflip, use_labels=label_dim > 0)

    objective = Objective(init=lambda key: init(key, cpu_init), abstract=abstract, make_step=make_step,
                          batches=batches, summarize=summarize, tick_text=tick_text, write_config=write_config,
                          snapshot=snapshot, checkpoint_meta={"config": resolved},
                          restore_hint=lambda: _config_changes(workdir, config),
                          done_text=f"; sample grids in {samples_dir}")
    schedule = Schedule(total_steps=total_steps, steps_per_tick=steps_per_tick, snapshot_every=snapshot_every,
                        global_batch=global_batch, seed=int(tc.seed), max_to_keep=tc.get("max_to_keep", 3),
                        keep_period=snapshot_every * dump_ticks // max(1, int(tc.snapshot_ticks)) or None,
                        async_save=tc.get("async_checkpointing", True),
                        progress_sec=float(tc.get("progress_sec", 30.0)), batch_per_device=per_device)
    return objective, schedule


def _config_changes(workdir: str, config) -> str:
    """'; changed: model.model_channels 16 -> 32' against the workdir's config.json (the last validated one)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return ""
    new = json.loads(config.to_json_best_effort())
    sections = ("model", "process", "precond", "data", "augment")
    a, b = _flatten({k: old.get(k, {}) for k in sections}), _flatten({k: new.get(k, {}) for k in sections})
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f" This config changed {', '.join(changed[:5])} since they were written." if changed else ""


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"
