"""host_memory.keep_freed_memory: XLA:CPU's scratch buffers stop costing fresh pages on every call."""

import os
import subprocess
import sys

import pytest

from edm_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program with a 64 MB intermediate (x @ x.T, 4096 x 4096 floats), allocated and freed on every call as the
# quickstart's train step does with its 69 MB of scratch; prints the median minor page faults per call.
# Runs in its own process: the allocator is set before JAX starts its threads, as main.py does.
PROBE = """
import os, resource, statistics, sys
sys.path.insert(0, {repo!r})
from edm_jax import host_memory
print("applied", host_memory.keep_freed_memory(force=True))
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))  # x @ x.T: a 64 MB intermediate
x = jnp.linspace(0, 1, 1 << 19).reshape(4096, 128)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("faults", statistics.median(faults[3:]))
"""


def _probe(setting):
    env = {**os.environ, host_memory.ENV: setting, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[out.index("applied") + 1] == "True", float(out[out.index("faults") + 1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_freed_scratch_is_reused_instead_of_faulted_in_again():
    applied_off, faults_off = _probe("off")
    applied_on, faults_on = _probe("on")
    assert not applied_off and applied_on
    # Without it every call maps the block afresh: one fault per 4 KiB page of 64 MB (16,384; measured 16,385).
    assert faults_off > 8000, faults_off
    assert faults_on <= faults_off / 20, (faults_on, faults_off)


def test_cpu_detection_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu()
    assert not host_memory.keep_freed_memory()  # an accelerator run keeps glibc's defaults
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()


def test_off_switch(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "off")
    assert not host_memory.keep_freed_memory(force=True)
