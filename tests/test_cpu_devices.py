"""Splitting a CPU host into JAX devices (edm_jax/cpu_devices.py) and main.py's --cpu_devices."""

import os
import re
import subprocess
import sys

import pytest

from edm_jax import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


@pytest.mark.parametrize("cores, batch, expected", [
    (1, 32, 1), (2, 32, 2), (3, 32, 2), (6, 32, 4), (16, 32, 8), (16, None, 8), (64, 512, 8),
    (8, 12, 4), (8, 6, 2), (8, 7, 1), (2, 1, 1), (5, None, 4)])
def test_auto_is_the_largest_power_of_two_that_fits_the_cores_and_divides_the_batch(cores, batch, expected):
    count = cpu_devices.choose("auto", cores, batch)
    assert count == expected
    assert count <= min(cores, cpu_devices.MAX_AUTO) and (batch is None or batch % count == 0)
    assert cpu_devices.choose(" AUTO ", cores, batch) == count


def test_an_explicit_count_is_taken_as_given():
    assert cpu_devices.choose("3", cores=2, batch=32) == 3  # the user's word, even past the cores
    assert cpu_devices.choose(5, cores=64) == 5


@pytest.mark.parametrize("bad", ["0", "-2", "two", "", "1.5"])
def test_a_bad_count_is_one_sentence(bad):
    with pytest.raises(ValueError, match=r"--cpu_devices=.*positive number of devices, or auto"):
        cpu_devices.choose(bad, cores=2)


def test_the_environment_fixes_the_count(monkeypatch):
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    assert cpu_devices.preset_count() is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --x=1 "
                                    "--xla_force_host_platform_device_count=3")
    assert cpu_devices.preset_count() == 3  # XLA reads the last one
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "6")
    assert cpu_devices.preset_count() == 6


def _env_without_a_count(**extra):
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = _COUNT_FLAG.sub("", env.get("XLA_FLAGS", ""))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


_PROBE = ("import jax; from edm_jax import cpu_devices; n = cpu_devices.split_host(2); "
          "print(n, jax.device_count(), flush=True); cpu_devices.split_host(2); cpu_devices.split_host(3)")


def test_split_host_makes_the_devices_and_refuses_once_jax_started():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO,
                          env=_env_without_a_count(), timeout=120)
    assert done.stdout.split() == ["2", "2"]
    # After the backend started, the same count is a no-op and another count a clear error, not a silent one.
    assert done.returncode != 0 and "cannot split the CPU into 3 devices: a JAX backend already started" in done.stderr


def test_split_host_leaves_a_count_the_environment_set():
    env = _env_without_a_count()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=3"
    done = subprocess.run([sys.executable, "-c", _PROBE.rsplit(";", 2)[0]], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "3"]


def _main(*args, env):
    return subprocess.Popen([sys.executable, "main.py", "--config=configs/quickstart.py", "--mode=train", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_main_trains_on_the_auto_split(tmp_path):
    """With no count in the environment, main.py's train run shards its batch over auto's devices."""
    expected = cpu_devices.choose("auto", cpu_devices.usable_cores(), 32)  # the quickstart's batch
    proc = _main(f"--workdir={tmp_path}", env=_env_without_a_count(JAX_PLATFORMS="cpu"))
    try:
        for line in proc.stdout:
            if " devices: " in line:
                break
        else:
            pytest.fail("main.py ended without reporting its devices")
    finally:
        proc.kill()
        proc.wait()
    per_device = 32 // expected
    assert f"devices: {expected} x cpu in 1 process(es); global batch 32 = {per_device} per device" in line


def test_main_reports_a_count_that_does_not_divide_the_batch(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--cpu_devices=3", env=_env_without_a_count(JAX_PLATFORMS="cpu"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in out
    assert "error: train.batch_size=32 is not divisible by the 3 devices; set it to a multiple of 3." in out
    proc = _main(f"--workdir={tmp_path}", "--cpu_devices=none", env=_env_without_a_count(JAX_PLATFORMS="cpu"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "error: --cpu_devices='none': give a positive number of devices, or auto" in out
