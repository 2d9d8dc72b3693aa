"""Guidance (classifier and classifier-free) and ADM's noise-aware classifier (CPU, ~50 s on 2 busy cores).

Evidence: on a Gaussian mixture both the denoiser and the classifier p(y | x, σ) (the mixture
responsibilities) are exact, so classifier guidance at scale 1 must reproduce the exact conditional
denoiser E[x₀ | x, y] (float64, to round-off) and draw exact conditional samples; larger scales
concentrate the samples on the class; CFG with weight w must equal classifier guidance at scale 1 + w.
EncoderUNet: shapes, jit, conditioning, its attention-pooling head against a numpy transcription of
guided-diffusion's, and a parameter count equal to one derived independently from guided-diffusion's
`EncoderUNetModel`. The classifier loss trains a tiny classifier. Everything is jitted with the data as
arguments (eager op-by-op dispatch and constant folding of closed-over arrays cost more than the tests).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_fixture, nchw_to_nhwc, nhwc_to_nchw

from edm_jax import guidance, sampling
from edm_jax.networks.classifier import AttentionPool2d, EncoderUNet
from edm_jax.toy import GaussianMixture

FIXTURE = load_fixture("samplers.npz")
MIXTURE = GaussianMixture(nchw_to_nhwc(FIXTURE["means"]), FIXTURE["stds"], FIXTURE["weights"])
K = len(MIXTURE.stds)  # 5 components over [4, 4, 3] images, pairwise mean distances 3.8 … 4.6
EVENT = MIXTURE.means.shape[1:]


def exact_log_prob(x, sigma, class_labels):
    """log p(y | x, σ) of the mixture: the responsibilities picked at the one-hot labels (exact)."""
    return jnp.sum(class_labels * MIXTURE.log_responsibilities(x, sigma), axis=-1)


def component_denoiser(x, sigma, k):
    """E[x₀ | x, component k] = (s_k² x + σ² μ_k) / (s_k² + σ²), the exact class-conditional denoiser."""
    s2 = jnp.asarray(MIXTURE.stds, x.dtype)[k] ** 2
    sig2 = jnp.reshape(jnp.asarray(sigma, x.dtype) ** 2, (-1,) + (1,) * (x.ndim - 1))
    return (s2 * x + sig2 * jnp.asarray(MIXTURE.means, x.dtype)[k]) / (s2 + sig2)


def conditional_denoiser(x, sigma, class_labels):
    """A label-dropout-trained model, made exact: zero labels → D(x; σ), one-hot y → E[x₀ | x, y]."""
    per_class = jnp.stack([component_denoiser(x, sigma, k) for k in range(K)], axis=1)  # [N, K, ...]
    cond = jnp.einsum("nk,nk...->n...", class_labels.astype(x.dtype), per_class)
    null = jnp.sum(class_labels, axis=-1) == 0
    return jnp.where(null.reshape((-1,) + (1,) * (x.ndim - 1)), MIXTURE.denoise(x, sigma), cond)


def nearest_component(x):
    d = jnp.linalg.norm(x.reshape(x.shape[0], 1, -1) - MIXTURE.means.reshape(1, K, -1), axis=-1)
    return np.asarray(jnp.argmin(d, axis=1))


def _points(dtype, n=12):
    """Noisy points at σ from 0.01 to 50 (numpy, no eager JAX): near the data and far from it."""
    rng = np.random.default_rng(3)
    sigma = np.geomspace(0.01, 50.0, n)
    comp = rng.choice(K, n, p=MIXTURE.weights / MIXTURE.weights.sum())
    x0 = MIXTURE.means[comp] + MIXTURE.stds[comp, None, None, None] * rng.standard_normal((n, *EVENT))
    x = x0 + sigma[:, None, None, None] * rng.standard_normal(x0.shape)
    return x.astype(dtype), sigma.astype(dtype)


# ---------------------------------------------------------------------------------------------------
# Classifier guidance.

def test_exact_classifier_at_scale_one_is_the_conditional_denoiser():
    """D + σ² ∇ log p(y | x, σ) = E[x₀ | x, y] (score relation + Bayes), to float64 round-off, every class;
    any scale gives D + scale · (E[x₀ | x, y] − D)."""

    def error(x, sigma, scale, y):  # scale and y traced: one compilation for all cases
        labels = jax.nn.one_hot(jnp.full((x.shape[0],), y), K, dtype=x.dtype)
        out = guidance.classifier_guided(MIXTURE.denoise, exact_log_prob, scale)(x, sigma, labels)
        d, d_y = MIXTURE.denoise(x, sigma), component_denoiser(x, sigma, y)
        return out, jnp.max(jnp.abs(out - (d + scale * (d_y - d))) / (1 + jnp.abs(d_y)))

    with jax.enable_x64(True):
        x, sigma = _points(np.float64)
        run = jax.jit(lambda x, sigma, scale, y: error(x, sigma, scale, y)[1])
        errs = [float(run(x, sigma, scale, y)) for scale in (1.0, 3.0) for y in range(K)]
        assert max(errs) < 1e-12, errs
    # float32 (the samplers' dtype): the guided denoiser returns float32, correct to float32 round-off.
    x, sigma = _points(np.float32)
    out, err = jax.jit(error)(x, sigma, 1.0, 2)
    assert out.dtype == jnp.float32 and float(err) < 1e-4


def test_scale_zero_reproduces_the_unguided_sampler():
    lat = jax.random.normal(jax.random.key(0), (16, *EVENT))
    labels = jax.nn.one_hot(jnp.arange(16) % K, K)
    denoise = MIXTURE.denoise  # (a bound method is a new object at every attribute access)
    # Latents and labels are jit arguments throughout (closed-over constants would be constant-folded).
    sampler = lambda d: jax.jit(lambda lat, labels: sampling.edm_sampler(d, lat, labels, num_steps=10))
    unguided = sampler(denoise)(lat, labels)
    # A Python 0 hands back the denoiser itself: the same sampler, bit for bit.
    assert guidance.classifier_guided(denoise, exact_log_prob, 0) is denoise
    np.testing.assert_array_equal(sampler(guidance.classifier_guided(denoise, exact_log_prob, 0))(lat, labels),
                                  unguided)
    # A traced 0 computes D + 0·σ²·∇ log p = D (measured bit-for-bit; the tolerance leaves XLA room to fuse
    # the larger graph differently).
    traced = jax.jit(lambda lat, labels, s: sampling.edm_sampler(
        guidance.classifier_guided(denoise, exact_log_prob, s), lat, labels, num_steps=10))
    np.testing.assert_allclose(traced(lat, labels, 0.0), unguided, rtol=0, atol=1e-7)
    assert np.abs(traced(lat, labels, 1.0) - unguided).max() > 0.1


def test_guided_samples_concentrate_on_the_class():
    """Fraction of samples nearest to component y: the prior weight at scale 0, rising to 1 at scale ≥ 1
    (measured 0.065, 0.19, 0.80, 1, 1 for scales 0, 0.25, 0.5, 1, 4; prior weight 0.074)."""
    n, y = 400, 2  # the component with the smallest but one weight (0.074)
    lat = jax.random.normal(jax.random.key(0), (n, *EVENT))
    labels = jax.nn.one_hot(jnp.full((n,), y), K)
    run = jax.jit(lambda lat, labels, s: sampling.edm_sampler(
        guidance.classifier_guided(MIXTURE.denoise, exact_log_prob, s), lat, labels, num_steps=18))
    scales = [0.0, 0.25, 0.5, 1.0, 4.0]
    samples = {s: run(lat, labels, s) for s in scales}
    fractions = [float(np.mean(nearest_component(samples[s]) == y)) for s in scales]
    w_y = MIXTURE.weights[y] / MIXTURE.weights.sum()
    assert abs(fractions[0] - w_y) < 4 * np.sqrt(w_y * (1 - w_y) / n), fractions
    assert fractions[0] < fractions[1] < fractions[2] < fractions[3], fractions
    assert fractions[3] == fractions[4] == 1.0, fractions
    # Scale 1 with the exact classifier is the sampler of the exact conditional model, N(μ_y, s_y² I).
    conditional = sampling.edm_sampler(lambda x, sigma, c: component_denoiser(x, sigma, y), lat, labels,
                                       num_steps=18)
    np.testing.assert_allclose(samples[1.0], conditional, rtol=0, atol=1e-5)


def test_classifier_guidance_needs_labels_and_per_example_log_probs():
    x, sigma = _points(np.float32, 4)
    guided = guidance.classifier_guided(MIXTURE.denoise, exact_log_prob, 1.0)
    with pytest.raises(ValueError, match="needs class labels"):
        guided(x, sigma, None)
    bad = guidance.classifier_guided(MIXTURE.denoise, lambda x, s, c: jnp.sum(exact_log_prob(x, s, c)), 1.0)
    with pytest.raises(ValueError, match="one log-probability per example"):
        bad(x, sigma, np.eye(K)[[0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance.

def test_cfg_weight_zero_is_the_conditional_model():
    lat = jax.random.normal(jax.random.key(1), (10, *EVENT))
    labels = jax.nn.one_hot(jnp.arange(10) % K, K)
    assert guidance.classifier_free(conditional_denoiser, 0, K) is conditional_denoiser
    plain = jax.jit(lambda lat, labels: sampling.edm_sampler(conditional_denoiser, lat, labels, num_steps=8))
    traced = jax.jit(lambda lat, labels, w: sampling.edm_sampler(
        guidance.classifier_free(conditional_denoiser, w, K), lat, labels, num_steps=8))
    # (1 + 0)·a − 0·b = a: measured bit-for-bit.
    np.testing.assert_allclose(traced(lat, labels, 0.0), plain(lat, labels), rtol=1e-7, atol=1e-7)


def test_cfg_is_one_batched_call_equal_to_two_separate_calls():
    x, sigma = _points(np.float32, 6)
    labels = np.eye(K, dtype=np.float32)[[0, 1, 2, 3, 4, 2]]
    calls = []

    def recording(x_, sigma_, labels_):
        calls.append((x_.shape, sigma_.shape, labels_.shape))
        return conditional_denoiser(x_, sigma_, labels_)

    w = 2.5
    out, expected = jax.jit(lambda x, sigma, labels: (
        guidance.classifier_free(recording, w, K)(x, sigma, labels),
        (1 + w) * conditional_denoiser(x, sigma, labels) - w * conditional_denoiser(x, sigma, 0 * labels)))(
        x, sigma, labels)
    assert calls == [((12, *EVENT), (12,), (12, K))]  # one call on the doubled batch
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_cfg_with_weight_w_is_classifier_guidance_at_scale_one_plus_w():
    """For exact models D_y − D = σ² ∇ log p(y | x, σ), and
    (1 + w) D_y − w D = D + (1 + w) σ² ∇ log p(y | x, σ);
    CFG is guidance by the implicit classifier (Ho & Salimans 2022)."""
    with jax.enable_x64(True):
        x, sigma = _points(np.float64)
        labels = np.eye(K)[np.arange(x.shape[0]) % K]

        @jax.jit
        def both(x, sigma, labels, w):
            return (guidance.classifier_free(conditional_denoiser, w, K)(x, sigma, labels),
                    guidance.classifier_guided(MIXTURE.denoise, exact_log_prob, 1 + w)(x, sigma, labels))

        for w in (0.5, 3.0):
            np.testing.assert_allclose(*both(x, sigma, labels, w), rtol=1e-9, atol=1e-9)


def test_cfg_errors_are_clear():
    x, sigma = _points(np.float32, 4)
    cfg = guidance.classifier_free(conditional_denoiser, 1.0, K)
    with pytest.raises(ValueError, match="needs class labels"):
        cfg(x, sigma, None)
    with pytest.raises(ValueError, match=r"must be one-hot of shape \[4, 5\]"):
        cfg(x, sigma, jnp.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------------
# EncoderUNet (ADM's classifier).

# Compiling a network's gradient dominates these tests' time, so the nets are small: TINY (one level, one
# block, attention only in the middle block) for everything differentiated, TWO_LEVEL for a forward pass
# through a down-sampling block and encoder attention.
TINY = dict(img_resolution=8, in_channels=3, num_classes=4, model_channels=16, channel_mult=(1,),
            num_blocks=1, attn_resolutions=(), channels_per_head=8)
TWO_LEVEL = dict(TINY, channel_mult=(1, 2), attn_resolutions=(4,))
TINY_NET = EncoderUNet(**TINY)


def host_init(module, *inputs, seed=0):
    """Variables drawn with numpy on `jax.eval_shape`'s tree (compiling flax's init costs ~20 s on CPU):
    kernels N(0, 1/fan_in), biases 0, GroupNorm scales 1, positional embedding N(0, 1/C). Unlike ADM's
    init, no residual branch starts at zero, so the noise embedding reaches the logits from the start.
    `inputs` default to an EncoderUNet's (one image, one noise label)."""
    if not inputs:
        r, c = module.img_resolution, module.in_channels
        inputs = (jnp.zeros((1, r, r, c)), jnp.zeros((1,)))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name in ("kernel", "positional_embedding"):
            fan_in = s.shape[-1] if name == "positional_embedding" else np.prod(s.shape[:-1])
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), s.shape), jnp.float32)
        return jnp.ones(s.shape) if name == "scale" else jnp.zeros(s.shape)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


TINY_VARS = host_init(TINY_NET)


def test_encoder_unet_shapes_and_noise_conditioning():
    net = EncoderUNet(**TWO_LEVEL)
    variables = host_init(net)
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32)
    c_noise = np.array([-1.0, 0.0, 1.0], np.float32)
    # One jitted call on [x; x; −x] with noise labels [c; c + 0.5; c].
    logits = jax.jit(net.apply)(variables, np.concatenate([x, x, -x]),
                                np.concatenate([c_noise, c_noise + 0.5, c_noise]))
    assert logits.shape == (9, 4) and logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    a, b, c = np.split(np.asarray(logits), 3)
    assert np.abs(a - b).max() > 1e-3  # the noise label is used
    assert np.abs(a - c).max() > 1e-3  # and the image
    assert set(variables) == {"params"} and {"enc_4x4_down", "mid_4x4_in0", "out_pool"} <= set(variables["params"])
    with pytest.raises(ValueError, match=r"expects x of shape \[N, 8, 8, 3\]"):
        net.apply(variables, x[:, :4], c_noise)


def adm_attention_pool(x, pos, w_qkv, b_qkv, w_c, b_c, heads):
    """guided-diffusion's AttentionPool2d.forward with QKVAttention, transcribed to numpy (NCHW, float64)."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = np.concatenate([x.mean(-1, keepdims=True), x], -1) + pos[None]
    qkv = np.einsum("oc,bct->bot", w_qkv, x) + b_qkv[:, None]
    length, ch = qkv.shape[-1], c // heads
    q, k, v = np.split(qkv, 3, axis=1)
    scale = 1 / np.sqrt(np.sqrt(ch))
    weight = np.einsum("bct,bcs->bts", (q * scale).reshape(b * heads, ch, length),
                       (k * scale).reshape(b * heads, ch, length))
    weight = np.exp(weight - weight.max(-1, keepdims=True))
    weight /= weight.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", weight, v.reshape(b * heads, ch, length)).reshape(b, -1, length)
    return (np.einsum("oc,bct->bot", w_c, a) + b_c[:, None])[:, :, 0]


def test_attention_pool_matches_guided_diffusion():
    pool = AttentionPool2d(out_features=5, channels_per_head=8)
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 32))
    p = host_init(pool, x)["params"]
    p["qkv_proj"]["bias"] = np.linspace(-0.5, 0.5, 96)  # non-zero biases, so that their layout is tested
    p["c_proj"]["bias"] = np.linspace(-0.1, 0.1, 5)
    # flax layouts: positional embedding [HW + 1, C], kernels [in, out]; guided-diffusion's are transposed.
    expected = adm_attention_pool(nhwc_to_nchw(x), np.asarray(p["positional_embedding"]).T,
                                  p["qkv_proj"]["kernel"].T, p["qkv_proj"]["bias"], p["c_proj"]["kernel"].T,
                                  p["c_proj"]["bias"], heads=4)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x32 = x.astype(np.float32)
    got = jax.jit(pool.apply)({"params": p}, x32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    low = jax.jit(AttentionPool2d(out_features=5, channels_per_head=8, dtype=jnp.bfloat16).apply)({"params": p}, x32)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), expected, rtol=0.05, atol=0.05)


def adm_classifier_param_count(image_size, in_channels, model_channels, channel_mult, num_res_blocks,
                               attention_resolutions, num_head_channels, out_channels):
    """Parameters of guided-diffusion's EncoderUNetModel(pool='attention', use_scale_shift_norm=True,
    resblock_updown=True), counted layer by layer from that class's constructor (an independent derivation)."""
    emb = 4 * model_channels
    conv = lambda ci, co, k: ci * co * k * k + co
    norm = lambda c: 2 * c

    def res_block(ci, co):  # in_layers, emb_layers (scale and shift), out_layers, 1x1 skip if ci != co
        return norm(ci) + conv(ci, co, 3) + (emb * 2 * co + 2 * co) + norm(co) + conv(co, co, 3) + (
            conv(ci, co, 1) if ci != co else 0)

    def attn_block(c):  # norm, qkv (1-D conv c -> 3c), proj_out
        assert c % num_head_channels == 0
        return norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = conv(model_channels, emb, 1) + conv(emb, emb, 1)  # time_embed
    ch = model_channels * channel_mult[0]
    total += conv(in_channels, ch, 3)
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            total += res_block(ch, mult * model_channels)
            ch = mult * model_channels
            if image_size // ds in attention_resolutions:
                total += attn_block(ch)
        if level != len(channel_mult) - 1:
            total += res_block(ch, ch)  # down-sampling ResBlock
            ds *= 2
    total += res_block(ch, ch) + attn_block(ch) + res_block(ch, ch)  # middle_block
    spatial = image_size // ds
    total += norm(ch) + ch * (spatial**2 + 1) + conv(ch, 3 * ch, 1) + conv(ch, out_channels, 1)  # head
    return total


def _param_count(net, res, channels):
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, res, res, channels)), jnp.zeros((1,)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_parameter_count_matches_guided_diffusion():
    # ImageNet-64 classifier (guided-diffusion README): width 128, depth 4, attention 32,16,8, 64 ch/head.
    net = EncoderUNet(img_resolution=64, in_channels=3, num_classes=1000, model_channels=128,
                      channel_mult=(1, 2, 3, 4), num_blocks=4, attn_resolutions=(32, 16, 8))
    count = _param_count(net, 64, 3)
    print(f"EncoderUNet ImageNet-64 ADM classifier: {count:,} parameters")
    assert count == adm_classifier_param_count(64, 3, 128, (1, 2, 3, 4), 4, (32, 16, 8), 64, 1000)
    assert _param_count(TINY_NET, 8, 3) == adm_classifier_param_count(8, 3, 16, (1,), 1, (), 8, 4)
    two_level = EncoderUNet(**dict(TWO_LEVEL, num_blocks=2, attn_resolutions=(8, 4)))
    assert _param_count(two_level, 8, 3) == adm_classifier_param_count(8, 3, 16, (1, 2), 2, (8, 4), 8, 4)


# ---------------------------------------------------------------------------------------------------
# A network classifier: guidance with it, and its training loss.

def test_network_classifier_guidance():
    """classifier_log_prob ∘ EncoderUNet as the log_prob_fn: its value, and per-example gradients."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * 2.0
    labels = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
    sigma = jnp.full((4,), 2.0)
    denoise = lambda x, s, c: x / (1 + s.reshape(-1, 1, 1, 1) ** 2)  # the exact denoiser of N(0, I) data

    @jax.jit
    def run(variables, x, sigma, labels):
        log_prob = guidance.classifier_log_prob(TINY_NET.apply, variables)
        guided = guidance.classifier_guided(denoise, log_prob, 4.0)
        # log p(y | x, σ) = log_softmax(F(c_in x; c_noise))[y], EDM's c_in = 1/√(σ² + ¼), c_noise = ln(σ)/4.
        logits = TINY_NET.apply(variables, x / jnp.sqrt(sigma**2 + 0.25)[:, None, None, None], jnp.log(sigma) / 4)
        return log_prob(x, sigma, labels), jnp.sum(labels * jax.nn.log_softmax(logits), -1), guided(x, sigma, labels)

    got, expected, out = run(TINY_VARS, x, sigma, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert out.shape == x.shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    assert np.abs(np.asarray(out - denoise(x, sigma, None))).min() > 0  # every pixel is pushed
    # Per-example gradients: images 0 and 1 do not depend on the rest of their batch.
    other = run(TINY_VARS, x.at[2:].set(jax.random.normal(jax.random.key(1), (2, 8, 8, 3))), sigma, labels)[2]
    np.testing.assert_allclose(other[:2], out[:2], rtol=1e-5, atol=1e-6)


def _blobs(seed, n, res=8):
    """4 classes: a bright Gaussian blob in one quadrant of a dark image, 0.1 pixel noise, in [−1, 1]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centres = np.array([[2.0, 2.0], [2.0, 5.0], [5.0, 2.0], [5.0, 5.0]])[y]  # [n, 2]
    grid = np.stack(np.meshgrid(np.arange(res), np.arange(res), indexing="ij"), -1)  # [res, res, 2]
    d2 = np.sum((grid[None] - centres[:, None, None]) ** 2, -1)
    img = (2 * np.exp(-d2 / 4.0) - 1)[..., None] + 0.1 * rng.standard_normal((n, res, res, 3))
    return img.astype(np.float32), np.eye(4, dtype=np.float32)[y]


def test_classifier_loss_trains_a_classifier():
    """30 Adam steps on 64 images lift the accuracy from chance (measured 18 %) to > 90 % at σ = 0.05 and
    > 80 % at σ = 1 (measured 100 % and 96 %; the training σ are drawn as EDM's, ln σ ~ N(−1.2, 1.2²))."""
    images, labels = _blobs(0, 64)
    test_images, test_labels = _blobs(9, 256)
    tx = optax.adam(2e-3)
    # Data are jit arguments, not closed-over constants, which XLA would constant-fold at compile time.

    @jax.jit
    def step(params, opt_state, images, labels, key):  # (a Python loop: CPU XLA runs a scan of it ~6x slower)
        loss_fn = lambda p: jnp.mean(guidance.classifier_loss(TINY_NET.apply, {"params": p}, images, labels, key))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, images, labels, sigma):
        noisy = images + sigma * jax.random.normal(jax.random.key(5), images.shape)
        # argmax_y log p(y | x, σ) = argmax of the logits at (c_in x, c_noise), EDM preconditioning.
        c_noise = jnp.full(images.shape[:1], jnp.log(sigma) / 4)
        logits = TINY_NET.apply({"params": params}, noisy / jnp.sqrt(sigma**2 + 0.25), c_noise)
        return jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))

    params, opt_state, losses = TINY_VARS["params"], tx.init(TINY_VARS["params"]), []
    for i in range(30):
        params, opt_state, loss = step(params, opt_state, images, labels, jax.random.fold_in(jax.random.key(2), i))
        losses.append(float(loss))
    losses = np.array(losses)
    before, after, noisy = (float(accuracy(p, test_images, test_labels, s))
                            for p, s in ((TINY_VARS["params"], 0.05), (params, 0.05), (params, 1.0)))
    assert before < 0.5 and after > 0.9 and noisy > 0.8, (before, after, noisy)
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses


def test_classifier_loss_draws():
    """ln σ ~ N(P_mean, P_std²) from `rnd`, input c_in (y + σ n) and c_noise of the EDM precond; per-example keys."""
    images, labels = _blobs(0, 4)
    rnd, noise = jnp.array([0.0, 1.0, -1.0, 2.0]), jax.random.normal(jax.random.key(1), images.shape)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))

    @jax.jit
    def run(images, labels, rnd, noise, keys):
        def loss(images, labels, key=None, rnd=None, noise=None):
            seen = {}

            def fake_apply(variables, x_in, c_noise):  # uniform logits; keeps what the network was fed
                seen.update(x_in=x_in, c_noise=c_noise)
                return jnp.zeros((x_in.shape[0], 4))

            out = guidance.classifier_loss(fake_apply, None, images, labels, key, rnd=rnd, noise=noise,
                                           P_mean=-1.0, P_std=2.0)
            return out, seen["x_in"], seen["c_noise"]

        explicit = loss(images, labels, rnd=rnd, noise=noise)
        whole = loss(images, labels, jax.random.key(3))[1]
        part = loss(images[2:], labels[2:], keys[2:])[1]
        return explicit, whole, part

    (loss, x_in, c_noise), whole, part = run(images, labels, rnd, noise, keys)
    np.testing.assert_allclose(loss, np.full(4, np.log(4.0)), rtol=1e-6)  # cross-entropy of uniform logits
    sigma = np.exp(np.asarray(rnd) * 2.0 - 1.0)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
    expected = (images + sigma[:, None, None, None] * noise) / np.sqrt(sigma**2 + 0.25)[:, None, None, None]
    np.testing.assert_allclose(x_in, expected, rtol=1e-5, atol=1e-6)
    # Example i's draws depend only on its key (one key k means fold_in(k, i)): a split batch draws the same.
    np.testing.assert_array_equal(part, whole[2:])
    with pytest.raises(ValueError, match="pass either `key`"):
        guidance.classifier_loss(lambda *a: None, None, images, labels)
