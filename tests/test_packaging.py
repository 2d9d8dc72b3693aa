"""`pip install .` and `pip install -e .` give an importable edm_jax: README's snippet runs from another folder.

Offline and cheap: the package is built from a copy of the sources with the installed setuptools
(`--no-build-isolation --no-index --no-deps`: nothing is downloaded), and the installed dependencies are
reused (a venv that sees this interpreter's site-packages through a .pth file).
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.packaging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPET = next(b for b in re.findall(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S)
               if "edm_sampler" in b)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index"]


def _sources(tmp_path):
    """What a source distribution holds: pyproject.toml, the requirement files it reads, the package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "requirements-test.txt"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "edm_jax"), src / "edm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _run(cmd, **kwargs):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _snippet_from(python, folder, env=None):
    """README's snippet, run by `python` in `folder` (not the repository); returns edm_jax's location."""
    code = SNIPPET + "\nimport edm_jax, numpy as np\nprint('EDM_JAX', edm_jax.__file__)\n" \
                     "assert np.allclose(np.asarray(x).mean(0), [-1, 0, 1], atol=0.03)\n"
    out = _run([python, "-c", code], cwd=folder, env=env).stdout
    return out.split("EDM_JAX ")[1].strip()


def test_wheel_installs_every_subpackage_and_declares_the_pins(tmp_path):
    src = _sources(tmp_path)
    _run([*PIP, "wheel", *OFFLINE, "-w", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("edm_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("edm_jax/sampling.py", "edm_jax/diffusion/psld.py", "edm_jax/networks/song_unet.py",
                   "edm_jax/interop/runlock.py"):
        assert module in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for line in open(os.path.join(REPO, "requirements.txt")):
        pin = line.split("#")[0].strip()
        if pin:
            assert f"Requires-Dist: {pin}\n" in metadata, pin
    assert 'Requires-Dist: pytest==9.2.0; extra == "test"' in metadata
    _run([*PIP, "install", *OFFLINE, "--target", str(tmp_path / "site"), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
    assert _snippet_from(sys.executable, elsewhere, env).startswith(str(tmp_path / "site" / "edm_jax"))


def test_editable_install_imports_from_the_checkout(tmp_path):
    src = _sources(tmp_path)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    # The dependencies (and setuptools, for the build) are this interpreter's: appended after the venv's own.
    with open(os.path.join(site, "_edm_jax_test_deps.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)) + "\n")
    _run([*PIP, "--python", python, "install", *OFFLINE, "-e", str(src)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert _snippet_from(python, elsewhere, dict(env, JAX_PLATFORMS="cpu")) == str(src / "edm_jax" / "__init__.py")
