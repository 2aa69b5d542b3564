"""``ptycore aggregate``: evaluations and failures → CSV, zarr, figures, index report."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import zarr
from test_evaluate import write_result, write_truth

from ptycore.cli import main
from ptycore.evaluate import evaluate


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    """results/<dataset>/<plan>/eval for a good and a wrong reconstruction, plus a failed dataset's log."""
    root = tmp_path_factory.mktemp("results")
    truth = write_truth(root / "truth.zarr")
    good = evaluate(write_result(root / "good.zarr"), root / "good" / "p1" / "eval", truth=truth,
                    dataset="good", plan="p1", figures=False)
    bad = evaluate(write_result(root / "bad.zarr", wrong=True), root / "bad" / "p1" / "eval", truth=truth,
                   dataset="bad", plan="p1", figures=False)
    log = root / "logs" / "lost" / "p1" / "reconstruct-main.log"
    log.parent.mkdir(parents=True)
    log.write_text("single-slice: it 3/60 loss 0.31\nptycore reconstruct: error: stage 'main' diverged at "
                   "iteration 4: loss single is not finite\nmore text with error in it\n")
    return {"root": root, "good": good, "bad": bad, "log": log}


def _run(args, capsys):
    rc = main(["aggregate", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_table_store_and_index_with_a_failed_dataset(tmp_path, evals, capsys):
    root = evals["root"]
    out = tmp_path / "aggregate"
    rc, stdout, err = _run(["--evals", root / "*" / "p1" / "eval", root / "lost" / "p1" / "eval",
                            "--failed-logs", evals["log"], "--out", out], capsys)
    assert rc == 0, err
    assert "2 evaluated, 1 failed" in stdout and "stage 'main' diverged" in stdout

    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["plan"], r["status"]) for r in rows] == [
        ("bad", "p1", "ok"), ("good", "p1", "ok"), ("lost", "p1", "failed")]
    assert float(rows[1]["ssim_phase_sum"]) == pytest.approx(evals["good"]["ssim_phase_sum"])
    assert float(rows[0]["ssim_phase_sum"]) < 0.6 < float(rows[1]["ssim_phase_sum"])
    assert rows[2]["error"].startswith("ptycore reconstruct: error: stage 'main' diverged")  # the first such line
    assert rows[2]["step"] == "reconstruct-main" and rows[2]["ssim_phase_sum"] == ""
    assert json.loads(rows[1]["ssim_per_slice"]) == pytest.approx(evals["good"]["ssim_per_slice"])
    assert float(rows[1]["final_single"]) == pytest.approx(evals["good"]["final_terms"]["single"])

    store = zarr.open_group(str(out / "metrics.zarr"), mode="r")
    assert list(store["dataset"][...]) == ["bad", "good", "lost"]
    assert list(store["status"][...]) == ["ok", "ok", "failed"]
    ssim = store["ssim_phase_sum"][...]
    assert ssim.dtype == np.float64 and ssim[1] == pytest.approx(evals["good"]["ssim_phase_sum"])
    assert np.isnan(ssim[2])
    assert store["ssim_per_slice"].shape == (3, 2)
    assert store["information_limit_A"].attrs["_ARRAY_DIMENSIONS"] == ["run"]

    html = (out / "report.html").read_text()
    links = re.findall(r"href='([^']+/report\.html)'", html)
    assert len(links) == 2 and all((out / link).resolve().is_file() for link in links)
    failed_row = re.search(r"<tr class='failed'>.*?</tr>", html).group(0)
    assert "lost" in failed_row and "stage &#x27;main&#x27; diverged" in failed_row
    assert 'alt="ssim.png" src="data:image/png;base64,' in html
    assert (out / "ssim.png").stat().st_size > 5000


def test_failures_file_from_the_workflow(tmp_path, evals, capsys):
    failures = tmp_path / "failures.json"
    failures.write_text(json.dumps([{"dataset": "lost", "plan": "p1", "step": "init", "log": "logs/lost/init.log",
                                     "error": "ptycore init: error: prepared.zarr: store not found"}]))
    out = tmp_path / "aggregate"
    rc, stdout, err = _run(["--evals", evals["root"] / "good" / "p1" / "eval", "--failures", failures,
                            "--out", out], capsys)
    assert rc == 0, err
    with open(out / "metrics.csv", newline="") as fh:
        rows = {r["dataset"]: r for r in csv.DictReader(fh)}
    assert rows["lost"]["status"] == "failed" and rows["lost"]["step"] == "init"
    assert rows["lost"]["error"] == "ptycore init: error: prepared.zarr: store not found"
    assert rows["good"]["status"] == "ok"
    # an unreadable metrics.json is one more failed run, not a failed aggregate
    broken = tmp_path / "broken" / "p1" / "eval"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{not json")
    rc, stdout, err = _run(["--evals", evals["root"] / "good" / "p1" / "eval", broken, "--out", tmp_path / "agg2"],
                           capsys)
    assert rc == 0, err
    assert "1 evaluated, 1 failed" in stdout and "broken" in stdout and "not valid JSON" in stdout


def test_study_plot(tmp_path, evals, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("name: quality\nfactor: wrongness\nruns:\n  - {dataset: good, value: 0}\n"
                     "  - {dataset: bad, value: 1}\n")
    out = tmp_path / "aggregate"
    rc, _, err = _run(["--evals", evals["root"] / "*" / "p1" / "eval", "--study", study, "--out", out], capsys)
    assert rc == 0, err
    assert (out / "study_ssim_phase_sum.png").stat().st_size > 5000
    assert 'alt="study_ssim_phase_sum.png"' in (out / "report.html").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "nothing to aggregate"),
    (["--failures", "nothere.json"], "nothere.json: failures file not found"),
    (["--evals", "EVAL", "--study", "nothere.yaml"], "nothere.yaml: study file not found"),
])
def test_bad_input(tmp_path, evals, capsys, args, message):
    args = [str(evals["root"] / "good" / "p1" / "eval") if a == "EVAL" else str(tmp_path / a) if "." in a else a
            for a in args]
    out = tmp_path / "aggregate"
    rc, _, err = _run([*args, "--out", out], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("aggregate.partial").exists()
