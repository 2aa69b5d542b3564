"""Regression tests for the failures a night batch must survive (issue 14, failures 7, 8, 10, 11).

7: a missing zarr chunk reads as zeros -> every verb refuses a store whose manifest lists a file
   that is gone; a damaged chunk is named after the read fails.
8: a full or read-only file system, a corrupt chunk, a damaged checkpoint -> one line, no
   traceback, no temporary files left (a full disk used to leave checkpoints/*.tmp.npz).
10: ``--overwrite`` keeps the old output until the new one is in place.
11: a parameter start beyond the stage's iterations, all data-fit weights 0, a NaN energy.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from _ptydata import sha256, write_raw_dataset

import ptycore.recon.runner as runner
from ptycore.cli import main
from ptycore.errors import InvalidArgument, InvalidData, InvalidPlan, StorageError
from ptycore.plan import parse_plan
from ptycore.store import (
    MANIFEST_KEY,
    atomic_output,
    check_writable,
    create_store,
    open_store,
    partial_path,
    seal_store,
    verify_store,
    write_array,
)

PLAN = {"name": "tiny", "seed": 0,
        "stages": [{"name": "main", "engine": "gradient", "iterations": 2, "batch_size": 16, "checkpoint_every": 1,
                    "resample": {"slices": 1, "probe_modes": 1},
                    "optimize": {"object_phase": {"optimizer": "adam", "lr": 0.02}}, "losses": {"single": 1.0}}]}


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(argv)
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    write_raw_dataset(d, scan=(8, 8), n_det=32)
    (d / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    for argv in (["ingest", "--patterns", f"{d}/patterns.h5", "--meta", f"{d}/meta.yaml", "--out", f"{d}/data.zarr",
                  "--chunk-patterns", "16"],
                 ["preprocess", "--data", f"{d}/data.zarr", "--out", f"{d}/prepared.zarr"],
                 ["init", "--data", f"{d}/prepared.zarr", "--out", f"{d}/init.zarr"],
                 ["reconstruct", "--plan", f"{d}/plan.yaml", "--data", f"{d}/prepared.zarr", "--init",
                  f"{d}/init.zarr", "--out", f"{d}/result.zarr"]):
        assert main([*argv, "--quiet"]) == 0
    return d


def leftovers(directory: Path) -> list[str]:
    """Temporary or half-written things a failed verb must not leave behind."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if ".partial" in p.name or ".tmp" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- failure 7: whole stores
def test_every_written_store_lists_its_files_and_opens_checked(chain):
    for name in ("data.zarr", "prepared.zarr", "init.zarr", "result.zarr"):
        store = chain / name
        files = zarr.open_group(str(store), mode="r").attrs[MANIFEST_KEY]["files"]
        on_disk = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()} - {"zarr.json"}
        assert set(files) == on_disk, name
        assert verify_store(store) == len(on_disk)


def test_a_deleted_chunk_is_refused_by_every_verb_that_reads_the_store(chain, tmp_path, capsys):
    """The issue's case: one chunk of data.zarr gone (16 patterns) used to read as zeros."""
    data = tmp_path / "data.zarr"
    shutil.copytree(chain / "data.zarr", data)
    (data / "patterns" / "c" / "2" / "0" / "0").unlink()
    rc, lines = run(["preprocess", "--data", str(data), "--out", str(tmp_path / "p.zarr")], capsys)
    assert rc == 2 and len(lines) == 1
    assert lines[0] == (f"ptycore preprocess: error: {data}: array 'patterns' chunk c/2/0/0 is missing: the store "
                        "is incomplete (deleted or lost files would read as zeros); write it again")
    prepared = tmp_path / "prepared.zarr"
    shutil.copytree(chain / "prepared.zarr", prepared)
    (prepared / "positions_A" / "c" / "0" / "0").unlink()
    for argv in (["init", "--data", str(prepared), "--out", str(tmp_path / "i.zarr")],
                 ["reconstruct", "--plan", str(chain / "plan.yaml"), "--data", str(prepared), "--init",
                  str(chain / "init.zarr"), "--out", str(tmp_path / "r.zarr")]):
        rc, lines = run(argv, capsys)
        assert rc == 2 and len(lines) == 1 and "'positions_A' chunk c/0/0 is missing" in lines[0], lines
    assert leftovers(tmp_path) == []


def test_chunks_never_written_are_not_missing(tmp_path):
    """zarr does not write a chunk that is all fill value (zeros): the manifest lists only what
    exists, so such an array reads back as zeros, correctly."""
    with atomic_output(tmp_path / "s.zarr") as tmp:
        g = create_store(tmp)
        write_array(g, "zeros", np.zeros((4, 4), np.float32))
        write_array(g, "ones", np.ones((4, 4), np.float32))
    g = open_store(tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr" / "zeros" / "c").exists()
    assert np.all(g["zeros"][...] == 0) and np.all(g["ones"][...] == 1)


def test_a_store_without_manifest_opens_unchecked(tmp_path):
    g = create_store(tmp_path / "hand.zarr")
    write_array(g, "x", np.arange(4.0))
    assert verify_store(tmp_path / "hand.zarr") == 0
    assert open_store(tmp_path / "hand.zarr")["x"].shape == (4,)


def test_verify_names_a_truncated_chunk(chain, tmp_path):
    store = tmp_path / "init.zarr"
    shutil.copytree(chain / "init.zarr", store)
    chunk = store / "probe" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    open_store(store)  # opening checks presence only (cheap)
    with pytest.raises(InvalidData, match=r"init.zarr: array 'probe' chunk c/0/0/0 is corrupt \(10 bytes, written"):
        verify_store(store)


def test_a_garbled_chunk_is_named_when_it_is_read(chain, tmp_path, capsys):
    store = tmp_path / "prepared.zarr"
    shutil.copytree(chain / "prepared.zarr", store)
    chunk = store / "patterns" / "c" / "0" / "0" / "0"
    chunk.write_bytes(bytes(255 - b for b in chunk.read_bytes()))  # same size, every byte changed
    rc, lines = run(["init", "--data", str(store), "--out", str(tmp_path / "i.zarr")], capsys)
    assert rc == StorageError.exit_code and len(lines) == 1
    assert f"{store}: array 'patterns' chunk c/0/0/0 is corrupt" in lines[0]
    assert leftovers(tmp_path) == []


def test_inspect_reports_and_verifies_the_manifest(chain, capsys):
    n = len(zarr.open_group(str(chain / "data.zarr"), mode="r").attrs[MANIFEST_KEY]["files"])
    capsys.readouterr()
    assert main(["inspect", str(chain / "data.zarr")]) == 0
    out = capsys.readouterr().out
    assert f"manifest: {n} files, all present" in out and MANIFEST_KEY not in out
    assert main(["inspect", "--verify", str(chain / "data.zarr")]) == 0
    assert f"verified: {n} files match their sizes and CRC-32" in capsys.readouterr().out


# ---------------------------------------------------------------- failure 8: full and read-only file systems
@pytest.fixture
def disk_full_after(monkeypatch):
    """Make zarr's file writes fail with ENOSPC after ``n`` successful ones."""
    import zarr.storage._local as local

    real = local._put

    def arm(n: int):
        count = {"n": 0}

        def put(path, value, exclusive=False):
            count["n"] += 1
            if count["n"] > n:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, value, exclusive)

        monkeypatch.setattr(local, "_put", put)

    return arm


@pytest.mark.parametrize("verb", ["ingest", "preprocess", "init", "reconstruct", "aggregate"])
def test_a_full_disk_gives_one_line_and_leaves_nothing(verb, chain, tmp_path, capsys, disk_full_after):
    d = chain
    out = tmp_path / "out"
    argv = {
        "ingest": ["ingest", "--patterns", f"{d}/patterns.h5", "--meta", f"{d}/meta.yaml", "--out", str(out),
                   "--chunk-patterns", "16"],
        "preprocess": ["preprocess", "--data", f"{d}/data.zarr", "--out", str(out)],
        "init": ["init", "--data", f"{d}/prepared.zarr", "--out", str(out)],
        "reconstruct": ["reconstruct", "--plan", f"{d}/plan.yaml", "--data", f"{d}/prepared.zarr", "--init",
                        f"{d}/init.zarr", "--out", str(out)],
        "aggregate": None,
    }[verb]
    if verb == "aggregate":
        assert main(["evaluate", "--result", f"{d}/result.zarr", "--out", str(tmp_path / "ev"), "--no-figures",
                     "--quiet"]) == 0
        argv = ["aggregate", "--evals", str(tmp_path / "ev"), "--out", str(out)]
    disk_full_after(3)
    rc, lines = run([*argv, "--quiet"] if verb != "aggregate" else argv, capsys)
    assert rc == StorageError.exit_code and len(lines) == 1, lines
    assert lines[0].startswith(f"ptycore {verb}: error: ") and "no space left on the device" in lines[0]
    assert str(tmp_path) in lines[0]
    assert not out.exists()
    if verb == "reconstruct":  # checkpoints are kept for --resume, temporary files are not
        assert [p.name for p in partial_path(out).rglob("*") if ".tmp" in p.name] == []
    else:
        assert leftovers(tmp_path) == []


def test_a_full_disk_while_checkpointing_leaves_no_tmp_npz(chain, tmp_path, capsys, monkeypatch):
    """The issue's case: np.savez fills the disk half way through checkpoints/main.npz.tmp.npz."""
    real_savez = np.savez

    def savez(file, *args, **kwargs):
        real_savez(file, *args, **kwargs)
        with open(file, "r+b") as fh:
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner.np, "savez", savez)
    out = tmp_path / "r.zarr"
    rc, lines = run(["reconstruct", "--plan", f"{chain}/plan.yaml", "--data", f"{chain}/prepared.zarr", "--init",
                     f"{chain}/init.zarr", "--out", str(out), "--quiet"], capsys)
    assert rc == StorageError.exit_code and len(lines) == 1
    assert lines[0] == f"ptycore reconstruct: error: {out}: no space left on the device (free some space or write " \
                       "elsewhere)"
    assert not out.exists()
    assert [p.name for p in partial_path(out).rglob("*") if p.is_file()] == []


def test_evaluate_full_disk_writing_metrics(chain, tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "ev"
    rc, lines = run(["evaluate", "--result", f"{chain}/result.zarr", "--out", str(out), "--no-figures"], capsys)
    assert rc == StorageError.exit_code and len(lines) == 1
    assert f"{out}.partial/metrics.json: no space left on the device" in lines[0]
    assert leftovers(tmp_path) == [] and not out.exists()


def test_permission_denied_mid_write_names_the_file(chain, tmp_path, capsys, monkeypatch):
    import zarr.storage._local as local

    def put(path, value, exclusive=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(local, "_put", put)
    out = tmp_path / "i.zarr"
    rc, lines = run(["init", "--data", f"{chain}/prepared.zarr", "--out", str(out), "--quiet"], capsys)
    assert rc == StorageError.exit_code and len(lines) == 1
    assert f"{out}.partial/" in lines[0] and lines[0].endswith("permission denied")
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root: a chmod-ed directory stays writable (the read-only file system case "
                           "is covered by the os.access test below and the out-under-a-file corpus cases)")
def test_a_read_only_directory_is_refused_before_any_compute(chain, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, lines = run(["init", "--data", f"{chain}/prepared.zarr", "--out", str(ro / "i.zarr")], capsys)
    finally:
        ro.chmod(0o700)
    assert rc == StorageError.exit_code and lines == [
        f"ptycore init: error: {ro}/i.zarr: cannot be created, {ro} is not writable (permission denied)"]


def test_a_read_only_file_system_is_named(tmp_path, monkeypatch):
    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(StorageError, match=rf"{tmp_path}/a/b.zarr: cannot be created, {tmp_path} is on a read-only"):
        check_writable(tmp_path / "a" / "b.zarr")


# ---------------------------------------------------------------- failure 10: atomic --overwrite
def test_overwrite_replaces_only_once_the_new_output_is_complete(chain, tmp_path, capsys):
    out = tmp_path / "init.zarr"
    shutil.copytree(chain / "init.zarr", out)
    before = sha256(out)
    # a failure while writing the new output: the old one is untouched
    with pytest.raises(RuntimeError, match="killed"), atomic_output(out, overwrite=True) as tmp:
        create_store(tmp)
        assert sha256(out) == before
        raise RuntimeError("killed")
    assert sha256(out) == before and leftovers(tmp_path) == []
    # a successful overwrite: the new store in place, the old one gone, nothing aside
    cfg = tmp_path / "init.yaml"
    cfg.write_text("slices: 2\n")
    assert main(["init", "--data", f"{chain}/prepared.zarr", "--config", str(cfg), "--out", str(out),
                 "--overwrite", "--quiet"]) == 0
    assert zarr.open_group(str(out), mode="r")["object_phase"].shape[1] == 2
    assert leftovers(tmp_path) == []


def test_overwrite_restores_the_old_output_if_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old result")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name == "o.partial":
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real(src, dst)

    import ptycore.store as store

    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(OSError), atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new result")
    assert calls[0][0] == "o" and calls[0][1].startswith("o.old-")  # the old one was moved aside first
    assert (out / "old.txt").read_text() == "old result" and not (out / "new.txt").exists()
    assert leftovers(tmp_path) == []


def test_an_old_output_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    out = tmp_path / "o"
    aside = tmp_path / "o.old-12345"
    aside.mkdir()
    (aside / "old.txt").write_text("old result")
    with pytest.raises(InvalidArgument, match="already exists"), atomic_output(out):
        pass  # the next run finds the old output back in place, and refuses to replace it
    assert (out / "old.txt").read_text() == "old result" and not aside.exists()
    aside.mkdir()  # killed after the new output was in place: the old copy is just removed
    with atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new result")
    assert (out / "new.txt").exists() and not (out / "old.txt").exists() and leftovers(tmp_path) == []


def test_overwrite_of_a_reconstruction_failing_midway_keeps_the_old_result(chain, tmp_path, capsys, disk_full_after):
    out = tmp_path / "result.zarr"
    shutil.copytree(chain / "result.zarr", out)
    before = sha256(out)
    disk_full_after(2)
    rc, lines = run(["reconstruct", "--plan", f"{chain}/plan.yaml", "--data", f"{chain}/prepared.zarr", "--init",
                     f"{chain}/init.zarr", "--out", str(out), "--overwrite", "--quiet"], capsys)
    assert rc == StorageError.exit_code and len(lines) == 1
    assert sha256(out) == before
    open_store(out)


# ---------------------------------------------------------------- failure 11: accepted silently
def _plan(**stage) -> dict:
    plan = yaml.safe_load(yaml.safe_dump(PLAN))
    plan["stages"][0].update(stage)
    return plan


def test_a_parameter_start_beyond_the_iterations_is_rejected_naming_stage_and_parameter():
    with pytest.raises(InvalidPlan, match=r"p.yaml: stages\[0\]: stage 'main': optimize.probe.start 3 is beyond "
                                          r"the stage's 2 iterations: probe would never be updated"):
        parse_plan(_plan(optimize={"object_phase": {"lr": 0.1}, "probe": {"lr": 0.1, "start": 3}}), "p.yaml")
    # start == iterations keeps a parameter fixed on purpose (a study's 'never' level): accepted
    plan = parse_plan(_plan(optimize={"object_phase": {"lr": 0.1}, "probe": {"lr": 0.1, "start": 2}}))
    assert not any(plan.stages[0].optimize["probe"].active_at(it) for it in range(2))


@pytest.mark.parametrize("losses", [{"single": 0.0}, {"poisson": 0, "pacbed": 0.5},
                                    {"single": {"schedule": "linear", "start": 0.0, "end": 0.0, "to_iter": 2}}])
def test_all_data_fit_weights_zero_is_rejected(losses):
    with pytest.raises(InvalidPlan, match="every data-fit loss has weight 0 .*: nothing fits the data"):
        parse_plan(_plan(losses=losses))


def test_a_data_fit_weight_that_becomes_positive_is_accepted():
    parse_plan(_plan(losses={"single": {"schedule": "step", "start": 0.0, "end": 1.0, "at_iter": 1}}))


def test_a_nan_energy_is_not_a_number(tmp_path, capsys, chain):
    meta = yaml.safe_load((chain / "meta.yaml").read_text())
    meta["energy_kv"] = float("nan")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(meta))
    text = (tmp_path / "m.yaml").read_text()
    assert "energy_kv: .nan" in text  # what a user would write in YAML
    rc, lines = run(["ingest", "--patterns", f"{chain}/patterns.h5", "--meta", str(tmp_path / "m.yaml"), "--out",
                     str(tmp_path / "d.zarr")], capsys)
    assert rc == 2 and lines == [f"ptycore ingest: error: {tmp_path}/m.yaml: energy_kv: is not a number (NaN)"]


def test_seal_records_every_file_after_the_output_is_written(tmp_path):
    g = create_store(tmp_path / "s.zarr")
    write_array(g, "a/b", np.arange(10.0), chunks=(3,))
    seal_store(tmp_path / "s.zarr")
    files = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs[MANIFEST_KEY]["files"]
    assert sorted(files) == ["a/b/c/0", "a/b/c/1", "a/b/c/2", "a/b/c/3", "a/b/zarr.json", "a/zarr.json"]
