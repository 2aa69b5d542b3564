"""ptycore: workflow-managed electron ptychography with JAX solvers."""

__version__ = "0.1.0"
