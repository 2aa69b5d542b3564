"""The learned crystal prior's denoiser: a noise-level-conditioned U-Net (equinox), and its files.

``denoiser(x, sigma) -> x_hat``: ``x`` is ONE per-slice phase patch ``(H, W)`` float32 in radians
(``H``, ``W`` multiples of ``2**levels``; fully convolutional with circular padding, so any such
size works), ``sigma`` the standard deviation (rad) of the Gaussian noise on ``x``; ``x_hat`` is the
estimate of the clean patch (the posterior mean E[x0 | x] the training objective targets). Pure,
jit-able and vmap-able over ``x`` and ``sigma``.

Preconditioning (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
models", EDM). With ``x`` and ``sigma`` divided by the phase scale ``s`` (the RMS phase of the
training patches, so the clean data have ``sigma_data = 1``)::

    x_hat / s = c_skip(sigma) x / s + c_out(sigma) F(c_in(sigma) x / s, c_noise(sigma))
    c_skip = 1 / (sigma² + 1),  c_out = sigma / sqrt(sigma² + 1),  c_in = 1 / sqrt(sigma² + 1),
    c_noise = log(sigma) / 4

so the network ``F`` always sees a unit-variance input and predicts a unit-variance target: at
small ``sigma`` it predicts (minus) the noise, at large ``sigma`` the clean patch. This is what
makes one network accurate over two decades of noise.

Network ``F``: the U-Net of :mod:`ptycore.recon.networks` (its :class:`ConvBlock`: two 3×3
circular convolutions → group norm → ReLU; 2×2 max-pool; stride-2 transposed convolutions; skip
connections; a 1×1 head), ``levels`` levels of ``filters · 2^i`` channels, with the noise level
brought in by FiLM: ``c_noise`` → sinusoidal features → a 2-layer MLP embedding → per block a
linear map to a per-channel scale and shift applied to the block's output (``h (1 + a) + b``).
``levels=3, filters=16`` has ~0.5 M parameters (:func:`parameter_count`).

Files (:func:`save_prior`, :func:`load_prior`): ``NAME.eqx`` (the weights,
``eqx.tree_serialise_leaves``) beside ``NAME.json`` (:class:`PriorInfo`: the grid the prior was
trained for, its noise range, the architecture, and the provenance). ``load_prior("shipped")``
(or ``None``) loads :data:`SHIPPED_PRIOR`, the prior shipped with the package.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from ptycore.errors import InvalidData
from ptycore.recon.networks import ConvBlock, _max_pool, parameter_count

#: the weights shipped with the package (``crystal-prior.eqx`` + ``crystal-prior.json``)
SHIPPED_PRIOR = Path(__file__).resolve().parent / "weights" / "crystal-prior.eqx"
#: sinusoidal features of c_noise fed to the embedding MLP
NOISE_FEATURES = 16
#: width of the noise embedding
EMBED_WIDTH = 64
#: format of the .json file
INFO_FORMAT = 1

__all__ = ["SHIPPED_PRIOR", "Denoiser", "PriorInfo", "load_prior", "parameter_count", "save_prior"]


@dataclass(frozen=True)
class PriorInfo:
    """What a prior was trained for and how (the ``.json`` beside its weights)."""

    pixel_size_A: float
    slice_thickness_A: float
    patch_px: int
    sigma_min_rad: float
    sigma_max_rad: float
    phase_scale_rad: float
    levels: int = 3
    filters: int = 16
    energy_kv: float = 300.0
    parameters: int = 0
    provenance: dict = field(default_factory=dict, hash=False, compare=False)

    def to_record(self) -> dict:
        return {"format": INFO_FORMAT, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict, where: str) -> PriorInfo:
        if not isinstance(record, dict) or record.get("format") != INFO_FORMAT:
            raise InvalidData(f"{where}: not a ptycore prior info file (format {INFO_FORMAT} expected)")
        names = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in record.items() if k in names})
        except TypeError as err:
            raise InvalidData(f"{where}: incomplete prior info ({err})") from None


def _noise_features(c_noise):
    freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), NOISE_FEATURES // 2))
    angles = c_noise * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class Denoiser(eqx.Module):
    """The noise-conditioned U-Net denoiser of the module docstring."""

    down: list
    bottom: ConvBlock
    up: list
    decode: list
    head: eqx.nn.Conv2d
    embed: eqx.nn.MLP
    film: list  # one Linear(EMBED_WIDTH -> 2 * channels) per block: down..., bottom, decode...
    levels: int = eqx.field(static=True)
    filters: int = eqx.field(static=True)
    phase_scale_rad: float = eqx.field(static=True)

    def __init__(self, levels: int = 3, filters: int = 16, phase_scale_rad: float = 1.0, *, key):
        keys = iter(jax.random.split(key, 6 * levels + 6))
        widths = [filters * 2**i for i in range(levels)]
        down, previous = [], 1
        for width in widths:
            down.append(ConvBlock(previous, width, "group", key=next(keys)))
            previous = width
        self.down = down
        self.bottom = ConvBlock(previous, previous, "group", key=next(keys))
        up, decode = [], []
        for width in reversed(widths):
            up.append(eqx.nn.ConvTranspose2d(previous, width, 2, stride=2, key=next(keys)))
            decode.append(ConvBlock(2 * width, width, "group", key=next(keys)))
            previous = width
        self.up, self.decode = up, decode
        head = eqx.nn.Conv2d(previous, 1, 1, key=next(keys))
        # a zero head: F = 0 at initialisation, i.e. D starts as the optimal linear shrinkage c_skip x
        self.head = eqx.tree_at(lambda h: (h.weight, h.bias), head, (jnp.zeros_like(head.weight),
                                                                    jnp.zeros_like(head.bias)))
        self.embed = eqx.nn.MLP(NOISE_FEATURES, EMBED_WIDTH, EMBED_WIDTH, depth=2, activation=jax.nn.silu,
                                key=next(keys))
        film_widths = widths + [widths[-1]] + list(reversed(widths))
        self.film = [eqx.nn.Linear(EMBED_WIDTH, 2 * w, key=next(keys)) for w in film_widths]
        self.levels, self.filters = int(levels), int(filters)
        self.phase_scale_rad = float(phase_scale_rad)

    def network(self, x, c_noise):
        """``F``: (1, H, W) preconditioned input and the scalar c_noise -> (1, H, W)."""
        emb = jax.nn.silu(self.embed(_noise_features(c_noise)))
        films = iter(self.film)

        def modulate(h):
            a, b = jnp.split(next(films)(emb), 2)
            return h * (1 + a[:, None, None]) + b[:, None, None]

        skips = []
        for block in self.down:
            x = modulate(block(x))
            skips.append(x)
            x = _max_pool(x)
        x = modulate(self.bottom(x))
        for up, block, skip in zip(self.up, self.decode, reversed(skips), strict=True):
            x = modulate(block(jnp.concatenate([up(x), skip], axis=0)))
        return self.head(x)

    def __call__(self, x, sigma):
        x = jnp.asarray(x, jnp.float32)
        scale = self.phase_scale_rad
        s = jnp.asarray(sigma, jnp.float32) / scale
        s = jnp.maximum(s, 1e-8)
        c_skip = 1.0 / (s**2 + 1.0)
        c_out = s / jnp.sqrt(s**2 + 1.0)
        c_in = 1.0 / jnp.sqrt(s**2 + 1.0)
        xn = x / scale
        f = self.network((c_in * xn)[None], jnp.log(s) / 4.0)[0]
        return ((c_skip * xn + c_out * f) * scale).astype(x.dtype)


# ---------------------------------------------------------------- files
def _pair(path: str | Path) -> tuple[Path, Path]:
    """(weights, info) paths of ``path``: ``NAME.eqx``/``NAME.json``, or ``DIR/prior.{eqx,json}``."""
    path = Path(path)
    if path.suffix in (".eqx", ".json"):
        return path.with_suffix(".eqx"), path.with_suffix(".json")
    return path / "prior.eqx", path / "prior.json"


def save_prior(path: str | Path, denoiser: Denoiser, info: PriorInfo) -> tuple[Path, Path]:
    """Write the weights and the info (each atomically: a temporary file renamed into place)."""
    weights, meta = _pair(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = weights.with_name(weights.name + ".tmp"), meta.with_name(meta.name + ".tmp")
    eqx.tree_serialise_leaves(tmp_w, denoiser)
    tmp_m.write_text(json.dumps(info.to_record(), indent=1, default=str) + "\n")
    tmp_w.replace(weights)
    tmp_m.replace(meta)
    return weights, meta


def load_prior(path: str | Path | None = None) -> tuple[Denoiser, PriorInfo]:
    """The denoiser and its info from ``path`` (``NAME.eqx``, ``NAME.json``, a directory holding
    ``prior.eqx``, or ``None``/``"shipped"`` for :data:`SHIPPED_PRIOR`). A missing or damaged
    file -> :class:`InvalidData` naming it."""
    if path is None or str(path) == "shipped":
        path = SHIPPED_PRIOR
    weights, meta = _pair(path)
    for f in (meta, weights):
        if not f.is_file():
            raise InvalidData(f"{f}: prior file not found")
    try:
        record = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidData(f"{meta}: not valid JSON ({err.__class__.__name__})") from None
    info = PriorInfo.from_record(record, str(meta))
    # the skeleton only (shapes and dtypes): no weights are initialised, nothing is computed
    like = eqx.filter_eval_shape(Denoiser, info.levels, info.filters, info.phase_scale_rad, key=jax.random.PRNGKey(0))
    try:
        denoiser = eqx.tree_deserialise_leaves(weights, like)
    except Exception as err:  # equinox/numpy raise several types for a damaged or mismatched file
        raise InvalidData(f"{weights}: damaged, or not the weights of a levels={info.levels}, "
                          f"filters={info.filters} prior ({err.__class__.__name__})") from None
    return denoiser, info
