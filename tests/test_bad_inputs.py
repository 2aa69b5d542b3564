"""The bad-input corpus: every verb refuses bad input with one line, a non-zero exit, no output.

Each case runs the real CLI (``ptycore.cli.main`` in-process; a few through the ``ptycore``
console script in a subprocess) on small stores built once for the module, and asserts what a
user would check after a failed command:

* the exit code is not 0;
* stderr is exactly one line, ``ptycore VERB: error: ...``, with no traceback, and it names the
  offending path, key or option;
* nothing was written: no new file or directory anywhere in the fixture or the case's scratch
  directory (no ``<out>``, no ``<out>.partial``);
* nothing already there was changed: every existing file (stores, an existing output that was
  not to be overwritten) has the same bytes as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from _ptydata import write_raw_dataset

from ptycore.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_PLAN = {
    "name": "tiny", "seed": 0,
    "stages": [{"name": "main", "engine": "gradient", "iterations": 2, "batch_size": 16, "checkpoint_every": 1,
                "resample": {"slices": 1, "probe_modes": 1},
                "optimize": {"object_phase": {"optimizer": "adam", "lr": 0.02}}, "losses": {"single": 1.0}}],
}


def run_ok(argv: list[str]) -> None:
    assert main([*argv]) == 0, argv


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """raw patterns + meta, data.zarr, prepared.zarr (and a half), init.zarr, result.zarr, eval/."""
    d = tmp_path_factory.mktemp("corpus")
    write_raw_dataset(d, scan=(8, 8), n_det=32)
    (d / "plan.yaml").write_text(yaml.safe_dump(TINY_PLAN, sort_keys=False))
    run_ok(["ingest", "--patterns", str(d / "patterns.h5"), "--meta", str(d / "meta.yaml"),
            "--out", str(d / "data.zarr"), "--chunk-patterns", "16", "--quiet"])
    run_ok(["preprocess", "--data", str(d / "data.zarr"), "--out", str(d / "prepared.zarr"), "--quiet"])
    run_ok(["preprocess", "--data", str(d / "data.zarr"), "--half", "1", "--out", str(d / "half.zarr"), "--quiet"])
    run_ok(["init", "--data", str(d / "prepared.zarr"), "--out", str(d / "init.zarr"), "--quiet"])
    run_ok(["reconstruct", "--plan", str(d / "plan.yaml"), "--data", str(d / "prepared.zarr"),
            "--init", str(d / "init.zarr"), "--out", str(d / "result.zarr"), "--quiet"])
    run_ok(["evaluate", "--result", str(d / "result.zarr"), "--init", str(d / "init.zarr"),
            "--out", str(d / "eval"), "--no-figures", "--quiet"])
    (d / "notastore").mkdir()
    (d / "notastore" / "readme.txt").write_text("just a directory\n")
    return d


def snapshot(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and 'dir' for every directory) below ``roots``."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- helpers that make bad inputs in w/
def text(name: str, content: str) -> Callable[[Path, Path], None]:
    def make(d: Path, w: Path) -> None:
        (w / name).write_text(content)
    return make


def meta_with(**changes) -> Callable[[Path, Path], None]:
    def make(d: Path, w: Path) -> None:
        meta = yaml.safe_load((d / "meta.yaml").read_text())
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        (w / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return make


def plan_with(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def make(d: Path, w: Path) -> None:
        plan = json.loads(json.dumps(TINY_PLAN))
        edit(plan["stages"][0])
        (w / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return make


def store_copy(name: str, damage: str | None = None, target: str = "patterns/c/1/0/0"):
    """Copy the fixture's ``name`` into w/, then 'delete' or 'garble' one chunk file."""
    def make(d: Path, w: Path) -> None:
        shutil.copytree(d / name, w / name)
        chunk = w / name / target
        if damage == "delete":
            chunk.unlink()
        elif damage == "garble":
            size = chunk.stat().st_size
            chunk.write_bytes(np.random.default_rng(0).bytes(size))
    return make


def patterns_with_nan(d: Path, w: Path) -> None:
    with h5py.File(d / "patterns.h5") as f:
        data = f["patterns"][...]
    data[2, 3, 5, 5] = np.nan
    with h5py.File(w / "patterns.h5", "w") as f:
        f.create_dataset("patterns", data=data)


def garbage_checkpoint(d: Path, w: Path) -> None:
    ckpt = w / "r.zarr.partial" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "main.npz").write_bytes(b"PK\x03\x04 this is not a whole checkpoint")


def truncated_checkpoint(d: Path, w: Path) -> None:
    ckpt = w / "r.zarr.partial" / "checkpoints"
    ckpt.mkdir(parents=True)
    buf = w / "whole.npz"
    np.savez(buf, meta=np.asarray(json.dumps({"iteration": 0, "plan_hash": "x", "history": {}, "seconds": 0})),
             leaf0=np.zeros((64, 64), np.float32))
    (ckpt / "main.npz").write_bytes(buf.read_bytes()[:300])
    buf.unlink()


@dataclass
class Case:
    id: str
    argv: str  # formatted with d (fixture directory) and w (the case's scratch directory)
    expect: list[str]  # strings the error line must contain (formatted the same way)
    setup: Callable[[Path, Path], None] | None = None
    extra: list[str] = field(default_factory=list)


R = "reconstruct --plan {d}/plan.yaml --data {d}/prepared.zarr --init {d}/init.zarr"
CASES = [
    # ------------------------------------------------------------ simulate (refused before any compute)
    Case("simulate-scan-shape-0", "simulate --out {w}/sim --scan-shape 0 4", ["--scan-shape"]),
    Case("simulate-negative-dose", "simulate --out {w}/sim --dose -1", ["--dose"]),
    Case("simulate-unknown-crystal", "simulate --out {w}/sim --crystal Unobtainium", ["Unobtainium"]),
    Case("simulate-nan-energy", "simulate --out {w}/sim --energy-kv nan", ["--energy-kv"]),
    Case("simulate-three-steps", "simulate --out {w}/sim --scan-step-A 0.4 0.4 0.4", ["--scan-step-A"]),
    Case("simulate-existing-out", "simulate --out {d}/eval", ["{d}/eval", "already exists"]),
    Case("simulate-out-under-a-file", "simulate --out {d}/meta.yaml/sim", ["meta.yaml", "not a directory"]),
    # ------------------------------------------------------------ ingest
    Case("ingest-patterns-not-found", "ingest --patterns {w}/nope.h5 --meta {d}/meta.yaml --out {w}/o.zarr",
         ["{w}/nope.h5"]),
    Case("ingest-meta-not-found", "ingest --patterns {d}/patterns.h5 --meta {w}/nope.yaml --out {w}/o.zarr",
         ["{w}/nope.yaml"]),
    Case("ingest-nan-energy", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["{w}/meta.yaml", "energy_kv", "is not a number"], meta_with(energy_kv=float("nan"))),
    Case("ingest-misspelt-key", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["energy_kV", "did you mean 'energy_kv'"], meta_with(energy_kv=None, energy_kV=300.0)),
    Case("ingest-energy-a-word", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["energy_kv"], meta_with(energy_kv="high")),
    Case("ingest-scan-shape-mismatch", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["scan_shape"], meta_with(scan_shape=[5, 5])),
    Case("ingest-meta-not-yaml", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["{w}/meta.yaml", "YAML"], text("meta.yaml", "energy_kv: [300\n  : :\n")),
    Case("ingest-meta-a-list", "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["{w}/meta.yaml", "mapping"], text("meta.yaml", "- 300\n- 20\n")),
    Case("ingest-convergence-beyond-detector",
         "ingest --patterns {d}/patterns.h5 --meta {w}/meta.yaml --out {w}/o.zarr",
         ["convergence"], meta_with(convergence_mrad=150.0)),
    Case("ingest-patterns-garbage", "ingest --patterns {w}/junk.h5 --meta {d}/meta.yaml --out {w}/o.zarr",
         ["{w}/junk.h5"], text("junk.h5", "not an HDF5 file\n")),
    Case("ingest-no-such-dataset",
         "ingest --patterns {d}/patterns.h5:/entry/nope --meta {d}/meta.yaml --out {w}/o.zarr", ["nope"]),
    Case("ingest-nan-pattern", "ingest --patterns {w}/patterns.h5 --meta {d}/meta.yaml --out {w}/o.zarr",
         ["{w}/patterns.h5"], patterns_with_nan),
    Case("ingest-existing-out", "ingest --patterns {d}/patterns.h5 --meta {d}/meta.yaml --out {d}/data.zarr",
         ["{d}/data.zarr", "already exists"]),
    Case("ingest-zero-memory",
         "ingest --patterns {d}/patterns.h5 --meta {d}/meta.yaml --out {w}/o.zarr --max-memory-mb 0",
         ["--max-memory-mb"]),
    Case("ingest-zero-workers", "ingest --patterns {d}/patterns.h5 --meta {d}/meta.yaml --out {w}/o.zarr --workers 0",
         ["--workers"]),
    Case("ingest-out-under-a-file", "ingest --patterns {d}/patterns.h5 --meta {d}/meta.yaml --out {d}/meta.yaml/o",
         ["meta.yaml", "not a directory"]),
    # ------------------------------------------------------------ preprocess
    Case("preprocess-data-not-found", "preprocess --data {w}/nope.zarr --out {w}/o.zarr",
         ["{w}/nope.zarr", "not found"]),
    Case("preprocess-data-not-a-store", "preprocess --data {d}/notastore --out {w}/o.zarr",
         ["{d}/notastore", "not a zarr store"]),
    Case("preprocess-data-is-an-init-store", "preprocess --data {d}/init.zarr --out {w}/o.zarr",
         ["{d}/init.zarr", "patterns"]),
    Case("preprocess-config-unknown-key", "preprocess --data {d}/data.zarr --config {w}/pre.yaml --out {w}/o.zarr",
         ["{w}/pre.yaml", "detector_crap"], text("pre.yaml", "detector_crap: 16\n")),
    Case("preprocess-config-bin-not-dividing",
         "preprocess --data {d}/data.zarr --config {w}/pre.yaml --out {w}/o.zarr",
         ["detector_bin"], text("pre.yaml", "detector_bin: 5\n")),
    Case("preprocess-config-not-yaml", "preprocess --data {d}/data.zarr --config {w}/pre.yaml --out {w}/o.zarr",
         ["{w}/pre.yaml"], text("pre.yaml", "detector_crop: [16\n")),
    Case("preprocess-half-3", "preprocess --data {d}/data.zarr --half 3 --out {w}/o.zarr", ["--half"]),
    Case("preprocess-missing-chunk", "preprocess --data {w}/data.zarr --out {w}/o.zarr",
         ["{w}/data.zarr", "'patterns' chunk c/1/0/0 is missing"], store_copy("data.zarr", "delete")),
    Case("preprocess-corrupt-chunk", "preprocess --data {w}/data.zarr --out {w}/o.zarr",
         ["{w}/data.zarr", "'patterns' chunk c/1/0/0 is corrupt"], store_copy("data.zarr", "garble")),
    Case("preprocess-existing-out", "preprocess --data {d}/data.zarr --out {d}/prepared.zarr",
         ["{d}/prepared.zarr", "already exists"]),
    # ------------------------------------------------------------ init
    Case("init-data-not-found", "init --data {w}/nope.zarr --out {w}/o.zarr", ["{w}/nope.zarr"]),
    Case("init-data-is-a-result", "init --data {d}/result.zarr --out {w}/o.zarr", ["{d}/result.zarr"]),
    Case("init-config-unknown-key", "init --data {d}/prepared.zarr --config {w}/init.yaml --out {w}/o.zarr",
         ["{w}/init.yaml", "probe_mode"], text("init.yaml", "probe_mode: 3\n")),
    Case("init-config-zero-slices", "init --data {d}/prepared.zarr --config {w}/init.yaml --out {w}/o.zarr",
         ["{w}/init.yaml", "slices"], text("init.yaml", "slices: 0\n")),
    Case("init-from-missing-result", "init --data {d}/prepared.zarr --config {w}/init.yaml --out {w}/o.zarr",
         ["{w}/gone.zarr"], lambda d, w: (w / "init.yaml").write_text(f"from_result: {w}/gone.zarr\n")),
    Case("init-existing-out", "init --data {d}/prepared.zarr --out {d}/init.zarr", ["{d}/init.zarr", "already"]),
    Case("init-out-under-a-file", "init --data {d}/prepared.zarr --out {d}/plan.yaml/o.zarr",
         ["plan.yaml", "not a directory"]),
    # ------------------------------------------------------------ reconstruct
    Case("reconstruct-plan-not-found", "reconstruct --plan {w}/nope.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["{w}/nope.yaml", "not found"]),
    Case("reconstruct-plan-not-yaml", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["{w}/plan.yaml", "YAML"], text("plan.yaml", "stages: [\n")),
    Case("reconstruct-unknown-engine", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["stages[0].engine"],
         plan_with(lambda s: s.update(engine="magic"))),
    Case("reconstruct-start-beyond-iterations", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["stage 'main'", "optimize.probe.start 50", "2 iterations"],
         plan_with(lambda s: s["optimize"].update(probe={"lr": 0.01, "start": 50}))),
    Case("reconstruct-zero-data-weights", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["stage 'main'", "nothing fits the data"],
         plan_with(lambda s: s.update(losses={"single": 0.0, "tv_xy": 0.1}))),
    Case("reconstruct-nan-lr", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["stages[0].optimize.object_phase.lr", "is not a number"],
         plan_with(lambda s: s["optimize"]["object_phase"].update(lr=float("nan")))),
    Case("reconstruct-negative-weight", "reconstruct --plan {w}/plan.yaml --data {d}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["stages[0].losses.single.weight", ">= 0"],
         plan_with(lambda s: s.update(losses={"single": -1.0}))),
    Case("reconstruct-unknown-stage", R + " --out {w}/r.zarr --stage polish", ["polish", "main"]),
    Case("reconstruct-data-is-an-init", "reconstruct --plan {d}/plan.yaml --data {d}/init.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["{d}/init.zarr", "patterns"]),
    Case("reconstruct-init-of-other-data", "reconstruct --plan {d}/plan.yaml --data {d}/half.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["{d}/init.zarr", "64 positions", "{d}/half.zarr"]),
    Case("reconstruct-data-missing-chunk", "reconstruct --plan {d}/plan.yaml --data {w}/prepared.zarr "
         "--init {d}/init.zarr --out {w}/r.zarr", ["{w}/prepared.zarr", "is missing"],
         store_copy("prepared.zarr", "delete", "patterns/c/0/0/0")),
    Case("reconstruct-existing-out", R + " --out {d}/result.zarr", ["{d}/result.zarr", "already exists"]),
    Case("reconstruct-garbage-checkpoint", R + " --out {w}/r.zarr --resume",
         ["{w}/r.zarr.partial/checkpoints/main.npz", "checkpoint is damaged"], garbage_checkpoint),
    Case("reconstruct-truncated-checkpoint", R + " --out {w}/r.zarr --resume",
         ["{w}/r.zarr.partial/checkpoints/main.npz", "checkpoint is damaged"], truncated_checkpoint),
    # ------------------------------------------------------------ evaluate
    Case("evaluate-result-not-found", "evaluate --result {w}/nope.zarr --out {w}/ev", ["{w}/nope.zarr"]),
    Case("evaluate-result-is-data", "evaluate --result {d}/data.zarr --out {w}/ev", ["{d}/data.zarr", "object_phase"]),
    Case("evaluate-truth-is-prepared", "evaluate --result {d}/result.zarr --truth {d}/prepared.zarr --out {w}/ev",
         ["{d}/prepared.zarr"]),
    Case("evaluate-half1-alone", "evaluate --result {d}/result.zarr --half1 {d}/result.zarr --out {w}/ev",
         ["--half2"]),
    Case("evaluate-negative-margin", "evaluate --result {d}/result.zarr --margin-A -1 --out {w}/ev", ["margin"]),
    Case("evaluate-corrupt-result", "evaluate --result {w}/result.zarr --out {w}/ev",
         ["{w}/result.zarr", "'object_phase' chunk", "corrupt"],
         store_copy("result.zarr", "garble", "object_phase/c/0/0/0/0")),
    Case("evaluate-existing-out", "evaluate --result {d}/result.zarr --out {d}/eval", ["{d}/eval", "already exists"]),
    # ------------------------------------------------------------ aggregate
    Case("aggregate-nothing", "aggregate --out {w}/agg", ["nothing to aggregate"]),
    Case("aggregate-failures-not-found", "aggregate --failures {w}/nope.json --out {w}/agg", ["{w}/nope.json"]),
    Case("aggregate-failures-not-json", "aggregate --failures {w}/f.json --out {w}/agg", ["{w}/f.json"],
         text("f.json", "{not json")),
    Case("aggregate-study-not-found", "aggregate --evals {d}/eval --study {w}/nope.yaml --out {w}/agg",
         ["{w}/nope.yaml"]),
    Case("aggregate-existing-out", "aggregate --evals {d}/eval --out {d}/eval", ["{d}/eval", "already exists"]),
    # ------------------------------------------------------------ inspect
    Case("inspect-not-found", "inspect {w}/nope.zarr", ["{w}/nope.zarr", "not found"]),
    Case("inspect-a-file", "inspect {d}/meta.yaml", ["{d}/meta.yaml", "not a zarr store"]),
    Case("inspect-a-directory-of-stores", "inspect {d}", ["{d}", "inspect one of those"]),
    Case("inspect-missing-chunk", "inspect {w}/init.zarr", ["{w}/init.zarr", "'probe' chunk c/0/0/0 is missing"],
         store_copy("init.zarr", "delete", "probe/c/0/0/0")),
    Case("plans-unknown-name", "plans nosuch", ["nosuch", "no such plan"]),
    Case("plans-data-without-name", "plans --data {d}/prepared.zarr", ["--data", "plan NAME"]),
    Case("tune-space-not-found", "tune --space {w}/nope.yaml --out {w}/study", ["{w}/nope.yaml", "not found"]),
    Case("tune-a-plan-as-space", "tune --space {d}/plan.yaml --out {w}/study", ["{d}/plan.yaml", "plan"]),
    Case("launch-no-command", "launch -n 2", ["no command to launch"]),
    Case("launch-zero-processes", "launch -n 0 -- inspect {d}/init.zarr", ["-n", ">= 1"]),
    Case("prior-train-data-not-found", "prior train --data {w}/nope.zarr --out {w}/p", ["{w}/nope.zarr", "not found"]),
    Case("prior-train-data-is-an-init", "prior train --data {d}/init.zarr --out {w}/p", ["{d}/init.zarr", "patches"]),
    Case("prior-data-bad-patch", "prior data --config {w}/prior.yaml --out {w}/d.zarr",
         ["{w}/prior.yaml", "data.patch_px", "multiple of 8"], text("prior.yaml", "data:\n  patch_px: 30\n")),
    Case("prior-data-perovskite-prototype", "prior data --config {w}/prior.yaml --out {w}/d.zarr",
         ["data.prototypes", "perovskite"], text("prior.yaml", "data:\n  prototypes: [fcc, perovskite]\n")),
    Case("prior-train-bad-sigma", "prior train --config {w}/prior.yaml --data {w}/nope.zarr --out {w}/p",
         ["{w}/prior.yaml", "sigma_max_factor"], text("prior.yaml", "train:\n  sigma_max_factor: 0.001\n")),
    Case("prior-train-zero-steps", "prior train --data {w}/nope.zarr --out {w}/p --steps 0", ["--steps", ">= 1"]),
    Case("prior-show-not-found", "prior show {w}/nope.eqx", ["{w}/nope.json", "not found"]),
    Case("inspect-verify-corrupt", "inspect --verify {w}/data.zarr", ["{w}/data.zarr", "c/1/0/0 is corrupt"],
         store_copy("data.zarr", "garble")),
]


def refused(d: Path, w: Path, case: Case, run) -> str:
    """Set the case up, run it with ``run(argv) -> (rc, stderr)``, check the contract; the error line."""
    if case.setup is not None:
        case.setup(d, w)
    argv = case.argv.format(d=d, w=w).split()
    before = snapshot(d, w)
    rc, err = run(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, (case.id, err)
    assert len(lines) == 1, (case.id, err)
    verb = argv[0]
    assert lines[0].startswith(f"ptycore {verb}: error: "), (case.id, lines[0])
    for want in case.expect:
        assert want.format(d=d, w=w) in lines[0], (case.id, want.format(d=d, w=w), lines[0])
    assert snapshot(d, w) == before, f"{case.id}: files were written, changed or removed"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_with_one_line_and_nothing_written(case, d, tmp_path, capsys):
    def run(argv):
        capsys.readouterr()
        rc = main(argv)
        return rc, capsys.readouterr().err

    refused(d, tmp_path, case, run)


def test_corpus_covers_every_verb_with_forty_cases():
    from ptycore.cli import VERBS

    assert len(CASES) >= 40
    assert {c.argv.split()[0] for c in CASES} == set(VERBS)


SUBPROCESS_CASES = ["ingest-nan-energy", "preprocess-missing-chunk", "evaluate-corrupt-result",
                    "reconstruct-garbage-checkpoint"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_refused_by_the_console_script(case_id, d, tmp_path):
    """The same contract through the installed ``ptycore`` command (a real process: exit status,
    nothing else on stderr, e.g. no library warnings)."""
    case = next(c for c in CASES if c.id == case_id)
    exe = shutil.which("ptycore") or pytest.skip("the ptycore console script is not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

    def run(argv):
        proc = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=300, env=env)
        return proc.returncode, proc.stderr

    refused(d, tmp_path, case, run)
