"""JAX's persistent compilation cache: a second run of a command compiles nothing the first compiled, the
images do not depend on whether an executable was compiled or loaded, and `--compilation_cache=off` writes
nothing."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "snapshot_small.pkl")


def _sample(outdir, *flags, env=None):
    args = [sys.executable, "main.py", "--mode=sample", f"--checkpoint={SNAPSHOT}", "--seeds=0-3", "--batch=4",
            "--steps=3", f"--outdir={outdir}", *flags]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return {p.name: p.read_bytes() for p in sorted((outdir / "000000").iterdir())}


def _entries(cache):
    return {name for name in os.listdir(cache) if name.endswith("-cache")}


def test_second_run_compiles_nothing_and_off_writes_nothing(tmp_path):
    cache = tmp_path / "cache"  # the default folder, as the variable names it: on unless turned off
    first = _sample(tmp_path / "a", env={"EDM_JAX_COMPILATION_CACHE": str(cache)})
    compiled = _entries(cache)
    assert len(compiled) >= 2  # at least the sampler and the uint8 conversion
    second = _sample(tmp_path / "b", f"--compilation_cache={cache}")
    assert _entries(cache) == compiled  # every program of the second run came from the cache
    assert second == first  # loaded executables give the compiled ones' bytes

    empty = tmp_path / "empty"
    empty.mkdir()
    _sample(tmp_path / "c", "--compilation_cache=off", env={"EDM_JAX_COMPILATION_CACHE": str(empty)})
    assert os.listdir(empty) == []
