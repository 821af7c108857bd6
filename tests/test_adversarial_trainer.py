"""The trainer against hostile or broken input: files that try to run code when read, corrupt and foreign files,
resume at and past the end of a run, a run killed with SIGKILL, and the modes of what a run writes. Each bad file
gives one line naming the file, a non-zero exit, and is left as it was."""
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kdfast.train import CrossEntropy, Distiller, Stage, Trainer, build_model, cli
from kdfast.train.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from kdfast.train.data import load_cifar
from kdfast.train.safe_pickle import PickleFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--no-progress", "--threads", "1"]


class Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for any command a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def run_cli(capsys, *argv):
    try:
        code = cli.main([*argv, *QUICK])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_lines(err):
    return [line for line in err.splitlines() if line.strip() and not line.startswith("(see ")]


def snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


# --- nothing kdfast reads can run code ---------------------------------------------------------------------------

def test_crafted_teacher_checkpoint_does_not_run(tmp_path, capsys):
    marker, evil = tmp_path / "ran", tmp_path / "teacher.pt"
    torch.save({"conv.weight": Payload(marker)}, evil)
    before = snapshot(evil)
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint", str(evil),
                        "--epochs", "1", "--out", str(tmp_path / "run"))
    assert not marker.exists()
    assert code == 2 and len(error_lines(err)) == 1 and str(evil) in err and "could run code" in err
    assert snapshot(evil) == before


def test_crafted_resume_checkpoint_does_not_run(tmp_path, capsys):
    marker, out = tmp_path / "ran", tmp_path / "run"
    out.mkdir()
    evil = out / "checkpoint.pt"
    torch.save({"distiller": {}, "optimizer": Payload(marker)}, evil)
    before = snapshot(evil)
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--epochs", "1", "--out", str(out), "--resume")
    assert not marker.exists()
    assert code == 2 and len(error_lines(err)) == 1 and str(evil) in err and "could run code" in err
    assert snapshot(evil) == before


def _cifar_folder(tmp_path, write):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        with open(folder / name, "wb") as fh:
            write(name, batch, fh)
    return folder


def test_crafted_cifar_batch_does_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"

    def write(name, batch, fh):
        pickle.dump({**batch, b"batch_label": Payload(marker)} if name == "data_batch_3" else batch, fh, protocol=2)

    folder = _cifar_folder(tmp_path, write)
    before = snapshot(folder / "data_batch_3")
    code, err = run_cli(capsys, "--student", "resnet8", "--data", "cifar10", "--data-root", str(tmp_path),
                        "--epochs", "1", "--out", str(tmp_path / "run"))
    assert not marker.exists()
    assert code == 2 and len(error_lines(err)) == 1 and str(folder / "data_batch_3") in err and "posix.mkdir" in err
    assert snapshot(folder / "data_batch_3") == before


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_cifar_layouts_still_load(tmp_path, protocol):
    _cifar_folder(tmp_path, lambda name, batch, fh: pickle.dump(batch, fh, protocol=protocol))
    data = load_cifar("cifar10", tmp_path)
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.targets.tolist() == [0, 1, 2, 9]


# --- corrupt, foreign and other-layout files: one line naming the file ---------------------------------------------

@pytest.mark.parametrize("kind", ["random", "empty", "foreign", "not_a_dict", "truncated"])
def test_bad_resume_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":  # another program's torch.save
        torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"distiller": {}, "history": [], "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:600])
    before = snapshot(path)
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--epochs", "1", "--out", str(out), "--resume")
    assert code == 2 and len(error_lines(err)) == 1 and str(path) in err and "Traceback" not in err
    assert snapshot(path) == before


def test_checkpoint_of_another_run_does_not_fit(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--student", "cnn_tiny", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    code, err = run_cli(capsys, "--student", "cnn_small", "--epochs", "1", "--out", str(out), "--resume")
    assert code == 2 and len(error_lines(err)) == 1 and str(out / "checkpoint.pt") in err
    assert "does not fit this run" in err
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--epochs", "1", "--out", str(out), "--resume",
                        "--seed", "3")
    assert code == 2 and str(out / "checkpoint.pt") in err and "seed" in err


@pytest.mark.parametrize("kind", ["random", "foreign", "tensor_list"])
def test_bad_teacher_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, kind):
    path = tmp_path / "teacher.pt"
    if kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(1000))
    elif kind == "foreign":
        torch.save({"state": {"w": torch.zeros(1)}, "note": "x"}, path)
    else:
        torch.save([torch.zeros(1)], path)
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint", str(path),
                        "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and len(error_lines(err)) == 1 and str(path) in err
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--teacher", "cnn_small", "--teacher-checkpoint",
                        str(tmp_path / "absent.pt"), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "absent.pt: no such file" in err


@pytest.mark.parametrize("kind,message", [
    ("junk", "not a readable python pickle"),
    ("cifar100_layout", "not a CIFAR batch of this layout"),   # b'fine_labels' where b'labels' is due
    ("short_rows", "N x 3072 uint8 array"),
    ("bad_labels", "class indices in [0, 10)"),
    ("a_list", "not a CIFAR batch of this layout"),
])
def test_bad_cifar_batch_is_one_line_naming_the_file(tmp_path, capsys, kind, message):
    def write(name, batch, fh):
        if name != "test_batch":
            pickle.dump(batch, fh)
        elif kind == "junk":
            fh.write(np.random.default_rng(2).bytes(3000))
        elif kind == "cifar100_layout":
            pickle.dump({b"data": batch[b"data"], b"fine_labels": batch[b"labels"]}, fh)
        elif kind == "short_rows":
            pickle.dump({**batch, b"data": batch[b"data"][:, :100]}, fh)
        elif kind == "bad_labels":
            pickle.dump({**batch, b"labels": [0, 1, 2, 10]}, fh)
        else:
            pickle.dump([1, 2, 3], fh)

    folder = _cifar_folder(tmp_path, write)
    before = snapshot(folder / "test_batch")
    code, err = run_cli(capsys, "--student", "resnet8", "--data", "cifar10", "--data-root", str(tmp_path),
                        "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and len(error_lines(err)) == 1 and str(folder / "test_batch") in err and message in err
    assert snapshot(folder / "test_batch") == before
    with pytest.raises(PickleFileError, match="test_batch"):
        load_cifar("cifar10", tmp_path)


def test_library_loaders_raise_checkpoint_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not a kdfast trainer checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not network weights"):
        load_state_dict_file(path)


@pytest.mark.parametrize("argv,message", [
    (["--warmup", "-1"], "must be finite and >= 0, got -1"),
    (["--warmup", "nan"], "must be finite and >= 0, got nan"),
    (["--weight-decay", "-0.1"], "must be finite and >= 0, got -0.1"),
    (["--weight-decay", "inf"], "must be finite and >= 0, got inf"),
    (["--batch-size", "0"], "must be > 0"),
    (["--grad-clip", "-1"], "must be > 0"),
    (["--ensemble", "0"], "must be > 0"),
])
def test_option_edges(capsys, tmp_path, argv, message):
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--out", str(tmp_path / "run"), *argv)
    assert code == 2 and message in err


def test_out_that_is_a_file(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("mine")
    code, err = run_cli(capsys, "--student", "cnn_tiny", "--epochs", "1", "--out", str(out))
    assert code == 2 and f"--out {out} is a file" in err and out.read_text() == "mine"


# --- resume at and past the end -------------------------------------------------------------------------------------

def _stopped_run(tmp_path, epochs_done, epochs):
    """A CLI-shaped run folder whose checkpoint stopped after `epochs_done` of `epochs` epochs."""
    from kdfast.train.data import load_digits
    from kdfast.train.trainer import seed_everything
    out = tmp_path / "run"
    data = load_digits()
    seed_everything(1)  # as the CLI seeds the student
    student = build_model("cnn_tiny", data.num_classes, data.in_channels)
    Trainer(Distiller(student, None, {"ce": CrossEntropy()}), data.train, [Stage(epochs, "student")], data.test,
            out_dir=str(out), progress=False).fit(stop_after=epochs_done)
    return out


@pytest.mark.parametrize("asked", [1, 2])
def test_resume_past_the_requested_end_finishes_at_once(tmp_path, asked):
    out = _stopped_run(tmp_path, 2, 3)  # killed after epoch 2 of 3
    before = snapshot(out / "checkpoint.pt")
    proc = subprocess.run([sys.executable, "-m", "kdfast", "train", "--student", "cnn_tiny", "--epochs", str(asked),
                           "--out", str(out), "--resume", *QUICK], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "already holds 2 epochs of stage 'student'" in proc.stdout and "nothing more to train" in proc.stdout
    assert snapshot(out / "checkpoint.pt") == before  # nothing trained, nothing rewritten
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--student", "cnn_tiny", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    weights = (out / "student.pt").read_bytes()
    assert cli.main(["--student", "cnn_tiny", "--epochs", "1", "--out", str(out), "--resume", *QUICK]) == 0
    assert (out / "student.pt").read_bytes() == weights


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    argv = [sys.executable, "-m", "kdfast", "train", "--student", "cnn_small", "--epochs", "6", *QUICK]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*argv, "--out", str(straight)], check=True, capture_output=True, timeout=600, cwd=ROOT)
    proc = subprocess.Popen([*argv, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    log = killed / "log.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "student.pt").exists()
    subprocess.run([*argv, "--out", str(killed), "--resume"], check=True, capture_output=True, timeout=600, cwd=ROOT)
    a, b = torch.load(straight / "student.pt"), torch.load(killed / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_without_times(straight) == _log_without_times(killed)


def _log_without_times(run):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run / "log.jsonl").read_text().splitlines()]


# --- what a run writes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_share_one_mode_following_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert cli.main(["--student", "cnn_tiny", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert set(modes) == {"checkpoint.pt", "log.jsonl", "student.pt", "metrics.json"}
    assert set(modes.values()) == {0o666 & ~umask}, modes
