"""Sample-folder manifests: a folder resumes only with the model and settings that made it."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import manifest
from edm_jax.diffusion.sampler_settings import SamplerSettings



def _describe(**changes):
    fields = dict(source="/runs/a", step=1000, fingerprint="ab" * 32, settings=SamplerSettings(num_steps=18),
                  base_seed=0, class_idx=None, guidance=0.0, classifier=None, classifier_scale=1.0, fmt="png",
                  subdirs=True)
    return manifest.describe(**{**fields, **changes})


def test_fresh_folder_gets_a_manifest_and_the_same_run_resumes(tmp_path):
    m = _describe()
    manifest.prepare(str(tmp_path), m)
    on_disk = json.loads((tmp_path / manifest.MANIFEST_FILE).read_text())
    assert on_disk == m and on_disk["sampler"]["num_steps"] == 18 and on_disk["sampler"]["S_max"] == float("inf")
    (tmp_path / "000000").mkdir()
    (tmp_path / "000000" / "000000.png").write_bytes(b"png")
    manifest.prepare(str(tmp_path), _describe())  # identical description: resumes, nothing removed
    assert (tmp_path / "000000" / "000000.png").exists()


@pytest.mark.parametrize("change, field", [
    (dict(settings=SamplerSettings(num_steps=3)), "sampler.num_steps: 18 -> 3"),
    (dict(base_seed=7), "base_seed: 0 -> 7"),
    (dict(class_idx=2), "class: None -> 2"),
    (dict(guidance=1.5), "guidance: 0.0 -> 1.5"),
    (dict(classifier="/runs/clf", classifier_scale=2.0), "classifier_scale: None -> 2.0"),
    (dict(step=2000), "model.step: 1000 -> 2000"),
    (dict(fingerprint="cd" * 32), "model.params_sha256: 'abababababab…' -> 'cdcdcdcdcdcd…'"),
])
def test_a_different_model_or_setting_is_refused_naming_the_field(tmp_path, change, field):
    manifest.prepare(str(tmp_path), _describe())
    with pytest.raises(manifest.ManifestMismatchError) as e:
        manifest.prepare(str(tmp_path), _describe(**change))
    message = str(e.value)
    assert field in message and message.count("\n") == 0
    assert message.endswith("pass a new --outdir, or --overwrite to delete the samples there first")


def test_samples_without_a_manifest_are_not_trusted(tmp_path):
    (tmp_path / "000000").mkdir()
    (tmp_path / "000000" / "000003.png").write_bytes(b"png")
    with pytest.raises(manifest.ManifestMismatchError, match=r"already holds samples \(000000\) but no manifest"):
        manifest.prepare(str(tmp_path), _describe())
    assert not (tmp_path / manifest.MANIFEST_FILE).exists()


def test_overwrite_clears_only_what_sampling_wrote(tmp_path):
    manifest.prepare(str(tmp_path), _describe())
    for name in ("000000/000001.png", "001000/001000.png", "grid.png", "samples.npz", "parts/part-0.npz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")               # not ours: stays
    (tmp_path / "samples-000032kimg-step0001000.png").write_bytes(b"training grid")  # training's: stays
    manifest.prepare(str(tmp_path), _describe(base_seed=3), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [manifest.MANIFEST_FILE, "notes.txt", "samples-000032kimg-step0001000.png"]
    assert json.loads((tmp_path / manifest.MANIFEST_FILE).read_text())["base_seed"] == 3


def test_params_fingerprint_sees_one_changed_value_and_a_dtype():
    params = {"conv": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.zeros(4)}}
    same = {"conv": {"kernel": np.arange(12.0, dtype=np.float32).reshape(3, 4), "bias": np.zeros(4, np.float32)}}
    base = manifest.params_fingerprint(params)
    assert len(base) == 64 and manifest.params_fingerprint(same) == base  # device or host arrays alike
    nudged = {"conv": {**params["conv"], "kernel": params["conv"]["kernel"].at[2, 3].add(1e-6)}}
    assert manifest.params_fingerprint(nudged) != base
    assert manifest.params_fingerprint({"conv": {**params["conv"], "bias": jnp.zeros(4, jnp.bfloat16)}}) != base

