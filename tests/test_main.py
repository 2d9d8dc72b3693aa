"""The command line: workdir naming, modes not built yet, and one-sentence errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import main  # noqa: E402


@pytest.mark.parametrize("arg, name", [("configs/cifar10_edm.py", "cifar10_edm"),
                                       ("configs/cifar10_edm.py:cond", "cifar10_edm_cond"),
                                       (None, "default")])
def test_default_workdir_is_named_after_the_config(arg, name):
    assert main.config_name(arg) == name


def _run(*args):
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_eval_without_inception_weights_is_one_sentence(tmp_path):
    done = _run("--mode=eval", f"--images={tmp_path}", f"--ref={tmp_path / 'ref.npz'}",
                f"--inception={tmp_path / 'pt_inception.pth'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert len(error) == 1 and "never downloads anything" in error[0] and "pt_inception.pth" in error[0]


def test_missing_config_is_a_clear_error():
    done = _run("--mode=train")
    assert done.returncode == 2 and "needs --config=configs/<name>.py" in done.stderr
    done = _run("--config=configs/no_such_preset.py", "--mode=train")
    assert done.returncode == 2 and "config file configs/no_such_preset.py not found" in done.stderr


def test_convert_needs_a_checkpoint():
    done = _run("--mode=convert", "--workdir=/tmp/x")
    assert done.returncode == 2 and "--mode=convert needs --checkpoint=PATH.pkl" in done.stderr


def test_corrupt_pickle_is_one_sentence(tmp_path):
    bad = tmp_path / "junk.pkl"
    bad.write_bytes(b"\x80\x04not really a pickle")
    done = _run("--mode=convert", f"--checkpoint={bad}", f"--workdir={tmp_path / 'out'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "junk.pkl" in done.stderr


def test_sample_from_a_reference_snapshot_and_resume(tmp_path):
    out = tmp_path / "samples"
    args = ["--mode=sample", f"--checkpoint={os.path.dirname(REPO)}/shared/fixtures/snapshot_small.pkl",
            "--seeds=0-4", "--batch=4", "--steps=3", f"--outdir={out}"]
    done = _run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    pngs = sorted(p.name for p in (out / "000000").iterdir())
    assert pngs == [f"{s:06d}.png" for s in range(5)] and (out / "grid.png").exists()
    assert "no paper sampler preset for 8x8" in done.stdout  # the fallback is announced, not silent
    again = _run(*args)
    assert again.returncode == 0 and "wrote 0 images, skipped 5 already there" in again.stdout
    made = json.loads((out / "manifest.json").read_text())
    assert made["model.source"] == args[1].split("=", 1)[1] and made["sampler"]["num_steps"] == 3
    # Another key root into the same folder would mix two runs' images: one sentence, nothing sampled.
    png = (out / "000000" / "000001.png").read_bytes()
    refused = _run(*args[:2], "--seeds=0-5", "--batch=4", "--steps=3", "--base_seed=5", f"--outdir={out}")
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(error) == 1 and error[0] == refused.stderr.strip().splitlines()[-1]
    assert "base_seed: 0 -> 5" in error[0] and "--overwrite" in error[0] and not (out / "000000" / "000005.png").exists()
    replaced = _run(*args[:2], "--seeds=1", "--batch=4", "--steps=3", "--base_seed=5", f"--outdir={out}", "--overwrite")
    assert replaced.returncode == 0 and "wrote 1 images, skipped 0" in replaced.stdout, replaced.stderr[-2000:]
    assert sorted(p.name for p in (out / "000000").iterdir()) == ["000001.png"]
    assert (out / "000000" / "000001.png").read_bytes() != png  # another key root, another image


def test_classifier_free_guidance_flag(tmp_path):
    """--guidance refuses models without an unconditional mode; w = 0 is the unguided sampler, w > 0 is not."""
    snapshot = f"{os.path.dirname(REPO)}/shared/fixtures/snapshot_small.pkl"
    common = ["--mode=sample", "--seeds=0-3", "--batch=4", "--steps=3", "--class=2"]
    refused = _run(*common, f"--checkpoint={snapshot}", f"--outdir={tmp_path / 'x'}", "--guidance=1")
    assert refused.returncode == 2 and "trained with label_dropout=0" in refused.stderr
    # The same weights, declared as trained with label dropout (converted run with its config edited).
    import json
    work = tmp_path / "run"
    from edm_jax import convert  # in this process: --mode=convert's CLI has its own tests (test_convert.py)

    convert.convert_snapshot(snapshot, str(work))
    config = json.loads((work / "converted_config.json").read_text())
    config["network"]["label_dropout"] = 0.1
    (work / "converted_config.json").write_text(json.dumps(config))
    outputs = {}
    for w in ("0", "2"):
        done = _run(*common, f"--workdir={work}", f"--outdir={tmp_path / w}", f"--guidance={w}")
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[w] = (tmp_path / w / "000000" / "000001.png").read_bytes()
    plain = _run(*common, f"--workdir={work}", f"--outdir={tmp_path / 'plain'}")
    assert (tmp_path / "plain" / "000000" / "000001.png").read_bytes() == outputs["0"]
    assert outputs["2"] != outputs["0"]


def test_ksampler_flags_reach_the_sampler(tmp_path):
    """--sampler/--eta select a k-diffusion sampler (printed settings, images written); a flag the sampler
    does not take is one sentence naming the samplers that do."""
    snap = f"{os.path.dirname(REPO)}/shared/fixtures/snapshot_small.pkl"
    done = _run("--mode=sample", f"--checkpoint={snap}", "--seeds=0-1", "--batch=8", "--steps=3",
                "--sampler=dpmpp_2m_sde", "--eta=0.5", f"--outdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sampler='dpmpp_2m_sde'" in done.stdout and "eta=0.5" in done.stdout
    assert sorted(p.name for p in (tmp_path / "000000").iterdir()) == ["000000.png", "000001.png"]
    done = _run("--mode=sample", f"--checkpoint={snap}", "--sampler=dpmpp_2m", "--eta=0.5", f"--outdir={tmp_path}")
    error = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(error) == 1
    assert "sampler 'dpmpp_2m' takes no eta; samplers that do:" in error[0]


def _error_line(done):
    """The `error:` sentence, checked to be the only one, the last line, with no traceback, exit status 2."""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "FATAL" not in done.stderr
    return errors[0]


def test_config_mistakes_are_one_sentence(tmp_path):
    work = f"--workdir={tmp_path}"
    typo = _error_line(_run("--config=configs/quickstart.py", "--config.train.batch_szie=3", work))
    assert typo == ("error: config field train.batch_szie does not exist in configs/quickstart.py; did you mean "
                    "train.batch_size or train.batch_per_device?")
    section = _error_line(_run("--config=configs/quickstart.py", "--config.trian.lr=3", work))
    assert "config field trian does not exist" in section and "did you mean train?" in section
    variant = _error_line(_run("--config=configs/cifar10_edm.py:bogus", work))
    assert variant == ("error: configs/cifar10_edm.py:bogus: the config argument takes cond|uncond and/or "
                       "ddpmpp|ncsnpp|adm (e.g. ':cond,ncsnpp'), got ['bogus']")
    for name in ("quickstart", "cifar10_psld", "quickstart_classifier"):  # none takes an argument
        refused = _error_line(_run(f"--config=configs/{name}.py:bogus", work))
        assert refused.endswith(f"configs/{name}.py takes no argument, got 'bogus'; drop the ':bogus'")
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_convert_from_a_folder_says_what_it_holds(tmp_path):
    message = _error_line(_run("--mode=convert", f"--checkpoint={tmp_path}", f"--workdir={tmp_path / 'out'}"))
    assert message == (f"error: reference snapshot {tmp_path} is a folder, not a file; it holds no snapshot file "
                       "(.pkl, .ckpt, .pt) either")
