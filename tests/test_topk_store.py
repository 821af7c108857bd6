"""TopKStore: written batch by batch, read back memory-mapped by row range; foreign, truncated and mismatched files
are refused with one error naming the file."""
import struct

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
    raw[8:12] = struct.pack("<I", 2)
    path.write_bytes(bytes(raw))
    with pytest.raises(TopKStoreError, match="v.kdtopk: top-k store format version 2"):
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
