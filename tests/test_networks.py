"""SongUNet / DhariwalUNet and the reference-weight converter (CPU, ~1 minute).

Evidence: output parity with the PyTorch reference on the `net_*` fixtures, exact parameter counts
and a complete name map for the full-size paper networks, the reference's init schemes, resampling
against a direct transcription of the reference's (transposed) depthwise convs, dropout semantics
and a bfloat16 run.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture, nchw_to_nhwc, nhwc_to_nchw, rel_err
from flax import traverse_util

from edm_jax.convert import (match_state_dict, network_from_config, network_from_state_dict,
                             variable_shapes)
from edm_jax.networks import DhariwalUNet, SongUNet
from edm_jax.networks.layers import downsample2d, upsample2d

NETS = ["ddpmpp", "ncsnpp", "adm"]


def _state_dict(fixture):
    return {k[len("param/"):]: v for k, v in fixture.items() if k.startswith("param/")}


@functools.lru_cache(maxsize=None)
def _converted(name):
    """(fixture, module, variables, NHWC inputs) for `net_<name>.npz`, converted once per session."""
    z = load_fixture(f"net_{name}.npz")
    module, variables = network_from_state_dict(z["config"], _state_dict(z))
    inputs = (nchw_to_nhwc(z["x"]), z["noise_labels"], z.get("class_labels"), z.get("augment_labels"))
    return z, module, variables, inputs


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(module, variables, inputs, train=False, key=jax.random.key(0)):
    """One jitted apply shared by the tests, so equal (module, shapes, train) compile once."""
    return module.apply(variables, *inputs, train=train, rngs={"dropout": key})


# ---------------------------------------------------------------------------------------------------
# Parity with the reference.

@pytest.mark.parametrize("name", NETS)
def test_parity_with_reference(name):
    z, module, variables, inputs = _converted(name)
    out = _apply(module, variables, inputs)
    assert out.shape == nchw_to_nhwc(z["out"]).shape and out.dtype == jnp.float32
    err = rel_err(nhwc_to_nchw(out), z["out"])
    print(f"net_{name}: rel. L2 error {err:.2e}")  # measured: ddpmpp 2.3e-6, ncsnpp 1.8e-6, adm 2.4e-6
    assert err < 1e-4


@pytest.mark.parametrize("name", NETS)
def test_bfloat16_close_to_float32(name):
    z, module, variables, inputs = _converted(name)
    bf16 = module.clone(dtype=jnp.bfloat16)
    out = _apply(bf16, variables, inputs)
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    # Parameters created by a bfloat16 module are float32 (shapes only: no init compile).
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variable_shapes(bf16)))
    # bfloat16 keeps 8 significant bits (relative spacing 2^-8 = 0.4%). Activations are rounded at
    # every one of the ~20-30 conv/norm/residual stages and the errors add up roughly like a random
    # walk: sqrt(25) * 0.4% ~ 2%. Measured: ddpmpp 2.1%, ncsnpp 1.5%, adm 1.9%. A real bug (wrong
    # cast, a norm computed in bf16 with catastrophic cancellation) gives errors of order 1.
    err = rel_err(nhwc_to_nchw(np.asarray(out, np.float32)), z["out"])
    print(f"net_{name} bfloat16: rel. L2 error {err:.2e}")
    assert err < 5e-2


def test_precond_inner_networks_convert():
    """The preconditioner fixtures' `model` dicts lack img_resolution etc.: inferred from the weights."""
    expected = {"vp": ("SongUNet", 3, 0), "ve": ("SongUNet", 3, 0), "iddpm": ("DhariwalUNet", 6, 10),
                "edm": ("SongUNet", 3, 10)}
    for name, (model_type, out_channels, label_dim) in expected.items():
        z = load_fixture(f"precond_{name}.npz")
        module, _ = network_from_state_dict(z["config"]["model"], _state_dict(z))
        assert type(module).__name__ == model_type
        assert (module.img_resolution, module.in_channels) == (z["config"]["img_resolution"], 3)
        assert (module.out_channels, module.label_dim) == (out_channels, label_dim)


# ---------------------------------------------------------------------------------------------------
# Full-size paper networks: parameter counts and the converter's name map, on shapes only.

FULL_SIZE = json.loads((FIXTURES / "full_size_specs.json").read_text())


@pytest.mark.parametrize("preset", sorted(FULL_SIZE))
def test_full_size_counts_and_name_map(preset):
    spec = FULL_SIZE[preset]
    module = network_from_config({"model_type": spec["model_type"], **spec["kwargs"]})
    shapes = variable_shapes(module)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))
    assert count == spec["num_params"]
    # Every reference entry maps onto a flax leaf of the right shape, and no flax leaf is left over.
    plan = match_state_dict(spec["state_dict_shapes"], shapes, getattr(module, "resample_filter", (1, 1)))
    n_filters = sum(n.endswith(".resample_filter") for n in spec["state_dict_shapes"])
    assert len(plan) + n_filters == len(spec["state_dict_shapes"])
    assert len(plan) == len(traverse_util.flatten_dict(shapes))


def test_converter_errors():
    z = load_fixture("net_adm.npz")
    sd = _state_dict(z)
    with pytest.raises(ValueError, match="model_type"):
        network_from_state_dict({**z["config"], "model_type": "UNet"}, sd)
    with pytest.raises(ValueError, match="no constructor argument"):
        network_from_state_dict({**z["config"], "chanel_mult": [1, 2]}, sd)
    network_from_config({**z["config"], "use_fp16": True})  # reference-only key: ignored
    extra = {**sd, "enc.16x16_block0.bogus.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="enc.16x16_block0.bogus.weight"):
        network_from_state_dict(z["config"], extra)
    missing = {k: v for k, v in sd.items() if k != "map_layer1.bias"}
    with pytest.raises(ValueError, match="params/map_layer1/bias"):
        network_from_state_dict(z["config"], missing)
    bad = {**sd, "map_layer1.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"map_layer1.weight: reference \[3, 3\]"):
        network_from_state_dict(z["config"], bad)
    with pytest.raises(ValueError, match="resample_filter"):
        zn = load_fixture("net_ncsnpp.npz")
        network_from_state_dict({**zn["config"], "resample_filter": [1, 1]}, _state_dict(zn))


# ---------------------------------------------------------------------------------------------------
# Layers against direct transcriptions of the reference.

def _ref_depthwise(x, resample_filter, pad, up):
    """Reference conv2d / conv_transpose2d(4f) with groups=C, stride 2, as literal lax convs."""
    f = np.asarray(resample_filter, np.float32)
    f = np.outer(f, f) / f.sum() ** 2
    c = x.shape[-1]
    k = np.tile(((4 * f) if up else f)[:, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    if up:  # transposed conv = dilated input, padding k-1-p, flipped (here symmetric) filter
        e = f.shape[0] - 1 - pad
        return jax.lax.conv_general_dilated(x, k, (1, 1), [(e, e), (e, e)], lhs_dilation=(2, 2),
                                            dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(x, k, (2, 2), [(pad, pad), (pad, pad)],
                                        dimension_numbers=dn, feature_group_count=c)


@pytest.mark.parametrize("resample_filter,pad", [((1, 1), 0), ((1, 3, 3, 1), 1), ((1, 3, 3, 1), 0)])
def test_resampling_matches_depthwise_convs(resample_filter, pad):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 5))
    for up, fn in ((False, downsample2d), (True, upsample2d)):
        want = _ref_depthwise(x, resample_filter, pad, up)
        got = fn(x, resample_filter, pad)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_skip_encoder_and_decoder_shapes():
    """encoder_type/decoder_type 'skip' (not in the paper presets, no fixture): trace and shapes only."""
    net = SongUNet(img_resolution=8, in_channels=3, out_channels=2, model_channels=16,
                   channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                   encoder_type="skip", decoder_type="skip", resample_filter=(1, 3, 3, 1))
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,))
    variables = jax.eval_shape(net.init, jax.random.key(0), x, t)
    names = set(variables["params"])
    assert {"enc_4x4_aux_skip", "dec_8x8_aux_norm", "dec_4x4_aux_conv", "dec_8x8_aux_conv"} <= names
    assert jax.eval_shape(net.apply, variables, x, t).shape == (2, 8, 8, 2)


def test_reference_init_schemes():
    # Small nets and an RngBitGenerator key: the init's random draws are the same functions of the
    # key for any PRNG implementation, and threefry makes XLA's CPU compile of init slow (~30 s).
    key = lambda seed: jax.random.key(seed, impl="unsafe_rbg")
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))
    song = SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, augment_dim=2,
                    model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                    embedding_type="fourier", channel_mult_noise=2, encoder_type="residual")
    v = jax.jit(song.init)(key(1), x, t)
    p = v["params"]
    limit = lambda fi, fo: np.sqrt(6 / (fi + fo))  # xavier_uniform bound; conv fans are in·k·k, out·k·k
    blk = p["enc_4x4_block0"]
    k0 = blk["conv0"]["kernel"]  # 16 -> 32 channels, 3x3
    assert 0.9 * limit(16 * 9, 32 * 9) < np.abs(k0).max() <= limit(16 * 9, 32 * 9)
    assert np.abs(blk["conv1"]["kernel"]).max() <= 1e-5 * limit(32 * 9, 32 * 9)
    assert np.abs(blk["conv1"]["kernel"]).max() > 0  # "zero" layers are 1e-5-scaled, not zero
    assert np.abs(blk["qkv"]["kernel"]).max() <= np.sqrt(0.2) * limit(32, 96)
    assert all(np.all(blk[m]["bias"] == 0) for m in ("conv0", "conv1", "affine", "skip", "qkv", "proj"))
    freqs = v["buffers"]["map_noise"]["freqs"]
    assert freqs.shape == (16,) and 8 < np.std(freqs) < 24  # N(0, 16^2)

    # Smallest ADM that still has every kind of layer (mapping, attention, skip projection, output).
    adm = DhariwalUNet(img_resolution=4, in_channels=3, out_channels=3, label_dim=100, augment_dim=2,
                       model_channels=64, channel_mult=(2,), num_blocks=0, attn_resolutions=())
    p = jax.jit(adm.init)(key(2), x[:, :4, :4], t)["params"]
    blk = p["dec_4x4_block0"]  # 256 -> 128 channels
    bound = 1 / np.sqrt(256 * 9)  # kaiming_uniform * sqrt(1/3) = U(±1/sqrt(fan_in)), bias too
    for leaf in (blk["conv0"]["kernel"], blk["conv0"]["bias"]):
        assert 0.8 * bound < np.abs(leaf).max() <= bound * (1 + 1e-6)  # float32 rounding
    for layer in (blk["conv1"], p["dec_4x4_in0"]["proj"], p["out_conv"]):
        assert np.all(layer["kernel"] == 0) and np.all(layer["bias"] == 0)
    assert np.all(p["map_augment"]["kernel"] == 0)
    assert 0.9 < np.std(p["map_label"]["kernel"]) < 1.1  # N(0, 1)
    assert p["dec_4x4_in0"]["qkv"]["kernel"].shape == (1, 1, 128, 384)  # two heads of 64 channels


# ---------------------------------------------------------------------------------------------------
# Dropout.

def test_dropout_uses_the_dropout_rng():
    z, module, variables, inputs = _converted("adm")  # one network is enough: blocks are shared
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b, a2 = (_apply(module, variables, inputs, True, k) for k in (k1, k2, k1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    e1, e2 = _apply(module, variables, inputs, False, k1), _apply(module, variables, inputs, False, k2)
    np.testing.assert_array_equal(e1, e2)
    assert rel_err(nhwc_to_nchw(e1), z["out"]) < 1e-4
    # label_dropout=1 in training drops every label: the same as evaluating with zero labels.
    x, sigma, labels, aug = inputs
    got = _apply(module.clone(dropout=0.0, label_dropout=1.0), variables, inputs, True, k1)
    want = _apply(module, variables, (x, sigma, np.zeros_like(labels), aug), False, k1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
