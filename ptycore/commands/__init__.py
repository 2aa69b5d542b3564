"""CLI verbs: one module per verb (see ptycore.cli)."""
