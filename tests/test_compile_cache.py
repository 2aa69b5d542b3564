"""ptycore.compile_cache: where the cache goes, when it is off, and that a second process reads
what the first compiled (JAX's cache-hit event)."""

import os
import subprocess
import sys
from pathlib import Path

from ptycore import compile_cache

PROGRAM = """
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
from ptycore import compile_cache
print("dir", compile_cache.enable())
f = jax.jit(lambda x: jnp.fft.ifft2(jnp.fft.fft2(x) * 2.0).real.sum())
print("value", float(f(jnp.ones((32, 32), jnp.complex64))))
print("hits", len(hits))
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "ptycore" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "users"))  # the user's own setting wins
    assert compile_cache.cache_dir() is None


def test_a_second_process_reads_the_first_ones_programs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({compile_cache.ENV: str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    first, second = _run(env), _run(env)
    assert first["dir"] == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())
    assert first["hits"] == "0" and int(second["hits"]) >= 1, (first, second)
    assert first["value"] == second["value"]
    off = _run({**env, compile_cache.ENV: "off"})
    assert off["dir"] == "None" and off["hits"] == "0"
