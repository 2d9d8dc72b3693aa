"""Training (edm_jax/train.py): schedules against the reference formulas, device-count and accumulation
invariance of one step, batch-split errors, gradient sanitising, learning on a fixed batch.

The networks here are tiny flax stand-ins with the EDM network call signature; XLA compiles them at
optimisation level 0 to keep the file fast on CPU.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, xla_flags
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from edm_jax import train
from edm_jax.losses import LOSSES
from edm_jax.diffusion.process import sigma_process
from edm_jax.interop.rundir import process_from_config

FAST = {"xla_backend_optimization_level": 0}
B, RES, LABELS = 32, 8, 4


class TinyNet(nn.Module):
    """A stand-in for SongUNet: same call signature, dropout, class and augmentation conditioning."""
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        emb = nn.Dense(8)(noise_labels[:, None])
        if class_labels is not None:
            emb = emb + nn.Dense(8)(class_labels)
        if augment_labels is not None:
            emb = emb + nn.Dense(8)(augment_labels)
        h = nn.silu(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Conv(x.shape[-1], (3, 3))(h)


def _flat(tree):
    return np.asarray(ravel_pytree(jax.device_get(tree))[0], np.float64)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.uniform(-1, 1, (B, RES, RES, 3)).astype(np.float32),
            "labels": np.eye(LABELS, dtype=np.float32)[rng.integers(0, LABELS, B)]}


_INITIAL = {}


def _initial_state(module, augment_dim, tx):
    """The freshly initialised state as host arrays, computed once per configuration (init compiles slowly)."""
    key = (module, augment_dim)
    if key not in _INITIAL:
        _INITIAL[key] = jax.device_get(train.create_train_state(
            jax.random.key(0), module, (RES, RES, 3), LABELS, augment_dim, tx, compiler_options=FAST))
    return _INITIAL[key]


def _setup(devices, rounds=1, module=None, augment_p=0.3, start_step=7, **hyper):
    """A replicated state at `start_step` (so lr > 0 and 0 < β < 1) and the compiled step on `devices`."""
    module = TinyNet() if module is None else module
    mesh = train.make_mesh(devices)
    base_lr = hyper.pop("base_lr", 1e-3)
    tx = train.make_optimizer(base_lr)
    state = _initial_state(module, 9 if augment_p else 0, tx)
    state = state.replace(step=np.int32(start_step), opt_state=tx.init(state.params))
    state = jax.device_put(state, NamedSharding(mesh, P()))  # fresh buffers: the step donates them
    kw = dict(lr_rampup_img=10 * B, ema_halflife_img=2 * B, ema_rampup_ratio=0.05)
    kw.update(hyper)
    step = train.make_train_step(apply_fn=module.apply, process=sigma_process("edm"), tx=tx,
                                 global_batch=B, num_rounds=rounds, base_lr=base_lr, augment_p=augment_p,
                                 mesh=mesh, **kw)
    return mesh, state, train.compile_train_step(step, mesh, FAST)


def _one_step(devices, rounds=1, **kw):
    mesh, state, step = _setup(devices, rounds, **kw)
    state, metrics = step(state, train.shard_batch(_batch(), mesh), jax.random.key(42))
    return jax.device_get(state), jax.device_get(metrics)


# --- schedules ----------------------------------------------------------------------------------------

def test_learning_rate_ramp():
    base, ramp = 1e-3, 10e6  # CIFAR-10: 1e-3 over 10 Mimg
    for nimg in [0, 512, 5e6, 10e6, 10e6 + 512, 2e8]:
        want = base * min(nimg / max(ramp, 1e-8), 1)  # training_loop.py
        assert float(train.learning_rate(nimg, base, ramp)) == pytest.approx(want, rel=1e-6, abs=0)
    assert float(train.learning_rate(0, base, 0)) == 0.0  # the reference: lr = 0 on the first step, always
    assert float(train.learning_rate(512, base, 0)) == pytest.approx(base)


def test_ema_beta_reference_formula():
    batch, halflife = 512, 500e3
    for nimg in [0, 512, 1024, 1e6, 1e7, 1e7 + 512, 2e8]:
        h = min(halflife, nimg * 0.05)
        want = 0.5 ** (batch / max(h, 1e-8))
        assert float(train.ema_beta(nimg, batch, halflife, 0.05)) == pytest.approx(want, rel=1e-5, abs=1e-30)
    assert float(train.ema_beta(0, batch, halflife, 0.05)) == 0.0  # EMA = net after the first step
    assert float(train.ema_beta(2e8, batch, halflife, 0.05)) == pytest.approx(0.999290, abs=1e-6)
    # Ramp-up ends at nimg = halflife / 0.05 = 10 Mimg; without the ramp β is the steady state at once.
    assert float(train.ema_beta(0, batch, halflife, None)) == pytest.approx(0.5 ** (512 / 5e5), rel=1e-6)


# --- batch planning -----------------------------------------------------------------------------------

def test_plan_batch():
    assert train.plan_batch(512, 8) == (64, 1)
    assert train.plan_batch(512, 8, 16) == (16, 4)
    assert train.plan_batch(512, 8, 128) == (64, 1)  # the reference's min(batch_gpu, batch_gpu_total)
    with pytest.raises(ValueError, match=r"batch_size=100 is not divisible by the 8 devices.*multiple of 8"):
        train.plan_batch(100, 8)
    with pytest.raises(ValueError, match=r"batch_per_device=24 does not divide the 64 examples"):
        train.plan_batch(512, 8, 24)
    for bad in (0, -32):  # not a divisibility problem: say what is wrong
        with pytest.raises(ValueError, match=rf"^train.batch_size={bad} must be positive \(a multiple of the 8"):
            train.plan_batch(bad, 8)


def test_out_of_memory_is_one_sentence_with_the_batch_to_use():
    """A real XLA allocation failure (2^46 bytes, refused at once on CPU) becomes the advice to halve the
    per-device batch; other runtime errors pass through. (The train loop raises it as a ValueError, which
    main.py prints as its last line; a real out-of-memory train step is too expensive for a unit test.)"""
    with pytest.raises(jax.errors.JaxRuntimeError) as err:
        jax.jit(lambda x: jnp.broadcast_to(x, (1 << 46,)) + 1)(jnp.uint8(1)).block_until_ready()
    message = train.out_of_memory_message(err.value, 64)
    assert message.startswith("the train step ran out of device memory at 64 examples per device (RESOURCE_EXHAUSTED")
    assert message.endswith("; lower train.batch_per_device to 32") and "\n" not in message
    assert train.out_of_memory_message(err.value, 3).endswith("lower train.batch_per_device to 1")
    assert "1 example per device" in train.out_of_memory_message(err.value, 1)
    assert train.out_of_memory_message(err.value, None) is None  # not in the train step: not this advice
    assert train.out_of_memory_message(RuntimeError("INTERNAL: something else"), 64) is None


# --- the step -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eight_devices_step():
    assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices (tests/conftest.py)"
    return _one_step(jax.devices())


def test_one_device_equals_eight(eight_devices_step):
    s8, m8 = eight_devices_step
    s1, m1 = _one_step(jax.devices()[:1])
    assert int(s8.step) == int(s1.step) == 8
    assert 0 < m8["lr"] and 0 < m8["ema_beta"] < 1
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert rel_err(_flat(s8.params), _flat(s1.params)) < 1e-5
    assert rel_err(_flat(s8.ema), _flat(s1.ema)) < 1e-5
    # Adam's first moment is 0.1·g: a direct check of the gradients (the first Adam update is ≈ lr·sign(g)).
    assert rel_err(_flat(s8.opt_state.inner_state[0].mu), _flat(s1.opt_state.inner_state[0].mu)) < 1e-5


@pytest.fixture(scope="module")
def accumulated_step():
    """One step with 2 accumulation rounds on 8 devices: its compiled HLO text and its result (one compile
    serves both tests below)."""
    rounds = train.plan_batch(B, 8, 2)[1]
    mesh, state, step = _setup(jax.devices(), rounds=rounds)
    args = (state, train.shard_batch(_batch(), mesh), jax.random.key(42))
    compiled = step.lower(*args).compile()
    hlo = compiled.as_text()
    state, metrics = compiled(*args)
    return rounds, hlo, jax.device_get(state), jax.device_get(metrics)


def test_accumulation_equals_full_batch(eight_devices_step, accumulated_step):
    s_full, m_full = eight_devices_step
    rounds, _, s_acc, m_acc = accumulated_step
    assert rounds == 2
    assert m_acc["loss"] == pytest.approx(m_full["loss"], rel=1e-5)
    for get in (lambda s: s.params, lambda s: s.ema, lambda s: s.opt_state.inner_state[0].mu):
        assert rel_err(_flat(get(s_acc)), _flat(get(s_full))) < 1e-5


def test_one_gradient_all_reduce_per_step_after_accumulation(accumulated_step):
    """With R accumulation rounds the devices sum their own gradients locally and all-reduce once, after
    the rounds (as the reference's DDP does), not once per round inside the accumulation loop."""
    _, hlo, _, _ = accumulated_step
    computation, where = None, []
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.endswith("{"):
            computation = line.split(" (")[0]
        elif re.match(r"\s+%all-reduce(-start)?[.\d]* = ", line):
            where.append(computation)
    assert " while(" in hlo and where, "expected an accumulation loop and a gradient all-reduce"
    assert all(c.startswith("ENTRY") for c in where), where


def test_network_without_dropout_is_called_on_the_whole_batch():
    """A network that draws no randomness is called once on the batch (faster); it gives what the
    per-example vmap gives, values and gradients, and one that draws dropout keeps the per-example path."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, RES, RES, 3)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(B,)), jnp.float32)
    labels = jnp.asarray(_batch()["labels"])
    keys = jax.random.split(jax.random.key(5), B)
    for dropout, draws in ((0.0, False), (0.2, True)):
        module = TinyNet(dropout=dropout)
        variables = module.init(jax.random.key(0), x[:1], c[:1], labels[:1])
        assert train._draws_randomness(module.apply, variables, x, c, labels, None) is draws
    module = TinyNet(dropout=0.0)
    variables = module.init(jax.random.key(0), x[:1], c[:1], labels[:1])
    net = train._per_example_net(module.apply)
    one = lambda v, x1, c1, l1: module.apply(v, x1[None], c1[None], l1[None], train=True)[0]  # noqa: E731
    by_example = lambda v: jax.vmap(one, in_axes=(None, 0, 0, 0))(v, x, c, labels)  # noqa: E731
    batched = lambda v: net(v, x, c, labels, None, keys)  # noqa: E731
    assert rel_err(np.asarray(batched(variables)), np.asarray(by_example(variables))) < 1e-6
    grad = lambda f: _flat(jax.grad(lambda v: jnp.sum(f(v) ** 2))(variables))  # noqa: E731
    assert rel_err(grad(batched), grad(by_example)) < 1e-5
    # With dropout the masks differ per example key: example 0 alone with its key equals example 0 in the batch.
    module = TinyNet(dropout=0.5)
    net = train._per_example_net(module.apply)
    full = net(variables, x, c, labels, None, keys)
    alone = net(variables, x[:1], c[:1], labels[:1], None, keys[:1])
    np.testing.assert_allclose(np.asarray(full[:1]), np.asarray(alone), rtol=1e-6, atol=1e-6)


def test_nonfinite_gradients_are_replaced():
    """Images of size 1e30 give inf losses and non-finite gradients; run through the very program of
    `eight_devices_step` (the same network and settings; only the data differ), so no compile of its own."""
    mesh, state, step = _setup(jax.devices())
    batch = _batch()
    batch["images"] = batch["images"] * np.float32(1e30)
    state, metrics = jax.device_get(step(state, train.shard_batch(batch, mesh), jax.random.key(42)))
    assert not np.isfinite(metrics["loss"])
    assert metrics["nonfinite_grads"] > 0
    assert np.isfinite(_flat(state.params)).all() and np.isfinite(_flat(state.ema)).all()
    assert np.isfinite(_flat(state.opt_state.inner_state[0].mu)).all()


def test_loss_decreases_on_fixed_batch():
    module = TinyNet(dropout=0.0)
    mesh, state, step = _setup(jax.devices(), module=module, augment_p=0, start_step=0, base_lr=1e-2,
                               lr_rampup_img=0)
    batch = _batch(1)
    denoise = sigma_process("edm").model(lambda v, x, c, cl, al: module.apply(v, x, c, cl, al))
    eval_key = jax.random.key(7)  # the same σ and noise before and after

    @jax.jit
    def eval_loss_fn(variables):
        fn = lambda x, sigma, labels, aug: denoise(variables, x, sigma, labels, aug)
        return jnp.mean(LOSSES["edm"](fn, jnp.asarray(batch["images"]), jnp.asarray(batch["labels"]), key=eval_key))

    eval_loss = lambda state: float(eval_loss_fn(jax.device_get(state.variables())))

    before = eval_loss(state)
    sharded = train.shard_batch(batch, mesh)
    losses = []
    for _ in range(30):
        state, metrics = step(state, sharded, jax.random.key(3))
        losses.append(float(metrics["loss"]))
    after = eval_loss(state)
    assert int(state.step) == 30
    assert after < 0.7 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# --- checkpoints --------------------------------------------------------------------------------------

def test_checkpoint_fallback_and_foreign(tmp_path, caplog):
    from edm_jax.checkpoint import CheckpointError, Checkpointer

    mesh = train.make_mesh()
    rep = NamedSharding(mesh, P())
    state = jax.device_put(_initial_state(TinyNet(), 0, train.make_optimizer()), rep)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, state.replace(step=state.step + 1, ema=jax.tree.map(lambda e: e + 1, state.ema)), {"step": 2})
    ckpt.wait()
    restored, meta = ckpt.restore_latest(abstract)
    assert meta["step"] == 2 and int(restored.step) == 1
    np.testing.assert_allclose(_flat(restored.ema), _flat(state.ema) + 1, rtol=1e-6)
    ckpt.close()

    for path in (tmp_path / "2").rglob("*"):  # damage the newest: every data file overwritten
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0garbage")
    ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
    with caplog.at_level("WARNING", logger="edm_jax"):
        restored, meta = ckpt.restore_latest(abstract)
    assert meta["step"] == 1 and "damaged" in caplog.text
    np.testing.assert_array_equal(_flat(restored.ema), _flat(state.ema))

    foreign = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                           _initial_state(TinyNet(), 9, train.make_optimizer()))  # augment labels: more params
    with pytest.raises(CheckpointError, match="they are intact: rerun with the config"):
        ckpt.restore_latest(foreign)
    ckpt.close()


# --- the loop: a run killed with SIGKILL and rerun ends where an uninterrupted run ends ----------------

_RUN_SCRIPT = r"""
import importlib.util, os, signal, sys
import numpy as np
import jax
from edm_jax import data, train

repo, workdir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("quickstart", os.path.join(repo, "configs", "quickstart.py"))
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)
config = quickstart.get_config()
config.data.synthetic.update(n=256, resolution=8)
config.model.update(model_channels=8, channel_mult=(1,), channel_mult_emb=1, attn_resolutions=(), dropout=0.1)
config.train.update(batch_size=16, total_kimg=0.128, tick_kimg=0.032, snapshot_ticks=2, lr_rampup_kimg=0.04,
                    ema_halflife_kimg=0.05, max_to_keep=2)  # 8 steps; snapshots after steps 1, 4 and 8
config.sample.update(num_images=5, num_steps=2, seed=3)  # small grids, checked against --mode=sample's path

if kill_at:  # SIGKILL ourselves when the loop asks for the batch of step `kill_at`
    make = data.batches
    class Killer:
        def __init__(self, *args, **kwargs):
            self.it = make(*args, **kwargs)
        def __next__(self):
            if self.it.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return next(self.it)
        def close(self):
            self.it.close()
    data.batches = Killer

state = train.train_and_evaluate(config, workdir)
np.save(os.path.join(workdir, "final_ema.npy"),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.ema))]))
"""


class _BackgroundRuns(threading.Thread):
    """Three runs of `_RUN_SCRIPT` in sequence, in subprocesses sharing one XLA compilation cache: an
    uninterrupted one, one killed with SIGKILL mid-way, and its rerun. Started when the module starts, so
    that they run beside the in-process tests (this machine's test budget is a few CPU cores)."""

    def __init__(self, tmp: pathlib.Path):
        super().__init__(daemon=True)
        self.tmp, self.results, self.proc = tmp, [], None
        self.straight, self.interrupted = tmp / "straight", tmp / "interrupted"

    def _run(self, workdir, kill_at):
        repo = pathlib.Path(__file__).resolve().parents[1]
        script = self.tmp / "run.py"
        script.write_text(_RUN_SCRIPT)
        env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags(2),
                   JAX_COMPILATION_CACHE_DIR=str(self.tmp / "xla_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.proc = subprocess.Popen([sys.executable, str(script), str(repo), str(workdir), str(kill_at)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = self.proc.communicate(timeout=300)
        self.results.append((self.proc.returncode, out[-3000:]))

    def run(self):
        try:
            self._run(self.straight, 0)
            self._run(self.interrupted, 6)  # steps 1-5 done; checkpoint 4 possibly still being written
            self._run(self.interrupted, 0)  # the rerun: the same command, resumes
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.results.append((None, repr(e)))

    def stop(self):
        if self.is_alive() and self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # only the child this thread started


_NEED_RUNS = ("test_sigkill_and_rerun_matches_uninterrupted_run", "test_sampling_reads_the_training_run",
              "test_snapshot_grid_cells_are_the_sample_modes_images")


@pytest.fixture(scope="module", autouse=True)
def background_runs(request, tmp_path_factory):
    if not any(item.name in _NEED_RUNS for item in request.session.items):
        yield None
        return
    runs = _BackgroundRuns(tmp_path_factory.mktemp("sigkill"))
    runs.start()
    yield runs
    runs.stop()


def test_sigkill_and_rerun_matches_uninterrupted_run(background_runs):
    runs = background_runs
    runs.join(timeout=600)
    assert not runs.is_alive(), "the background runs did not finish in 10 minutes"
    assert len(runs.results) == 3, runs.results
    (rc_straight, out_straight), (rc_killed, out_killed), (rc_rerun, out_rerun) = runs.results
    assert rc_straight == 0, out_straight
    assert rc_killed == -signal.SIGKILL, out_killed
    assert rc_rerun == 0, out_rerun

    log = (runs.interrupted / "log.txt").read_text()
    assert "resumed from" in log and "done: step 8" in log
    a, b = np.load(runs.interrupted / "final_ema.npy"), np.load(runs.straight / "final_ema.npy")
    np.testing.assert_array_equal(a, b)  # bit-exact: same executables, same data stream, same keys
    # The workdir holds what DESIGN.md promises; metrics of the killed run past its checkpoint are dropped.
    assert json.loads((runs.straight / "config.json").read_text())["train"]["batch_size"] == 16
    steps = [json.loads(line)["step"] for line in (runs.interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 6, 8]


def test_save_image_grid(tmp_path):
    import PIL.Image

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    train.save_image_grid(images, str(tmp_path / "grid.png"), min_tile=16)
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 16, 4 * 16, 3)  # 4 columns, 3 rows, tiles zoomed 2x
    np.testing.assert_array_equal(grid[16:32:2, 0:16:2], images[4])


# --- configs ------------------------------------------------------------------------------------------

def _load_config(name, arg=None):
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _fields(config, prefix=""):
    out = set()
    for key, value in config.items():
        if hasattr(value, "items") and key not in ("synthetic",):
            out |= _fields(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_configs():
    cifar, cond, quick = _load_config("cifar10_edm"), _load_config("cifar10_edm", "cond"), _load_config("quickstart")
    assert _fields(cifar) == _fields(quick)  # one schema: the quickstart is the preset, smaller
    assert not cifar.data.use_labels and cond.data.use_labels
    t = cifar.train
    assert (t.batch_size, t.lr, t.lr_rampup_kimg, t.adam_b1, t.adam_b2, t.adam_eps) == (512, 1e-3, 10000, 0.9, 0.999, 1e-8)
    assert (t.ema_halflife_kimg, t.ema_rampup_ratio, t.loss_scaling, t.total_kimg) == (500, 0.05, 1.0, 200000)
    assert (t.tick_kimg, t.snapshot_ticks, t.state_dump_ticks) == (50, 50, 500)
    assert (cifar.model.dropout, cifar.augment.p, cifar.model.channel_mult, cifar.model.model_channels) == (
        0.13, 0.12, (2, 2, 2), 128)
    assert (cifar.process.kind, process_from_config(cifar).loss_kind, cifar.data.tfds_name) == ("edm", "edm", "cifar10")
    net = train.build_network(cifar.model.to_dict(), resolution=32, channels=3, label_dim=10, augment_dim=9,
                              out_channels=3)
    assert net.model_channels == 128 and net.dropout == 0.13 and net.augment_dim == 9
    with pytest.raises(ValueError, match="no constructor keyword"):
        train.build_network(dict(cifar.model.to_dict(), widht=3), resolution=32, channels=3, label_dim=0,
                            augment_dim=0, out_channels=3)
    with pytest.raises(ValueError, match="the config argument takes cond|uncond"):
        _load_config("cifar10_edm", "conditional")


@pytest.fixture(scope="module")
def straight_run_sampler(background_runs):
    """The uninterrupted background run, loaded as --mode=sample loads it, and its sample function with the
    run's sample section on the run's 2 devices (one compile for the two tests below)."""
    if background_runs is None:
        pytest.skip("needs this module's background training runs (run the whole file)")
    background_runs.join(timeout=600)
    assert background_runs.results and background_runs.results[0][0] == 0, background_runs.results
    from edm_jax import generate

    workdir = background_runs.straight
    config = json.loads((workdir / "config.json").read_text())
    model = generate.load_model(workdir=str(workdir))
    overrides = {k: v for k, v in config["sample"].items() if k not in ("num_images", "seed")}
    sample_fn = generate.make_sample_fn(model.denoise, image_shape=model.image_shape, label_dim=model.label_dim,
                                        settings=model.process.sampler_settings(**overrides), process=model.process,
                                        mesh=generate.make_mesh(jax.devices()[:2]))
    return workdir, config, model, sample_fn


def test_sampling_reads_the_training_run(straight_run_sampler):
    """--mode=sample's loader finds the newest checkpoint of a training workdir and uses its EMA weights."""
    workdir, _, model, sample_fn = straight_run_sampler
    leaves = jax.tree.leaves(model.denoise.params["params"])
    np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in leaves]),
                                  np.load(workdir / "final_ema.npy"))
    assert model.image_shape == (8, 8, 3) and model.label_dim == 4
    images, labels = sample_fn.sample_seeds([0, 1])
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (2,)


def test_snapshot_grid_cells_are_the_sample_modes_images(straight_run_sampler, tmp_path):
    """Grid cell s of a training snapshot is what --mode=sample's path (load_model, the sample section's
    settings, make_sample_fn, generate) writes for seed s of that snapshot, byte for byte. The snapshot is
    the background run's last (step 8, the checkpoint load_model finds)."""
    import PIL.Image

    from edm_jax import generate

    workdir, config, _, sample_fn = straight_run_sampler
    assert config["sample"]["num_images"] == 5 and config["sample"]["seed"] == 3
    grids = sorted((workdir / "samples").glob("samples-*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in grids] == ["step0000001.png", "step0000004.png", "step0000008.png"]
    grid = np.asarray(PIL.Image.open(grids[-1]))

    generate.generate(sample_fn, [0, 4], batch=8, outdir=str(tmp_path / "out"), base_seed=3)
    zoom, cols = 8, 3  # 8x8 tiles zoomed to 64 px; 5 images -> 3 columns
    for s in (0, 4):
        r, q = divmod(s, cols)
        cell = grid[r * 64:(r + 1) * 64:zoom, q * 64:(q + 1) * 64:zoom]
        png = np.asarray(PIL.Image.open(generate.image_path(str(tmp_path / "out"), s)))
        np.testing.assert_array_equal(cell, png)
