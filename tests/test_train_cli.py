"""`python -m kdfast train` and `python -m kdfast demo`: clear errors for bad input, and short real runs."""
import json
import math
import subprocess
import sys

import pytest
import torch

from kdfast.__main__ import main as kdfast_main
from kdfast.train import cli, demo


def run_cli(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--student", "resnet9"], "unknown model 'resnet9'"),
    (["--student", "cnn_tiny", "--teacher", "vgg"], "--teacher: unknown model 'vgg'"),
    (["--student", "cnn_tiny", "--method", "kd"], "needs a --teacher"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "kd,pa"],
     "unknown method(s) 'pa'; available: ce, kd"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "kd,fitnet"],
     "--method kd,fitnet: fitnet run alone"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--option", "nope=1"],
     "--option nope: no method of this run has it (options: kd: temperature, alpha)"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "adaptive", "--option", "adaptive=0"],
     "--option adaptive: no method of this run has it (options: adaptive: temperature)"),
    (["--student", "cnn_tiny", "--option", "temperature=2"], "cross-entropy alone has no method options"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--option", "temperature"], "expected NAME=VALUE"),
    (["--student", "cnn_tiny", "--method", "fitnet"], "--method fitnet needs a --teacher"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "pixelwise"],
     "--method pixelwise is a dense (segmentation) method: run it on --data shapes"),
    (["--data", "shapes", "--student", "segnet_small", "--teacher", "segnet", "--method", "fitnet"],
     "--method fitnet is a classification method; on --data shapes use a dense method (pixelwise, pairwise, "
     "holistic) or ce"),
    (["--data", "shapes", "--student", "segnet_small", "--teacher", "segnet", "--method", "ce,kd,at"],
     "--method kd is a classification method; on --data shapes use a dense method"),
    (["--data", "shapes", "--student", "cnn_tiny"], "--student cnn_tiny is a classifier; --data shapes needs a "
     "segmentation model: one of segnet, segnet_small"),
    (["--data", "shapes", "--student", "segnet_small", "--teacher", "resnet8"], "--teacher resnet8 is a classifier"),
    (["--student", "segnet_small"], "--student segnet_small is a segmentation model; --data digits needs a "
     "classifier"),
    (["--data", "shapes", "--student", "segnet_small", "--labels-per-class", "5"],
     "--labels-per-class is for classification data; on --data shapes use --labelled-fraction F"),
    (["--student", "cnn_tiny", "--labelled-fraction", "0.5"],
     "--labelled-fraction is for segmentation data (--data shapes); on --data digits use --labels-per-class N"),
    (["--data", "shapes", "--student", "segnet_small", "--labelled-fraction", "1.5"], "must be in (0, 1], got 1.5"),
    (["--data", "shapes", "--student", "segnet_small", "--labelled-fraction", "0"], "must be > 0, got 0"),
    (["--student", "cnn_tiny", "--shapes-size", "16"], "--shapes-size: only for --data shapes, not --data digits"),
    (["--student", "cnn_tiny", "--method", "dml", "--weight", "kd=2", "--epochs", "1"],
     "no term named 'kd' in recipe dml"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "takd", "--assistant", "vgg"],
     "--assistant: unknown model 'vgg'"),
    (["--student", "cnn_tiny", "--weight", "kd=2"], "no term named 'kd'"),
    (["--student", "cnn_tiny", "--weight", "ce"], "expected NAME=VALUE"),
    (["--student", "cnn_tiny", "--weight", "ce=-1"], "finite and >= 0"),
    (["--student", "cnn_tiny", "--epochs", "0"], "must be > 0"),
    (["--student", "cnn_tiny", "--lr", "nan"], "must be > 0"),
    (["--student", "cnn_tiny", "--temperature", "hot"], "expected a float"),
    (["--student", "cnn_tiny", "--data", "mnist"], "invalid choice: 'mnist'"),
    (["--student", "cnn_tiny", "--amp", "int8"], "invalid choice: 'int8'"),
    (["--student", "resnet8", "--data", "cifar10"], "needs --data-root"),
    (["--student", "cnn_tiny", "--teacher-checkpoint", "t.pt"], "needs --teacher"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint", "/no/such.pt"],
     "/no/such.pt: no such file"),
])
def test_bad_cli_input(capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


def test_missing_data_folder_says_where_and_what(capsys, tmp_path):
    code, err = run_cli(capsys, "--student", "resnet8", "--data", "cifar100", "--data-root", str(tmp_path))
    assert code == 2
    assert str(tmp_path / "cifar-100-python") in err and "python-pickle" in err and "fine_labels" in err


def test_train_then_distil_from_its_checkpoint(tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "t", tmp_path / "s"
    assert cli.main(["--student", "cnn_small", "--epochs", "1", "--out", str(teacher_dir), "--no-progress",
                     "--threads", "1"]) == 0
    assert cli.main(["--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint",
                     str(teacher_dir / "student.pt"), "--method", "kd", "--weight", "kd=0.5", "--epochs", "1",
                     "--labels-per-class", "2", "--amp", "bf16", "--out", str(student_dir), "--no-progress"]) == 0
    log = [json.loads(line) for line in (student_dir / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and set(log[0]["train"]) == {"loss", "kd"}  # the kd recipe: Hinton's CE + KD in one term
    metrics = json.loads((student_dir / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--teacher", "cnn_large", "--teacher-checkpoint",
                        str(teacher_dir / "student.pt"), "--epochs", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "does not fit --teacher cnn_large" in err


@pytest.mark.parametrize("method,extra,terms", [
    ("fitnet", ["--teacher", "cnn_small"], {"loss", "kd"}),  # the last (KD) stage's log line
    ("dml", [], {"loss", "dml"}),
    ("kd,at", ["--teacher", "cnn_small"], {"loss", "kd", "at"}),  # composed: one stage, the shared KD term once
    ("ce,sp,rkd", ["--teacher", "cnn_small"], {"loss", "kd", "sp", "rkd"}),
])
def test_method_recipes_from_the_cli(tmp_path, method, extra, terms):
    out = tmp_path / method
    assert cli.main(["--student", "cnn_tiny", "--method", method, *extra, "--epochs", "2", "--teacher-epochs", "1",
                     "--labels-per-class", "3", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and set(log[-1]["train"]) == terms
    from kdfast.train.models import build_model
    build_model("cnn_tiny", 10, 1).load_state_dict(torch.load(out / "student.pt"))  # the deployed network alone


def test_recipes_get_the_small_data_options_unless_paper_defaults(tmp_path, monkeypatch):
    from kdfast.train import recipes
    seen = []

    def spy(names, setting, overrides):
        seen.append(overrides)
        return recipes.compose_recipe(names, setting, overrides)

    monkeypatch.setattr(cli, "compose_recipe", spy)
    common = ["--student", "cnn_tiny", "--teacher", "cnn_tiny", "--method", "at", "--epochs", "1", "--teacher-epochs",
              "1", "--no-progress", "--threads", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*common, "--paper-defaults", "--out", str(tmp_path / "b")]) == 0
    assert cli.main([*common, "--option", "beta=100", "--option", "p=2.0", "--out", str(tmp_path / "c")]) == 0
    assert seen == [{"at": {"beta": 10.0}}, {"at": {}}, {"at": {"beta": 100, "p": 2.0}}]
    assert recipes.SMALL_DATA["at"] == {"beta": 10.0}


SHAPES_TINY = ["--data", "shapes", "--shapes-train", "48", "--shapes-test", "16", "--shapes-size", "16",
               "--batch-size", "16", "--epochs", "1", "--no-progress", "--threads", "1"]


def _shapes_run_checks(out, terms):
    """The run folder of a shapes run: its log's terms, and a metrics.json whose mIoU and pixel accuracy are those
    of the saved student.pt on the test images."""
    from kdfast.train.data import load_shapes
    from kdfast.train.metrics import mean_iou
    from kdfast.train.models import build_model
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and set(log[0]["train"]) == terms
    assert all(math.isfinite(v) for v in log[0]["train"].values())
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert {"pixel_accuracy", "miou", "ece"} <= set(test) and "accuracy" not in test
    assert 0 <= test["miou"] <= 1 and 0 <= test["pixel_accuracy"] <= 1 and 0 <= test["ece"] <= 1
    student = build_model("segnet_small", 4, 3)
    student.load_state_dict(torch.load(out / "student.pt"))
    images, targets = load_shapes(48, 16, 16).test.images, load_shapes(48, 16, 16).test.targets
    with torch.no_grad():
        logits = student.eval()(images)
    assert test["miou"] == pytest.approx(mean_iou(logits, targets, 4), abs=1e-6)
    assert test["pixel_accuracy"] == pytest.approx(float((logits.argmax(1) == targets).float().mean()), abs=1e-6)


@pytest.mark.parametrize("method,terms", [("pixelwise", {"loss", "ce", "pixelwise"}),
                                          ("pairwise", {"loss", "ce", "pairwise"}),
                                          ("holistic", {"loss", "ce", "holistic", "adversary"})])
def test_dense_method_recipes_from_the_cli(tmp_path, capsys, method, terms):
    out = tmp_path / method
    assert cli.main([*SHAPES_TINY, "--student", "segnet_small", "--teacher", "segnet", "--method", method,
                     "--teacher-epochs", "1", "--labelled-fraction", "0.25", "--out", str(out)]) == 0
    assert "training the teacher segnet first (1 epochs, all labels)" in capsys.readouterr().out
    _shapes_run_checks(out, terms)
    teacher_log = [json.loads(line) for line in (out / "teacher" / "log.jsonl").read_text().splitlines()]
    assert set(teacher_log[0]["train"]) == {"loss", "ce"} and 0 <= teacher_log[0]["test"]["miou"] <= 1


def test_segmentation_with_cross_entropy_alone(tmp_path):
    assert cli.main([*SHAPES_TINY, "--student", "segnet_small", "--method", "ce", "--out", str(tmp_path)]) == 0
    _shapes_run_checks(tmp_path, {"loss", "ce"})
    assert not (tmp_path / "teacher").exists()


def test_list_options(capsys):
    assert cli.main(["--student", "cnn_tiny", "--method", "kd,at", "--list-options"]) == 0
    out = capsys.readouterr().out
    assert "kd (Hinton" in out and "  alpha = 0.9: weight of the KD term" in out and "  beta = 1000.0:" in out
    assert cli.main(["--student", "cnn_tiny", "--list-options"]) == 0
    assert "logit_matching (Ba & Caruana" in capsys.readouterr().out


def test_dispatch(capsys):
    assert kdfast_main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert kdfast_main(["--help"]) == 0 and "demo" in capsys.readouterr().out


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdfast", "demo", "--out", str(tmp_path), "--epochs", "1",
                          "--teacher-epochs", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| method" in out.stdout and "CE (labels only)" in out.stdout and "KD " in out.stdout
    assert (tmp_path / "demo.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[0]["method"].startswith("teacher") and all("ece" in r for r in rows)


def test_demo_rejects_bad_values(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0", "--out", str(tmp_path)])
