"""Datasets: those listed in the config, and those found in the nightly inbox (config ``inbox``).

A dataset is a mapping like its config entry: ``name``, and either ``simulate`` (options of
``ptycore simulate``) or ``patterns`` + ``metadata``; plus ``source`` ("config" or "inbox").
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ptycore.pipeline.config import METADATA_SUFFIXES, PATTERN_SUFFIXES, ConfigError


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def newest_change(*paths: Path) -> float:
    """Latest modification time of the paths and, for directories (.zarr), everything inside."""
    times = []
    for p in paths:
        times.append(p.stat().st_mtime)
        if p.is_dir():
            times += [q.stat().st_mtime for q in p.rglob("*")]
    return max(times)


def inbox_datasets(pattern: str, hdf5_dataset: str | None = None, settle_minutes: float = 0, *,
                   now: float | None = None, note: Callable[[str], None] = _note) -> dict[str, dict]:
    """Datasets found by the inbox glob: a directory with one patterns file and one metadata YAML,
    or a patterns file with <stem>.yaml / <stem>.yml beside it. Anything else is skipped, with a
    note, and so is a dataset whose files changed in the last settle_minutes (still arriving)."""
    found: dict[str, dict] = {}
    now = time.time() if now is None else now
    for match in sorted(glob.glob(os.path.expanduser(pattern))):
        m = Path(match)
        if m.is_dir() and m.suffix.lower() != ".zarr":
            entries = sorted(m.iterdir())
            patterns = [e for e in entries if e.suffix.lower() in PATTERN_SUFFIXES]
            metas = [e for e in entries if e.suffix.lower() in METADATA_SUFFIXES]
            if len(patterns) != 1 or len(metas) != 1:
                note(f"inbox: skipping {m}: want one patterns file ({', '.join(PATTERN_SUFFIXES)}) and one "
                     f"metadata YAML, found {len(patterns)} and {len(metas)}")
                continue
            name, patterns_path, meta = m.name, patterns[0], metas[0]
        elif m.suffix.lower() in PATTERN_SUFFIXES:
            metas = [m.with_suffix(s) for s in METADATA_SUFFIXES if m.with_suffix(s).is_file()]
            if not metas:
                note(f"inbox: skipping {m}: no {m.stem}.yaml beside it")
                continue
            name, patterns_path, meta = m.stem, m, metas[0]
        else:
            continue
        age_minutes = (now - newest_change(patterns_path, meta)) / 60
        if age_minutes < settle_minutes:
            note(f"inbox: leaving {m} for the next run: changed {age_minutes:.0f} min ago "
                 f"(inbox_settle_minutes: {settle_minutes})")
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-") or "dataset"
        if name in found:
            note(f"inbox: skipping {m}: dataset name {name!r} already taken by {found[name]['patterns']}")
            continue
        spec = f"{patterns_path.resolve()}:{hdf5_dataset}" if hdf5_dataset else str(patterns_path.resolve())
        found[name] = {"name": name, "patterns": spec, "metadata": str(meta.resolve()), "source": "inbox"}
    return found


def collect_datasets(config: dict, note: Callable[[str], None] = _note) -> dict[str, dict]:
    """The config's datasets, then the inbox's (an inbox dataset named like a config one is skipped)."""
    datasets: dict[str, dict] = {}
    for ds in config.get("datasets") or []:
        if ds["name"] in datasets:
            raise ConfigError(f"datasets: name {ds['name']!r} appears twice")
        datasets[ds["name"]] = dict(ds, source="config")
    if config.get("inbox"):
        inbox = inbox_datasets(config["inbox"], config.get("inbox_hdf5_dataset"),
                               config.get("inbox_settle_minutes", 10), note=note)
        for name, ds in inbox.items():
            if name in datasets:
                note(f"inbox: skipping {ds['patterns']}: dataset {name!r} is also in config")
                continue
            datasets[name] = ds
    return datasets
