"""The learned crystal prior (issue 20): training data and the denoiser (``data``, ``model``,
``train``), and its use in reconstruction (``guidance``: the RED ``prior`` loss term and the
denoiser on the prior's grid; ``ptycore.recon.engines.dps``: diffusion posterior sampling;
``check``: how far a prior moved a result)."""
