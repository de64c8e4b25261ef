"""waps-tvm tune (meta-schedule, XGBoost) and compile --tuning-records."""
import copy
import json

import numpy as np
import pytest

from calib import artifact
from relay_passes import reference
from tests.compile_helpers import scramble_groups
from waps_tvm import cli, runner
from waps_tvm.compiler import lower_artifact


@pytest.fixture(scope="module")
def files(tiny_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    artifact.save(tiny_artifact, d / "a.waps")
    other = scramble_groups(copy.deepcopy(tiny_artifact), seed=11, tile=4)
    for rec in other.layers.values():                       # other weights and groups: other kernels
        rec.w_codes = np.flip(rec.w_codes, 0).copy()
    artifact.save(other, d / "b.waps")
    # --trials 0: only the default schedules are measured and recorded (no search; quick)
    assert cli.main(["tune", str(d / "a.waps"), "--work-dir", str(d / "rec0"), "--trials", "0", "-q"]) == 0
    return d


def _err(capsys, argv, *words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


def test_default_records_compile_bit_exact(files, tiny_artifact, capsys):
    rec = files / "rec0"
    assert (rec / "database_workload.json").is_file() and (rec / "database_tuning_record.json").is_file()
    n_records = len((rec / "database_tuning_record.json").read_text().splitlines())
    assert n_records == len((rec / "database_workload.json").read_text().splitlines()) >= 5
    out = files / "out0"
    assert cli.main(["compile", str(files / "a.waps"), "-o", str(out), "--tuning-records", str(rec), "-q"]) == 0
    assert json.loads((out / "meta.json").read_text())["waps"]["tuning_records"] is True
    x = np.random.default_rng(0).normal(size=(1, 1, 16, 16)).astype(np.float32)
    codes = runner.load(out)(x)[1]
    np.testing.assert_array_equal(codes, reference.run(lower_artifact(tiny_artifact, 1).program, x)[1])


def test_records_of_another_model_or_target_are_one_line(files, capsys, tmp_path):
    rec = files / "rec0"
    _err(capsys, ["compile", str(files / "b.waps"), "-o", str(tmp_path / "o"), "--tuning-records", str(rec)],
         "of this model's", "kernels are in the records")
    _err(capsys, ["compile", str(files / "a.waps"), "-o", str(tmp_path / "o"), "--tuning-records", str(rec),
                  "--batch", "2"], "only 0 of this model's")
    other = tmp_path / "other"
    other.mkdir()
    for f in rec.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    info = json.loads((other / "waps-tuning.json").read_text())
    info["target"]["mcpu"] = "cortex-a53"
    (other / "waps-tuning.json").write_text(json.dumps(info))
    _err(capsys, ["compile", str(files / "a.waps"), "-o", str(tmp_path / "o"), "--tuning-records", str(other)],
         "measured for mcpu='cortex-a53'")
    _err(capsys, ["compile", str(files / "a.waps"), "-o", str(tmp_path / "o"), "--tuning-records", str(tmp_path)],
         "not a folder written by 'waps-tvm tune'")
    _err(capsys, ["tune", str(files / "a.waps"), "--work-dir", str(tmp_path / "r"), "--target", "aarch64"],
         "is tuned on the board itself", "--rpc")
    _err(capsys, ["tune", str(files / "a.waps"), "--work-dir", str(tmp_path / "r"), "--rpc", "127.0.0.1:9"],
         "--rpc measures a cross target")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_search_with_xgboost_extends_the_records_and_is_no_slower(files, tiny_artifact, capsys):
    rec = files / "rec_search"
    assert cli.main(["tune", str(files / "a.waps"), "--work-dir", str(rec), "--trials", "16", "-q"]) == 0
    summary = capsys.readouterr().out
    assert "tuned" in summary and "best records" in summary
    before = float(summary.split("ms (default schedules)")[0].split()[-1])
    after = float(summary.split("ms (best records)")[0].split()[-1])
    assert after <= before                      # the defaults are records too: the best is never worse
    search = (rec / "search" / "database_tuning_record.json").read_text().splitlines()
    workloads = (rec / "database_workload.json").read_text().splitlines()
    assert len(search) > len(workloads)         # the search measured candidates beside the defaults
    chosen = (rec / "database_tuning_record.json").read_text().splitlines()
    assert len(chosen) == len(workloads)        # compile's records: one per kernel
    out = files / "out_search"
    assert cli.main(["compile", str(files / "a.waps"), "-o", str(out), "--tuning-records", str(rec), "-q"]) == 0
    x = np.random.default_rng(1).normal(size=(1, 1, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(runner.load(out)(x)[1],
                                  reference.run(lower_artifact(tiny_artifact, 1).program, x)[1])
