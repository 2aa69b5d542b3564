"""Reconstruction: state, losses, constraints, grouping, engines and the stage runner."""
