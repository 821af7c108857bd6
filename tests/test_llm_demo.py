"""The LLM main job (`python -m kdfast llm-demo`) end to end in a tiny version (a small corpus, tiny models, a few
steps), its pieces (corpus, tokenizer, model), and its command line. Skipped without `tokenizers`."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch

import kdfast
from kdfast.train import llm_demo, text
from kdfast.train.lm import CausalLM, LMConfig

TINY = llm_demo.Settings(vocab=1024, context=16, batch=4, teacher={"dim": 32, "layers": 1, "heads": 2},
                         student={"dim": 16, "layers": 1, "heads": 2}, teacher_steps=6, steps=5, warmup=1, k=8,
                         samples=4, eval_every=2, eval_windows=8, train_chars=60_000, validation_chars=10_000,
                         progress=False)


def test_corpus_is_a_seeded_split_by_file():
    a, b, other = (text.load_corpus(seed, 60_000, 10_000) for seed in (0, 0, 1))
    assert a.train_files == b.train_files and a.validation_files == b.validation_files
    assert not set(a.train_files) & set(a.validation_files)
    assert a.train_files != other.train_files
    assert 0 < sum(map(len, a.train)) <= 60_000 and 0 < sum(map(len, a.validation)) <= 10_000
    assert all(f.endswith(".py") and not f.startswith(("encodings", "site-packages")) for f in a.train_files)


def test_tokenizer_round_trips_and_has_the_asked_vocabulary():
    pytest.importorskip("tokenizers")
    corpus = text.load_corpus(0)  # the job's corpus: enough text for every one of the 8,192 tokens
    tokenizer = text.train_tokenizer(corpus.train, 8192)
    assert tokenizer.get_vocab_size() == 8192
    assert tokenizer.token_to_id(text.END_OF_FILE) == 0
    tokens = text.encode(tokenizer, corpus.validation[:1])
    assert tokens[-1] == 0 and tokenizer.decode(tokens[:-1].tolist()) == corpus.validation[0]
    w = text.windows(tokens, 16)
    assert w.shape[1] == 17 and torch.equal(w[1, 0], w[0, -1])  # next-token targets run across windows


def test_windows_refuse_a_short_stream():
    with pytest.raises(ValueError, match="no window"):
        text.windows(torch.arange(5), 16)


def test_causal_lm_is_causal_and_its_head_reads_the_hidden_states():
    torch.manual_seed(0)
    model = CausalLM(LMConfig(50, context=8, dim=16, layers=2, heads=4))
    x = torch.randint(0, 50, (2, 8))
    changed = x.clone()
    changed[:, 5:] = (x[:, 5:] + 1) % 50
    torch.testing.assert_close(model(x)[:, :5], model(changed)[:, :5])     # no position sees the future
    torch.testing.assert_close(model(x), model.lm_head(model.hidden(x)))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        CausalLM(LMConfig(50, dim=10, heads=4))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("llm-demo")
    lines = []
    report = llm_demo.job(replace(TINY, out=str(out)), log=lines.append)
    return out, report, lines


def test_tiny_run_writes_its_outputs(tiny_run):
    out, report, lines = tiny_run
    for name in ("results.json", "llm-demo.md", "llm-demo.png", "tokenizer.json"):
        assert os.path.getsize(out / name) > 0
    assert json.loads((out / "results.json").read_text())["models"] == json.loads(json.dumps(report["models"]))
    markdown = (out / "llm-demo.md").read_text()
    for model in report["models"]:
        assert model["model"] in markdown and model["model"] in "\n".join(lines)


def test_tiny_run_reports_every_student(tiny_run):
    _, report, _ = tiny_run
    names = [m["model"] for m in report["models"]]
    assert names == ["teacher"] + [f"student: {label}" for label, *_ in llm_demo.STUDENTS]
    for m in report["models"]:
        assert math.isfinite(m["val_ppl"]) and 1 < m["val_ppl"] < 10 * report["vocab"]
        assert math.isclose(m["val_ppl"], math.exp(m["val_loss"]))
        assert m["peak_mib"] > 0 and m["step_ms"] > 0
        steps = TINY.teacher_steps if m["model"] == "teacher" else TINY.steps
        assert m["steps"] == steps and [s for s, _ in m["curve"]] == [0, 2, 4, steps]  # eval_every 2, and the end
    # Every student starts from the same weights: the same validation loss before the first step.
    assert len({m["curve"][0][1] for m in report["models"][1:]}) == 1


def test_tiny_run_store_holds_the_teachers_top_k(tiny_run):
    out, report, _ = tiny_run
    store = kdfast.TopKStore.open(os.path.join(out, f"teacher-top{TINY.k}.kdtopk"), k=TINY.k,
                                  vocab_size=report["vocab"])
    assert len(store) == TINY.steps * TINY.batch * TINY.context
    rows = TINY.steps * TINY.batch * TINY.context
    assert report["store"]["rows"] == rows
    indices, logprobs = store.read(0, rows)
    assert indices.shape == (rows, TINY.k) and logprobs.shape == (rows, TINY.k)
    assert (indices >= 0).all() and (indices < report["vocab"]).all() and (logprobs.float() <= 0).all()


def test_tiny_run_sampled_store_holds_the_teachers_samples_in_fewer_bytes(tiny_run):
    out, report, _ = tiny_run
    rows = TINY.steps * TINY.batch * TINY.context
    store = kdfast.TopKStore.open(os.path.join(out, f"teacher-sampled{TINY.samples}.kdtopk"), kind="sampled",
                                  temperature=TINY.temperature, k=TINY.samples, vocab_size=report["vocab"])
    assert len(store) == rows == report["sampled_store"]["rows"]
    sampled = store.read(0, rows)
    assert isinstance(sampled, kdfast.Sampled) and (sampled.counts.sum(-1) == TINY.samples).all()
    assert report["sampled_store"]["bytes_per_token"] <= report["store"]["bytes_per_token"]
    # the job's own settings: n = 12 samples at 8 bytes an entry against k = 32 entries at 6
    job = llm_demo.Settings()
    assert job.samples == 12 and 8 * job.samples <= 6 * job.k


def test_run_is_deterministic_for_a_seed(tmp_path):
    pytest.importorskip("tokenizers")
    short = replace(TINY, out=str(tmp_path), teacher_steps=3, steps=3)
    first, second = (llm_demo.run(short, log=lambda _: None) for _ in range(2))
    assert len(first["models"]) == 1 + len(llm_demo.STUDENTS)
    assert [m["curve"] for m in first["models"]] == [m["curve"] for m in second["models"]]


def test_teacher_seconds_caps_the_teacher(tmp_path):
    pytest.importorskip("tokenizers")
    report = llm_demo.run(replace(TINY, out=str(tmp_path), teacher_seconds=1e-9, steps=2), log=lambda _: None)
    teacher = report["models"][0]
    assert teacher["steps"] == 1 and teacher["curve"][-1][0] == 1 and math.isfinite(teacher["val_loss"])


def test_missing_tokenizers_is_one_clear_line(monkeypatch, capsys):
    def missing():
        raise text.MissingDependency("the LLM demo needs the `tokenizers` package: pip install 'kdfast[llm]'")
    monkeypatch.setattr(llm_demo, "require_tokenizers", missing)
    assert llm_demo.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kdfast[llm]" in err and "Traceback" not in err


def test_missing_tokenizers_message_names_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(text.MissingDependency, match=r"pip install 'kdfast\[llm\]'"):
        text.require_tokenizers()


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--teacher-seconds", "-1"], "--teacher-seconds must be > 0")])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        llm_demo.main(argv)
    assert message in capsys.readouterr().err


def test_command_is_registered():
    from kdfast.__main__ import COMMANDS
    assert COMMANDS["llm-demo"][0] == "kdfast.train.llm_demo"
