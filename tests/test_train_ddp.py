"""DDP: two CPU processes (gloo) train the same model as one process on the same global batches."""
import os
import socket

import torch
import torch.multiprocessing as mp

from kdfast.train import KD, CrossEntropy, Distiller, Split, Stage, Trainer, seed_everything
from kdfast.train.models import SmallCNN


def _train():
    seed_everything(0)
    student = SmallCNN((4, 8, 8), norm=False)  # BatchNorm's batch statistics differ per shard (no SyncBN on CPU)
    teacher = SmallCNN((8, 8, 16)).eval()
    g = torch.Generator().manual_seed(1)
    data = Split(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    distiller = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": KD(4.0)})
    Trainer(distiller, data, [Stage(2, lr=0.1)], batch_size=16, augment="shift", seed=3, progress=False,
            grad_clip=5.0).fit()
    return student.state_dict()


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        state = _train()
        if rank == 0:
            torch.save(state, path)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_the_same_model_as_one(tmp_path):
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    assert "WORLD_SIZE" not in os.environ
    single = _train()
    ddp = torch.load(path)
    assert set(ddp) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    seed_everything(0)
    assert not torch.equal(SmallCNN((4, 8, 8), norm=False).state_dict()["fc.weight"], single["fc.weight"])
