"""TopKStore: written batch by batch, read back memory-mapped by row range, top-k or sampled teachers; foreign,
truncated and mismatched files (shape, kind, temperature) are refused with one error naming the file; version-1
files are still read."""
import os
import pathlib
import struct
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast.topk import TopKIndexError
from kdfast.topk_store import TopKStoreError


def batches(n_batches=3, rows=5, V=1000, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        idx, lp = kdfast.topk_from_logits(torch.randn(rows, V, generator=g) * 3, k)
        lp = lp.clone()
        lp[0, -2:] = float("-inf")  # a server that returned fewer than k entries
        out.append((idx, lp))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [7, 8])
def test_round_trip_by_row_range(tmp_path, dtype, k):
    path = tmp_path / "teacher.kdtopk"
    data = batches(k=k)
    with kdfast.TopKStore.create(path, k, 1000, logprob_dtype=dtype) as w:
        for idx, lp in data:
            w.append(idx, lp)
    idx = torch.cat([d[0] for d in data])
    lp = torch.cat([d[1] for d in data])
    r = kdfast.TopKStore.open(path, k=k, vocab_size=1000)
    assert len(r) == 15 and r.k == k and r.vocab_size == 1000 and r.logprob_dtype == dtype
    got = r.read(3, 11)
    assert got.indices.dtype == torch.int32 and got.logprobs.dtype == dtype
    valid = lp[3:11] > float("-inf")
    assert (got.indices.long()[valid] == idx[3:11][valid]).all()
    assert (got.indices[~valid] == 0).all()  # padding is stored with index 0
    torch.testing.assert_close(got.logprobs.float(), lp[3:11].to(dtype).float())
    assert r[0:15].indices.shape == (15, k) and r[14:20].indices.shape == (1, k) and r[5:5].indices.shape == (0, k)


def test_appending_to_an_existing_store_and_training_from_it(tmp_path):
    path = tmp_path / "t.kdtopk"
    data = batches()
    with kdfast.TopKStore.create(path, 8, 1000) as w:
        w.append(kdfast.TopK(*data[0]))
    with kdfast.TopKStore.create(path, 8, 1000, append=True) as w:
        for idx, lp in data[1:]:
            w.append(idx, lp)
    r = kdfast.TopKStore.open(path)
    assert len(r) == 15
    student = torch.randn(15, 1000, requires_grad=True)
    teacher = r[0:15]
    loss = kdfast.topk_kd_div(student, *teacher, 2.0, tail="bucket")  # int32 indices, bfloat16 log-probs
    loss.backward()
    assert torch.isfinite(loss) and student.grad.abs().sum() > 0


def test_refuses_foreign_file(tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"\x80\x04\x95 pickle bytes, not a store" * 4)
    with pytest.raises(TopKStoreError, match="foreign.bin: not a kdfast top-k store"):
        kdfast.TopKStore.open(path)


def test_refuses_other_version(tmp_path):
    path = tmp_path / "v.kdtopk"
    kdfast.TopKStore.create(path, 4, 10).close()
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 3)
    path.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match="v.kdtopk: top-k store format version 3, this kdfast reads versions 1"):
        kdfast.TopKStore.open(path)


def test_refuses_other_shape(tmp_path):
    path = tmp_path / "s.kdtopk"
    with kdfast.TopKStore.create(path, 8, 1000) as w:
        w.append(*batches()[0])
    with pytest.raises(TopKStoreError, match="s.kdtopk: holds k=8, V=1000; expected k=16"):
        kdfast.TopKStore.open(path, k=16)
    with pytest.raises(TopKStoreError, match="expected k=8, V=2000"):
        kdfast.TopKStore.open(path, vocab_size=2000)
    with pytest.raises(TopKStoreError, match="s.kdtopk: holds k=8"):
        kdfast.TopKStore.create(path, 8, 2000, append=True)
    with pytest.raises(TopKStoreError, match="float16"):
        kdfast.TopKStore.create(path, 8, 1000, append=True, logprob_dtype=torch.float16)


def test_refuses_truncated_file(tmp_path):
    path = tmp_path / "cut.kdtopk"
    with kdfast.TopKStore.create(path, 8, 1000) as w:
        w.append(*batches()[0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TopKStoreError, match="cut.kdtopk: .* truncated"):
        kdfast.TopKStore.open(path)


def test_append_errors(tmp_path):
    path = tmp_path / "e.kdtopk"
    idx, lp = batches()[0]
    with kdfast.TopKStore.create(path, 8, 1000) as w:
        with pytest.raises(ValueError, match="k=8 entries a row"):
            w.append(idx[:, :4], lp[:, :4])
        bad = idx.clone()
        bad[1, 1] = 1000
        with pytest.raises(TopKIndexError, match="outside"):
            w.append(bad, lp)
        with pytest.raises(ValueError, match="log-probabilities"):
            w.append(idx, lp.abs())
    with pytest.raises(ValueError, match="positive int"):
        kdfast.TopKStore.create(path, 0, 1000)
    with pytest.raises(TypeError, match="logprob_dtype"):
        kdfast.TopKStore.create(path, 8, 1000, logprob_dtype=torch.float32)
    r = kdfast.TopKStore.open(path)
    with pytest.raises(ValueError, match="opened for reading"):
        r.append(idx, lp)
    with pytest.raises(TypeError, match="row range"):
        r[3]


def sampled_batches(n_batches=3, rows=5, V=1000, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [kdfast.sample_from_logits(torch.randn(rows, V, generator=g) * 3, n, 2.0, generator=g)
            for _ in range(n_batches)]


def test_sampled_round_trip_and_header(tmp_path):
    path = tmp_path / "s.kdtopk"
    data = sampled_batches()
    k = data[0].indices.shape[-1]
    with kdfast.TopKStore.create(path, k, 1000, kind="sampled", temperature=2.0) as w:
        for sampled in data:
            w.append(sampled)
    r = kdfast.TopKStore.open(path, kind="sampled", temperature=2.0, k=k, vocab_size=1000)
    assert (r.kind, r.temperature, len(r)) == ("sampled", 2.0, 15) and "sampled at T=2" in repr(r)
    assert path.stat().st_size == 64 + 15 * 8 * k  # 8 bytes an entry: int32 index, uint16 count, 16-bit log-prob
    got = r[3:11]
    assert isinstance(got, kdfast.Sampled)
    want_idx = torch.cat([d.indices for d in data])[3:11]
    want_counts = torch.cat([d.counts for d in data])[3:11]
    want_lp = torch.cat([d.logprobs for d in data])[3:11]
    used = want_counts > 0
    assert torch.equal(got.counts.long(), want_counts.long())
    assert torch.equal(got.indices.long()[used], want_idx.long()[used])
    torch.testing.assert_close(got.logprobs.float()[used], want_lp[used].to(torch.bfloat16).float())
    assert (got.counts.sum(-1) == 12).all()
    # the store's rows give the same loss as the sampled teacher they came from (up to bfloat16 log-probs)
    s = torch.randn(8, 1000, dtype=torch.float64)
    exact = kdfast.sampled_kd_div(s, kdfast.Sampled(want_idx, want_counts, want_lp.double()), 2.0)
    torch.testing.assert_close(kdfast.sampled_kd_div(s, got, 2.0), exact, rtol=1e-2, atol=1e-2)


def test_kind_and_temperature_mismatches_are_refused(tmp_path):
    topk, sampled = tmp_path / "t.kdtopk", tmp_path / "s.kdtopk"
    with kdfast.TopKStore.create(topk, 8, 1000) as w:
        w.append(*batches()[0])
        with pytest.raises(TopKStoreError, match="t.kdtopk: holds a top-k teacher; cannot append a sampled"):
            w.append(sampled_batches(n=8)[0])
    data = sampled_batches(n=8)[0]
    with kdfast.TopKStore.create(sampled, 8, 1000, kind="sampled", temperature=2.0) as w:
        w.append(data)
        with pytest.raises(TopKStoreError, match="s.kdtopk: holds a sampled teacher .*cannot append a top-k"):
            w.append(*batches()[0])
    with pytest.raises(TopKStoreError, match=r"s.kdtopk: holds a sampled teacher \(drawn at T = 2\); expected a "
                                             r"top-k teacher"):
        kdfast.TopKStore.open(sampled, kind="topk")
    with pytest.raises(TopKStoreError, match=r"t.kdtopk: holds a top-k teacher; expected a sampled teacher"):
        kdfast.TopKStore.open(topk, kind="sampled")
    with pytest.raises(TopKStoreError, match=r"s.kdtopk: holds a sampled teacher \(drawn at T = 2\); expected a "
                                             r"sampled teacher \(drawn at T = 1\)"):
        kdfast.TopKStore.open(sampled, temperature=1.0)
    with pytest.raises(TopKStoreError, match="s.kdtopk: holds a sampled teacher .*T = 4"):
        kdfast.TopKStore.create(sampled, 8, 1000, kind="sampled", temperature=4.0, append=True)
    with pytest.raises(ValueError, match="needs the temperature"):
        kdfast.TopKStore.create(tmp_path / "x", 8, 1000, kind="sampled")
    with pytest.raises(ValueError, match="takes no temperature"):
        kdfast.TopKStore.create(tmp_path / "x", 8, 1000, temperature=2.0)
    with pytest.raises(ValueError, match="kind must be one of 'topk', 'sampled'"):
        kdfast.TopKStore.create(tmp_path / "x", 8, 1000, kind="dense")
    with pytest.raises(ValueError, match="temperature must be in"):
        kdfast.TopKStore.create(tmp_path / "x", 8, 1000, kind="sampled", temperature=0.0)
    assert kdfast.TopKStore.open(topk, kind="topk", temperature=3.0).kind == "topk"  # top-k: T is the loss's


def test_version_1_store_is_still_read_and_appended(tmp_path):
    """A store written by the previous format (version 1: top-k only, no kind or temperature) reads as a top-k
    store, and appending keeps it readable."""
    path = tmp_path / "old.kdtopk"
    idx, lp = batches(n_batches=1, k=4)[0]
    header = struct.pack("<8sIIQQB", b"KDFTOPK\0", 1, 4, 1000, 5, 1).ljust(64, b"\0")
    record = bytearray()
    for i in range(5):
        valid = lp[i] > float("-inf")
        record += torch.where(valid, idx[i], 0).to(torch.int32).numpy().tobytes()
        record += lp[i].to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    path.write_bytes(header + bytes(record))
    r = kdfast.TopKStore.open(path, kind="topk", k=4)
    got = r[0:5]
    assert r.kind == "topk" and isinstance(got, kdfast.TopK)
    torch.testing.assert_close(got.logprobs.float(), lp.to(torch.bfloat16).float())
    with kdfast.TopKStore.create(path, 4, 1000, append=True) as w:
        w.append(idx, lp)
    assert len(kdfast.TopKStore.open(path)) == 10 and path.read_bytes()[8:12] == struct.pack("<I", 1)


def test_corrupt_kind_is_refused(tmp_path):
    path = tmp_path / "c.kdtopk"
    kdfast.TopKStore.create(path, 4, 10).close()
    raw = bytearray(path.read_bytes())
    raw[33] = 7
    path.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match="c.kdtopk: corrupt top-k store header"):
        kdfast.TopKStore.open(path)


def test_losses_and_store_need_no_numpy(tmp_path):
    """torch is kdfast's one requirement: with numpy unimportable, the losses and a store's write and read work."""
    script = f'''
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "numpy":
            raise ModuleNotFoundError("numpy is blocked", name=name)
sys.meta_path.insert(0, Block())
warnings.simplefilter("ignore")  # torch warns that numpy is missing
import torch, kdfast
s, t = torch.randn(3, 50, requires_grad=True), torch.randn(3, 50)
kdfast.kd_div(s, t, 2.0).backward()
path = {str(tmp_path / "t.kdtopk")!r}
with kdfast.TopKStore.create(path, k=4, vocab_size=50) as store:
    store.append(kdfast.topk_from_logits(t, 4))
back = kdfast.TopKStore.open(path).read(0, 3)
assert torch.equal(back.indices.long(), kdfast.topk_from_logits(t, 4).indices.long())
assert "numpy" not in sys.modules
print("ok")
'''
    root = pathlib.Path(kdfast.__file__).resolve().parents[1]  # the kdfast this test imported
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
