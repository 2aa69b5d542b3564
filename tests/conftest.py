"""Tests that call ptycore in process share JAX's compilation cache with the ``ptycore`` processes
they start (ptycore.compile_cache; `make test` points it at a folder of its own)."""

from ptycore import compile_cache

compile_cache.enable()
