"""Train a noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021) on EDM's noise levels.

The classifier is `EncoderUNet` (networks/classifier.py). It is trained with `guidance.classifier_loss`:
σ drawn as ln σ ~ N(P_mean, P_std²), the noisy image x₀ + σ n fed as c_in(σ) · x and c_noise(σ) of EDM's
preconditioning — exactly the inputs `guidance.classifier_log_prob` gives it at sampling time.

`train_classifier(config, workdir)` writes into workdir:
  checkpoints/<step>/      orbax: state = {step, params, opt_state}; rerunning resumes from the newest;
  classifier_config.json   the EncoderUNet kwargs and the preconditioning, so `load_classifier` rebuilds it;
  accuracy.json            top-1 accuracy and mean cross-entropy per σ on held-out images.

Randomness: the step key is fold_in(key(seed), step) and example i of the global batch gets
fold_in(step_key, i), so results do not depend on the device count; the data order is `data.batches`'.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from edm_jax.diffusion.guidance import classifier_loss
from edm_jax.diffusion.precond import EDMPrecond, make_precond
from edm_jax.distributed import replicated
from edm_jax.interop.rundir import CLASSIFIER_CONFIG, as_dict as _as_dict, classifier_network
from edm_jax.train import (Objective, Schedule, learning_rate, make_optimizer, maybe_initialize_distributed,
                           plan_batch, run_loop)

__all__ = ["train_classifier", "load_classifier", "accuracy_per_sigma", "make_classifier_step",
           "abstract_state", "CLASSIFIER_CONFIG", "ACCURACY_FILE"]

ACCURACY_FILE = "accuracy.json"
log = logging.getLogger(__name__)
_NET_KEYS = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
             "channels_per_head", "dtype")


def _json_ready(value):
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# The train step.

def make_classifier_step(*, apply_fn: Callable, tx, precond, P_mean: float, P_std: float, global_batch: int,
                         base_lr: float, lr_rampup_img: float, dropout: bool = False):
    """Pure step(state, batch, key) -> (state, metrics); state = dict(step, params, opt_state).

    Loss: mean over the global batch of `classifier_loss` (per-example CE). Example i's σ and noise come
    from fold_in(fold_in(key, step), i), i the global example index. With `dropout`, the network runs in
    train mode with one dropout key per step (fold_in(step_key, global_batch), distinct from the examples').
    The learning rate is `train.learning_rate` (linear ramp-up), injected into the Adam state.
    """

    def step_fn(state, batch, key):
        images = jnp.asarray(batch["images"], jnp.float32)
        labels = jnp.asarray(batch["labels"], jnp.float32)
        if images.shape[0] != global_batch:
            raise ValueError(f"batch has {images.shape[0]} images but the step was built for {global_batch}")
        step_key = jax.random.fold_in(key, state["step"])
        index = jnp.arange(global_batch, dtype=jnp.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)
        dropout_key = jax.random.fold_in(step_key, global_batch) if dropout else None

        def objective(params):
            ce = classifier_loss(apply_fn, {"params": params}, images, labels, keys, P_mean=P_mean, P_std=P_std,
                                 precond=precond, train=dropout, dropout_key=dropout_key)
            return jnp.mean(ce)

        loss, grads = jax.value_and_grad(objective)(state["params"])
        lr = learning_rate(state["step"].astype(jnp.float32) * global_batch, base_lr, lr_rampup_img)
        opt_state = state["opt_state"]
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
        updates, opt_state = tx.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "lr": lr}

    return step_fn


# ---------------------------------------------------------------------------------------------------
# Evaluation.

def accuracy_per_sigma(apply_fn: Callable, variables: Any, images, labels, sigmas: Sequence[float], key,
                       precond=None, batch: int = 512):
    """Top-1 accuracy and mean cross-entropy of a noise-aware classifier at each fixed σ.

    images: [N, H, W, C] clean, float in [-1, 1]; labels: one-hot [N, K]. For σ_j (j-th of `sigmas`) image i
    is noised with n ~ N(0, I) from fold_in(fold_in(key, j), i) and fed as c_in(σ) · (x₀ + σ n), c_noise(σ)
    of `precond` (default EDMPrecond()). Returns a list of dicts {sigma, accuracy, cross_entropy} in the
    order of `sigmas`. `apply_fn(variables, x_in, noise_labels) -> logits [N, K]`.
    """
    precond = EDMPrecond() if precond is None else precond
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.float32)
    n = images.shape[0]
    target = labels.argmax(-1)

    @jax.jit
    def chunk(variables, x0, y, idx, sigma, sigma_key):
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(sigma_key, i), x0.shape[1:]))(idx)
        s = jnp.full((x0.shape[0],), sigma, jnp.float32)
        _, _, c_in, c_noise = precond.coefficients(s)
        logits = jnp.asarray(apply_fn(variables, c_in[:, None, None, None] * (x0 + sigma * noise), c_noise),
                             jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.argmax(logits, -1), -jnp.sum(y * logp, axis=-1)

    rows = []
    for j, sigma in enumerate(sigmas):
        sigma_key = jax.random.fold_in(key, j)
        preds, ces = [], []
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            pred, ce = chunk(variables, images[start:stop], labels[start:stop],
                             jnp.arange(start, stop, dtype=jnp.uint32), jnp.float32(sigma), sigma_key)
            preds.append(np.asarray(pred))
            ces.append(np.asarray(ce))
        pred, ce = np.concatenate(preds), np.concatenate(ces)
        rows.append({"sigma": float(sigma), "accuracy": float(np.mean(pred == target)),
                     "cross_entropy": float(np.mean(ce))})
    return rows


def format_accuracy_table(rows) -> str:
    lines = [f"{'sigma':>8}  {'accuracy':>8}  {'CE':>7}"]
    lines += [f"{r['sigma']:>8.3g}  {r['accuracy']:>8.4f}  {r['cross_entropy']:>7.4f}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Build / load.

def _network_kwargs(model: Mapping, *, resolution: int, channels: int, num_classes: int) -> dict:
    model = dict(model)
    name = model.pop("name", "EncoderUNet")
    if name != "EncoderUNet":
        raise ValueError(f"classifier.name={name!r}: only 'EncoderUNet' is supported")
    unknown = sorted(set(model) - set(_NET_KEYS))
    if unknown:
        raise ValueError(f"the classifier section has unknown field(s) {unknown}; valid: name, {', '.join(_NET_KEYS)}")
    kwargs = dict(img_resolution=int(resolution), in_channels=int(channels), num_classes=int(num_classes))
    for k, v in model.items():
        kwargs[k] = list(v) if isinstance(v, (tuple, list)) else v
    return kwargs


def abstract_state(module, tx, shape, sharding):
    """(init(key) -> train state, its ShapeDtypeStructs placed with `sharding`): the state {step, params,
    opt_state} a classifier checkpoint holds, for images of `shape` (H, W, C) and optimizer `tx`."""
    def init(key):
        x = jnp.zeros((1, *shape), jnp.float32)
        params = module.init({"params": key}, x, jnp.zeros((1,), jnp.float32))["params"]
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            jax.eval_shape(init, jax.random.key(0)))
    return init, abstract


def load_classifier(workdir: str):
    """(module, variables, precond) of the newest checkpoint of a `train_classifier` run in `workdir`
    (`edm_jax.interop.rundir.load_classifier`, the reader of that layout).

    `module.apply(variables, x_in, noise_labels)` gives logits; pass `module.apply, variables, precond` to
    `guidance.classifier_log_prob`.
    """
    from edm_jax.interop import rundir

    return rundir.load_classifier(workdir)


# ---------------------------------------------------------------------------------------------------
# The objective on the shared training loop (train.run_loop).

def _eval_set(config, dataset, data_lib):
    """Held-out (images float32 [-1, 1], one-hot labels) and the training dataset (possibly shrunk)."""
    ec = config.eval
    n = int(ec.num_images)
    dc = config.data
    if dc.source == "synthetic":
        kwargs = _as_dict(dc.synthetic)
        kwargs.update(n=n, seed=int(ec.seed))
        held = data_lib.synthetic_dataset(**kwargs)
        train_set = dataset
    else:
        if n >= len(dataset):
            raise ValueError(f"eval.num_images={n} leaves no training images of the {len(dataset)}")
        held = data_lib.ImageDataset(images=dataset.images[-n:], labels=dataset.labels[-n:],
                                     label_dim=dataset.label_dim, name=dataset.name + "-heldout")
        train_set = data_lib.ImageDataset(images=dataset.images[:-n], labels=dataset.labels[:-n],
                                          label_dim=dataset.label_dim, name=dataset.name)
    images = held.images.astype(np.float32) / 127.5 - 1.0
    labels = np.eye(dataset.label_dim, dtype=np.float32)[held.labels]
    return images, labels, train_set


def train_classifier(config, workdir: str):
    """Train the config's classifier in `workdir`, resuming from its newest checkpoint; returns the
    accuracy rows (see `accuracy_per_sigma`).

    config sections: data (as train.py's), classifier (EncoderUNet kwargs), noise (P_mean, P_std), train
    (batch_size, lr, lr_rampup_kimg, adam_b1/b2/eps, total_steps, log_every, checkpoint_every (a multiple of
    log_every), max_to_keep, seed, optional compiler_options for XLA), eval (sigmas, num_images, seed, batch).
    The loop is the diffusion model's (`train.run_loop`): the same resume policy, ticks (every log_every
    steps), log.txt / metrics.jsonl and checkpoints (every checkpoint_every steps). Progress goes to the
    `edm_jax` loggers: main.py shows it; from Python, `logging.basicConfig(level=logging.INFO)`.
    """
    maybe_initialize_distributed()
    for name in ("data", "classifier", "noise", "train", "eval"):
        if name not in config:
            raise ValueError(f"the classifier config has no '{name}' section")
    tc = config.train
    if int(tc.total_steps) < 1:  # checked before anything is written: no accuracy table of random weights
        raise ValueError(f"train.total_steps={tc.total_steps} trains nothing, and the accuracy table of an untrained "
                         "classifier would mislead; set train.total_steps >= 1")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    return run_loop(workdir, lambda mesh: _classifier_objective(config, workdir, mesh))


def _classifier_objective(config, workdir: str, mesh):
    """(Objective, Schedule) of the noise-aware classifier: data, EncoderUNet, Adam, the step, the table."""
    from edm_jax import data as data_lib

    tc = config.train
    data_kwargs = _as_dict(config.data)
    data_kwargs.pop("xflip", None)
    data_kwargs["use_labels"] = True
    dataset = data_lib.load_dataset(**data_kwargs)
    if not dataset.label_dim:
        raise ValueError(f"dataset {dataset.name!r} has no class labels; a classifier needs labelled data")
    eval_images, eval_labels, dataset = _eval_set(config, dataset, data_lib)
    shape = (dataset.resolution, dataset.resolution, dataset.channels)
    log.info("data: %r, %d training images of %s, %d classes", dataset.name, len(dataset),
             "x".join(map(str, shape)), dataset.label_dim)

    net_kwargs = _network_kwargs(_as_dict(config.classifier), resolution=shape[0], channels=shape[2],
                                 num_classes=dataset.label_dim)
    module = classifier_network(net_kwargs)
    precond_meta = {"kind": "edm", "kwargs": {"sigma_data": 0.5}}
    precond = make_precond(precond_meta["kind"], **precond_meta["kwargs"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CLASSIFIER_CONFIG), "w") as f:
            json.dump({"network": {k: _json_ready(v) for k, v in net_kwargs.items()}, "precond": precond_meta,
                       "noise": _as_dict(config.noise), "label_dim": int(dataset.label_dim)}, f, indent=2)
            f.write("\n")

    global_batch = int(tc.batch_size)
    plan_batch(global_batch, mesh.size)  # divisibility check
    total_steps = int(tc.total_steps)
    log_every, ckpt_every = max(1, int(tc.log_every)), max(1, int(tc.checkpoint_every))
    if ckpt_every % log_every:
        raise ValueError(f"train.checkpoint_every={ckpt_every} is not a multiple of train.log_every={log_every} "
                         "(checkpoints are written at ticks); make it a multiple")
    tx = make_optimizer(tc.lr, tc.adam_b1, tc.adam_b2, tc.adam_eps)
    rep = replicated(mesh)
    init, abstract = abstract_state(module, tx, shape, rep)
    options = _as_dict(tc.get("compiler_options")) or None  # e.g. {'xla_backend_optimization_level': 0}
    # XLA:CPU spends long optimising the initialisers' random draws, which run once (as train.py): skip that.
    init_options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else options
    acc_path = os.path.join(workdir, ACCURACY_FILE)

    def make_step():
        log.info("training the classifier to step %d, batch %d on %d device(s)", total_steps, global_batch,
                 mesh.size)
        return jax.jit(make_classifier_step(
            apply_fn=module.apply, tx=tx, precond=precond, P_mean=float(config.noise.P_mean),
            P_std=float(config.noise.P_std), global_batch=global_batch, base_lr=float(tc.lr),
            lr_rampup_img=float(tc.lr_rampup_kimg) * 1000, dropout=float(net_kwargs.get("dropout", 0)) > 0),
            in_shardings=(rep, NamedSharding(mesh, P("data")), rep), out_shardings=(rep, rep),
            donate_argnums=(0,), compiler_options=options)

    def batches(seed, start_step):
        return data_lib.batches(dataset, global_batch=global_batch, seed=seed, start_step=start_step,
                                process_index=jax.process_index(), process_count=jax.process_count())

    def summarize(pending):
        return {"loss": float(np.mean([m["loss"] for m in pending])), "lr": float(pending[-1]["lr"])}

    def tick_text(r):
        return (f"step {r['step']:>6}/{total_steps}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"{r['img_per_sec']:.1f} img/s")

    def finish(state, trained):
        if not trained and os.path.isfile(acc_path):  # a finished run: its table, not a new evaluation
            with open(acc_path) as f:
                rows = json.load(f)["rows"]
            log.info("%s", format_accuracy_table(rows))
            return rows
        ec = config.eval
        rows = accuracy_per_sigma(module.apply, {"params": state["params"]}, eval_images, eval_labels,
                                  [float(s) for s in ec.sigmas], jax.random.key(int(ec.seed)), precond,
                                  batch=int(ec.get("batch", 512)))
        log.info("held-out accuracy per sigma (%d images, chance %.3f):\n%s", len(eval_images),
                 1 / dataset.label_dim, format_accuracy_table(rows))
        if jax.process_index() == 0:
            with open(acc_path, "w") as f:
                json.dump({"step": int(jax.device_get(state["step"])), "num_images": len(eval_images),
                           "chance": 1 / dataset.label_dim, "rows": rows}, f, indent=2)
                f.write("\n")
            log.info("table in %s", acc_path)
        return rows

    objective = Objective(init=jax.jit(init, out_shardings=rep, compiler_options=init_options), abstract=abstract,
                          make_step=make_step, batches=batches, summarize=summarize, tick_text=tick_text,
                          finish=finish)
    schedule = Schedule(total_steps=total_steps, steps_per_tick=log_every, snapshot_every=ckpt_every,
                        global_batch=global_batch, seed=int(tc.seed), max_to_keep=int(tc.max_to_keep),
                        async_save=bool(tc.get("async_checkpointing", True)))
    return objective, schedule
