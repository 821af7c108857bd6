"""`python -m kdfast train` and `python -m kdfast demo`: clear errors for bad input, and short real runs."""
import json
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
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "kd,fitnet"], "unknown method(s) 'fitnet'"),
    (["--student", "cnn_tiny", "--method", "fitnet"], "--method fitnet needs a --teacher"),
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "pixelwise"], "kdfast compare --methods"),
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
    (["--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint", "/no/such.pt"], "no file"),
])
def test_bad_cli_input(capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and message in err


def test_missing_data_folder_says_where_and_what(capsys, tmp_path):
    code, err = run_cli(capsys, "--student", "resnet8", "--data", "cifar100", "--data-root", str(tmp_path))
    assert code == 2
    assert str(tmp_path / "cifar-100-python") in err and "python-pickle" in err and "fine_labels" in err


def test_missing_op_is_a_clear_cli_error(capsys, monkeypatch):
    import kdfast
    monkeypatch.delattr(kdfast, "attention_transfer_loss", raising=False)
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--teacher", "cnn_small", "--method", "kd,at")
    assert code == 2 and "kdfast.attention_transfer_loss" in err


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
])
def test_method_recipes_from_the_cli(tmp_path, method, extra, terms):
    out = tmp_path / method
    assert cli.main(["--student", "cnn_tiny", "--method", method, *extra, "--epochs", "2", "--teacher-epochs", "1",
                     "--labels-per-class", "3", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and set(log[-1]["train"]) == terms
    from kdfast.train.models import build_model
    build_model("cnn_tiny", 10, 1).load_state_dict(torch.load(out / "student.pt"))  # the deployed network alone


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
