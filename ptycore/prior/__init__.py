"""The learned crystal prior: training data (:mod:`.data`), the denoiser (:mod:`.model`) and its
training (:mod:`.train`). See docs/prior.md."""
