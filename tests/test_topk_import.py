"""python -m kdfast topk-import: small files written in each tool's format (axolotl's KD datasets, OpenAI/vLLM
completion and chat log-probs with token ids) converted into a TopKStore; the generation temperature; bad records
named by line with nothing left behind."""
import json
import math
import os

import pytest
import torch

import kdfast
from kdfast import topk_import
from kdfast.topk_import import TopKImportError, import_topk

V = 50


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # json writes -inf as -Infinity, as axolotl's datasets hold it


def _axolotl_record(seq, k=3, pad=2):
    """One sequence as axolotl's KD chat template leaves it: `pad` leading positions with -inf log-probabilities,
    ids range(k) and mask 0, then k (id, logprob) entries per position; a label of -100 masks its position."""
    g = torch.Generator().manual_seed(seq)
    ids, lps, mask = [], [], []
    for _ in range(pad):
        ids.append(list(range(k)))
        lps.append([-math.inf] * k)
        mask.append([0] * k)
    for pos in range(4):
        lp = torch.log_softmax(torch.randn(V, generator=g) * 2, -1).topk(k)
        ids.append(lp.indices.tolist())
        lps.append(lp.values.tolist())
        mask.append([0 if pos == 1 else 1] * k)
    return {"input_ids": list(range(pad + 4)), "labels": [-100] * (pad + 1) + [1, 2, 3],
            "target_token_ids": ids, "target_logprobs": lps, "target_mask": mask}


def _expected(records):
    rows = []
    for r in records:
        for i, lp, m in zip(r["target_token_ids"], r["target_logprobs"], r["target_mask"]):
            rows.append([(t, v) for t, v, keep in zip(i, lp, m) if keep])
    return rows


def _check_store(out, rows, k):
    store = kdfast.TopKStore.open(out, k=k, vocab_size=V)
    assert len(store) == len(rows)
    idx, lp = store[0:len(store)]
    for r, row in enumerate(rows):
        row = sorted(row, key=lambda e: -e[1])
        got = [(int(i), float(v)) for i, v in zip(idx[r], lp[r].float()) if v > -math.inf]
        assert [i for i, _ in got] == [i for i, _ in row], r
        want = torch.tensor([v for _, v in row]).to(torch.bfloat16).float().tolist()
        assert [v for _, v in got] == want, r


def test_axolotl_jsonl(tmp_path):
    records = [_axolotl_record(s) for s in range(3)]
    src, out = tmp_path / "kd.jsonl", str(tmp_path / "kd.kdtopk")
    _write_jsonl(src, records)
    meta = import_topk("axolotl", src, out, V)
    _check_store(out, _expected(records), 3)
    side = json.load(open(out + ".json"))
    assert side == meta and side["generation_temperature"] == 1.0 and side["rows"] == 18 and side["k"] == 3


def test_axolotl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [_axolotl_record(s, k=4, pad=1) for s in range(2)]
    src, out = tmp_path / "kd.parquet", str(tmp_path / "kd.kdtopk")
    pq.write_table(pa.Table.from_pylist(records), src)
    import_topk("axolotl", src, out, V)
    _check_store(out, _expected(records), 4)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    src = tmp_path / "kd.parquet"
    src.write_bytes(b"PAR1")
    with pytest.raises(TopKImportError, match=r"pyarrow: pip install \"kdfast\[parquet\]\""):
        import_topk("axolotl", src, tmp_path / "out", V)


def _completion(seed, positions=3, k=3, echo_first=False):
    """A vLLM /v1/completions response with logprobs=k and return_tokens_as_token_ids: CompletionLogProbs with a
    {"token_id:N": logprob} dict per position (null for the first prompt token under echo)."""
    g = torch.Generator().manual_seed(seed)
    top, tokens, token_lps = [], [], []
    for pos in range(positions):
        lp = torch.log_softmax(torch.randn(V, generator=g) * 2, -1).topk(k)
        entries = {f"token_id:{i}": v for i, v in zip(lp.indices.tolist(), lp.values.tolist())}
        top.append(None if echo_first and pos == 0 else entries)
        tokens.append(f"token_id:{lp.indices[0].item()}")
        token_lps.append(None if echo_first and pos == 0 else lp.values[0].item())
    return {"id": f"cmpl-{seed}", "object": "text_completion", "model": "teacher",
            "choices": [{"index": 0, "text": "", "finish_reason": "length",
                         "logprobs": {"text_offset": list(range(positions)), "token_logprobs": token_lps,
                                      "tokens": tokens, "top_logprobs": top}}]}


def _chat(seed, positions=2, k=2):
    """A /v1/chat/completions response with logprobs=true, top_logprobs=k and token ids."""
    g = torch.Generator().manual_seed(seed)
    content = []
    for _ in range(positions):
        lp = torch.log_softmax(torch.randn(V, generator=g) * 2, -1).topk(k)
        alts = [{"token": f"token_id:{i}", "logprob": v, "bytes": None}
                for i, v in zip(lp.indices.tolist(), lp.values.tolist())]
        content.append({"token": alts[0]["token"], "logprob": alts[0]["logprob"], "bytes": None,
                        "top_logprobs": alts})
    return {"id": f"chatcmpl-{seed}", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length",
                         "logprobs": {"content": content}}]}


def _openai_rows(record):
    logprobs = record["choices"][0]["logprobs"]
    if "content" in logprobs:
        return [[(int(e["token"][9:]), e["logprob"]) for e in c["top_logprobs"]] for c in logprobs["content"]]
    return [[] if p is None else [(int(t[9:]), v) for t, v in p.items()] for p in logprobs["top_logprobs"]]


def test_openai_completions_and_chat(tmp_path):
    records = [_completion(0, echo_first=True), _chat(1), _completion(2, k=2)]
    records.append(records[0]["choices"][0]["logprobs"])  # a bare logprobs object per line is read too
    src, out = tmp_path / "vllm.jsonl", str(tmp_path / "vllm.kdtopk")
    _write_jsonl(src, records)
    assert topk_import.main(["--format", "openai", str(src), out, "--vocab-size", str(V)]) == 0
    rows = [row for r in records[:3] for row in _openai_rows(r)] + _openai_rows(records[0])
    _check_store(out, rows, 3)  # k = the widest position; narrower ones padded


def test_generation_temperature_rescales_to_t1(tmp_path):
    """A source sampled at T_gen = 2, stored (k = 2 of its 3 entries) as 2 log p renormalised: topk_kd_div at T
    then distils from p^(T_gen / T) renormalised over the k entries."""
    records = [_completion(3, positions=2)]
    src, out = tmp_path / "hot.jsonl", str(tmp_path / "hot.kdtopk")
    _write_jsonl(src, records)
    meta = import_topk("openai", src, out, V, k=2, gen_temperature=2.0, logprob_dtype=torch.float16)
    assert meta["generation_temperature"] == 2.0 and meta["rescaled_to_t1"]
    _, lp = kdfast.TopKStore.open(out)[0:2]
    for r, row in enumerate(_openai_rows(records[0])):
        p = torch.tensor(sorted(v for _, v in row)[::-1][:2], dtype=torch.float64).exp()
        for T in (1.0, 2.0, 0.5):
            want = p ** (2.0 / T) / (p ** (2.0 / T)).sum()
            got = torch.softmax(lp[r].double() / T, -1)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("fmt, line, bad, message", [
    ("openai", 2, "{not json", r":2: not JSON"),
    ("openai", 2, {"choices": [{"logprobs": {"top_logprobs": [{"hello": -0.5}]}}]}, r":2: token 'hello' is not"),
    ("openai", 3, {"top_logprobs": [{"token_id:50": -0.5}]}, r":3: position 0: token id 50 is not in \[0, 50\)"),
    ("openai", 2, {"top_logprobs": [{"token_id:1": 0.5}]}, r":2: position 0: log-probability 0.5 is not"),
    ("openai", 2, {"choices": [{"text": "x"}]}, r":2: a choice without logprobs"),
    ("axolotl", 3, {"target_token_ids": [[1, 2]], "target_logprobs": [[-1.0]], "target_mask": [[1, 1]]},
     r":3: position 0: target_token_ids, target_logprobs and target_mask must be lists of one length"),
    ("axolotl", 2, {"target_token_ids": [[1]], "target_logprobs": [[-1.0]]}, r":2: target_mask must be a list"),
])
def test_bad_records_are_named_and_nothing_is_left(tmp_path, fmt, line, bad, message):
    good = _axolotl_record(0) if fmt == "axolotl" else _completion(0)
    lines = [json.dumps(good)] * (line - 1) + [bad if isinstance(bad, str) else json.dumps(bad), json.dumps(good)]
    src, out = tmp_path / "src.jsonl", str(tmp_path / "out.kdtopk")
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(TopKImportError, match=message):
        import_topk(fmt, src, out, V)
    assert sorted(os.listdir(tmp_path)) == ["src.jsonl"]


def test_cli_error_is_one_line(tmp_path, capsys):
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"top_logprobs": [{"token_id:1": "high"}]}) + "\n")
    assert topk_import.main(["--format", "openai", str(src), str(tmp_path / "o"), "--vocab-size", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("topk-import: ") and "src.jsonl:1: position 0" in err
    assert sorted(os.listdir(tmp_path)) == ["src.jsonl"]
