"""`python -m kdfast topk-build` and `llm-train` on tiny randomly initialised Hugging Face models (Llama-style with
its own lm_head, Qwen2-style with the lm_head tied to the embeddings), saved with save_pretrained, with a BPE
tokenizer trained here on generated text: no download. The torchrun tests run 2 gloo processes (FSDP2)."""
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import kdfast  # noqa: E402
from kdfast.topk_store import TopKStore  # noqa: E402
from kdfast.train import hf_data, llm_train, topk_build  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYLLABLES = "ka lo mi ne ru ta si po ve du".split()
NOUNS = ["".join(random.Random(i).choices(SYLLABLES, k=3)) for i in range(60)]  # made-up words: a vocabulary of ~300
VERBS = "sees chases likes finds follows hears".split()
ADJECTIVES = "big small red old quick lazy".split()


def sentence(rng) -> str:
    a, b = rng.choice(NOUNS), rng.choice(NOUNS)
    return f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {b} ."


def corpus(seed: int, documents: int) -> list:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(3, 12))) for _ in range(documents)]


def make_tokenizer(texts, vocab_size=300):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                             show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def make_model(kind: str, width: int, vocab: int, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Text files, and teacher and student folders of each kind sharing one tokenizer; a student with another
    tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    train, held_out = corpus(0, 48), corpus(1, 8)
    (root / "a.txt").write_text("\n".join(train[:24]))
    with open(root / "b.jsonl", "w") as fh:
        for text in train[24:]:
            fh.write(json.dumps({"text": text}) + "\n")
    (root / "held_out.txt").write_text("\n".join(held_out))
    tokenizer = make_tokenizer(train)
    vocab = len(tokenizer)
    for kind in ("llama", "qwen2"):
        for role, width, seed in (("teacher", 64, 1), ("student", 32, 2)):
            folder = root / f"{kind}-{role}"
            make_model(kind, width, vocab, seed).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    other = make_tokenizer(corpus(5, 48), vocab_size=vocab)
    make_model("llama", 32, len(other), 3).save_pretrained(root / "other-student")
    other.save_pretrained(root / "other-student")
    return root


def build(world, kind, out, *extra):
    """A top-k store of k = 16, or with --sample in extra a sampled store."""
    k = () if "--sample" in extra else ("--k", "16")
    argv = ["--teacher", str(world / f"{kind}-teacher"), "--data", str(world / "a.txt"), str(world / "b.jsonl"),
            "--out", str(out), *k, "--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--no-progress", *extra]
    assert topk_build.main(argv) == 0


def train_argv(world, kind, store, out, *extra):
    return ["--student", str(world / f"{kind}-student"), "--store", str(store), "--out", str(out), "--alpha", "0.5",
            "--temperature", "2", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu", "--no-progress", *extra]


def held_out_loss(folder, world) -> float:
    """Mean next-token cross-entropy of the held-out text, the model reloaded with from_pretrained."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    seqs = hf_data.sequences([(world / "held_out.txt").read_text()], tokenizer, 32)
    ids, mask, _ = hf_data.pad_batch(seqs, tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def losses(out) -> list:
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pipeline_distils_a_student(world, tmp_path, kind):
    store = tmp_path / "store.kdtk"
    build(world, kind, store, "--max-tokens", "1200")
    meta = hf_data.read_meta(str(store))
    lengths = np.fromfile(str(store) + ".lengths", dtype="<i4")
    assert meta["complete"] and meta["rows"] == int((lengths - 1).sum()) == len(TopKStore.open(store))
    # The store's rows are the teacher's log-softmax top-k at the stored positions.
    teacher = transformers.AutoModelForCausalLM.from_pretrained(world / f"{kind}-teacher").eval()
    tokens = np.fromfile(str(store) + ".tokens", dtype="<i4")
    first = torch.as_tensor(tokens[:lengths[0]], dtype=torch.long)[None]
    with torch.no_grad():
        expected = torch.log_softmax(teacher(first).logits[0, :-1].float(), -1).topk(16, -1)
    got = TopKStore.open(store).read(0, lengths[0] - 1)
    torch.testing.assert_close(got.logprobs.float(), expected.values, atol=2e-2, rtol=1e-2)
    assert (got.indices.long() == expected.indices).float().mean() > 0.95  # near-ties may swap in bfloat16

    out = tmp_path / "run"
    steps = 4 * -(-meta["sequences"] // 8)
    assert llm_train.main(train_argv(world, kind, store, out, "--epochs", "4", "--batch-size", "8")) == 0
    log = losses(out)
    assert len(log) == steps and np.mean(log[-3:]) < np.mean(log[:3])
    assert json.loads((out / "metrics.json").read_text())["steps"] == steps
    assert held_out_loss(out, world) < held_out_loss(world / f"{kind}-student", world) - 0.5


@pytest.mark.parametrize("options", [(), ("--sample", "8", "--sample-temperature", "2", "--seed", "3")])
def test_topk_build_resumes_after_a_kill(world, tmp_path, monkeypatch, options):
    """A killed build run again gives the files of an unbroken one (a sampled build the same draws)."""
    whole, killed = tmp_path / "whole.kdtk", tmp_path / "killed.kdtk"
    build(world, "llama", whole, "--max-tokens", "800", *options)
    calls = {"n": 0}
    write_meta = hf_data.write_meta

    def dies_on_the_fourth_batch(store, meta):
        calls["n"] += 1
        if calls["n"] == 5:  # the fresh meta, 3 batches, then the 4th batch's rows are on disk but not recorded
            raise KeyboardInterrupt
        write_meta(store, meta)

    monkeypatch.setattr(hf_data, "write_meta", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        build(world, "llama", killed, "--max-tokens", "800", *options)
    monkeypatch.setattr(hf_data, "write_meta", write_meta)
    assert hf_data.read_meta(str(killed))["batches"] == 3
    assert len(TopKStore.open(killed)) > hf_data.read_meta(str(killed))["rows"]
    build(world, "llama", killed, "--max-tokens", "800", *options)
    for suffix in ("", ".tokens", ".lengths"):
        assert pathlib.Path(str(killed) + suffix).read_bytes() == pathlib.Path(str(whole) + suffix).read_bytes()
    if options:  # the draws follow --seed: another seed draws another store
        other = tmp_path / "other.kdtk"
        build(world, "llama", other, "--max-tokens", "800", *options[:-1], "4")
        assert other.read_bytes() != whole.read_bytes()
        assert TopKStore.open(whole).kind == "sampled" and TopKStore.open(whole).temperature == 2


def test_llm_train_resumes_from_its_checkpoint(world, tmp_path, monkeypatch):
    store = tmp_path / "store.kdtk"
    build(world, "qwen2", store, "--max-tokens", "300")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert llm_train.main(train_argv(world, "qwen2", store, straight, "--epochs", "2", "--save-every", "3")) == 0
    drop = llm_train._drop_older

    def dies_after_the_checkpoint(out, step, rank):
        drop(out, step, rank)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_train, "_drop_older", dies_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        llm_train.main(train_argv(world, "qwen2", store, killed, "--epochs", "2", "--save-every", "3"))
    monkeypatch.setattr(llm_train, "_drop_older", drop)
    assert (killed / "checkpoint-3").is_dir() and len(losses(killed)) == 3
    assert llm_train.main(train_argv(world, "qwen2", store, killed, "--epochs", "2", "--save-every", "3")) == 2
    assert llm_train.main(train_argv(world, "qwen2", store, killed, "--epochs", "2", "--save-every", "3",
                                     "--resume")) == 0
    np.testing.assert_allclose(losses(killed), losses(straight), rtol=1e-6, atol=1e-7)
    a = transformers.AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(killed).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_mismatched_store_and_bad_paths_are_refused(world, tmp_path, capsys):
    store = tmp_path / "store.kdtk"
    build(world, "llama", store, "--max-tokens", "200")
    capsys.readouterr()
    argv = train_argv(world, "llama", store, tmp_path / "run")
    argv[1] = str(world / "other-student")
    assert llm_train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-teacher" in err and "other-student" in err and "tokenizer" in err
    assert llm_train.main(train_argv(world, "llama", tmp_path / "missing.kdtk", tmp_path / "run")) == 2
    assert "missing.kdtk: no such file" in capsys.readouterr().err
    assert topk_build.main(["--teacher", str(tmp_path / "nowhere"), "--data", str(world / "a.txt"), "--out",
                            str(tmp_path / "s.kdtk")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    # A store of other settings is not appended to.
    assert topk_build.main(["--teacher", str(world / "llama-teacher"), "--data", str(world / "a.txt"),
                            str(world / "b.jsonl"), "--out", str(store), "--k", "16", "--seq-len", "32",
                            "--batch-size", "4", "--max-tokens", "300"]) == 2
    assert "a store built with other settings (sequences_sha256, max_tokens)" in capsys.readouterr().err


def torchrun(nproc, module_argv, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "kdfast", *module_argv]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def topk_build_on_two_processes(world, kind, one, two):
    """The store of 2 processes (each runs the teacher on every other batch; rank 0 writes) is the store of 1."""
    torchrun(2, ["topk-build", "--teacher", str(world / f"{kind}-teacher"), "--data", str(world / "a.txt"),
                 str(world / "b.jsonl"), "--out", str(two), "--k", "16", "--seq-len", "32", "--batch-size", "2",
                 "--device", "cpu", "--max-tokens", "600"])
    for suffix in (".tokens", ".lengths"):
        assert pathlib.Path(str(two) + suffix).read_bytes() == pathlib.Path(str(one) + suffix).read_bytes()
    a, b = TopKStore.open(one), TopKStore.open(two)
    torch.testing.assert_close(b[0:len(b)].logprobs.float(), a[0:len(a)].logprobs.float(), atol=1e-2, rtol=0)


def sampled_build_on_two_processes(world, kind, tmp_path):
    """A sampled store of 2 processes draws as 1 process: batch b's draws are seeded by (--seed, b) whichever process
    runs it (rows whose teacher logits differ in the last bits between thread counts may draw otherwise)."""
    one, two = tmp_path / "sampled-one.kdtk", tmp_path / "sampled-two.kdtk"
    options = ["--sample", "8", "--seed", "5", "--max-tokens", "600", "--batch-size", "2"]
    build(world, kind, one, *options)
    torchrun(2, ["topk-build", "--teacher", str(world / f"{kind}-teacher"), "--data", str(world / "a.txt"),
                 str(world / "b.jsonl"), "--out", str(two), "--seq-len", "32", "--device", "cpu", *options])
    a, b = TopKStore.open(one), TopKStore.open(two)
    a, b = a[0:len(a)], b[0:len(b)]
    assert b.indices.shape == a.indices.shape
    same = ((a.indices == b.indices) & (a.counts == b.counts)).all(-1).float().mean()
    assert same > 0.99, float(same)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fsdp2_on_two_processes_matches_one(world, tmp_path, kind):
    one, two = tmp_path / "one.kdtk", tmp_path / "two.kdtk"
    build(world, kind, one, "--max-tokens", "600")
    # topk-build under torchrun once a kind (each launch imports transformers in every process)
    if kind == "llama":
        topk_build_on_two_processes(world, kind, one, two)
    else:
        sampled_build_on_two_processes(world, kind, tmp_path)

    # SGD: Adam's update g / sqrt(v) would blow float noise in near-zero gradient entries up to the learning rate.
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    options = ("--epochs", "2", "--optimizer", "sgd", "--lr", "0.2")
    assert llm_train.main(train_argv(world, kind, one, single, *options)) == 0
    torchrun(2, ["llm-train", *train_argv(world, kind, one, sharded, *options)])
    assert len(losses(sharded)) == len(losses(single)) >= 4
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-4, atol=1e-5)
    a = transformers.AutoModelForCausalLM.from_pretrained(single).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)


def test_without_transformers_the_commands_name_the_extra(monkeypatch, capsys):
    import importlib.util

    from kdfast import __main__ as cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else
                        find_spec(name, *a))
    for command in ("topk-build", "llm-train"):
        assert cli.main([command, "--help"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'pip install "kdfast[hf]"' in err and command in err


def test_sampled_store_follows_the_teacher(world, tmp_path):
    """--sample N: every position holds N draws from softmax(teacher logits / T) (T = --sample-temperature, in the
    header), repeats merged into counts, with their log-probabilities at T. Pooled over the positions, the draws'
    frequencies on the teacher's rank-r tokens match the teacher's probabilities (a chi-square over rank groups)."""
    n, temperature = 400, 0.5
    store = tmp_path / "sampled.kdtk"
    build(world, "llama", store, "--max-tokens", "200", "--sample", str(n), "--sample-temperature", str(temperature))
    meta = hf_data.read_meta(str(store))
    opened = TopKStore.open(store)
    assert (opened.kind, opened.k, opened.temperature, meta["kind"], len(opened)) == \
        ("sampled", n, temperature, "sampled", meta["rows"])
    lengths = np.fromfile(str(store) + ".lengths", dtype="<i4")
    tokens = torch.as_tensor(np.fromfile(str(store) + ".tokens", dtype="<i4"), dtype=torch.long)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(world / "llama-teacher").eval()
    with torch.no_grad():
        logq = torch.cat([torch.log_softmax(teacher(tokens[at:at + length][None]).logits[0, :-1].float() / temperature,
                                            -1) for at, length in zip(np.cumsum(lengths) - lengths, lengths)])
    got = opened.read(0, len(opened))
    drawn = got.counts > 0
    assert (got.counts.sum(-1) == n).all()
    torch.testing.assert_close(got.logprobs.float()[drawn], logq.gather(-1, got.indices.long())[drawn],
                               atol=2e-2, rtol=1e-2)
    ids = torch.where(drawn, got.indices.long(), -1)
    assert all(len(set(row[row >= 0].tolist())) == int((row >= 0).sum()) for row in ids)  # repeats merged
    observed = torch.zeros_like(logq).scatter_add_(-1, got.indices.long(), got.counts.float())
    assert observed.sum() == n * len(opened)

    def chi2(logp):  # observed against expected draws on the tokens of each rank group of logp, pooled over rows
        ranks = logp.argsort(-1, descending=True)
        groups = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 10), (10, 20), (20, 50), (50, 100), (100, logp.shape[1])]
        expected = torch.stack([n * logp.gather(-1, ranks[:, a:b]).exp().sum() for a, b in groups]).double()
        seen = torch.stack([observed.gather(-1, ranks[:, a:b]).sum() for a, b in groups]).double()
        return float(((seen - expected) ** 2 / expected).sum())

    assert chi2(torch.log_softmax(logq * temperature, -1)) > 300  # it tells T = 1 from T (measured: ~1900)
    assert chi2(logq) < 35  # 8 degrees of freedom: P(chi2 > 35) < 3e-5 (measured: 5.5)


def test_llm_train_from_a_sampled_store(world, tmp_path, capsys):
    """llm-train reads the store's kind from its header: a sampled store trains a student with its Sampled teacher
    at the temperature its samples were drawn at (the held-out loss falls); what it refuses is named."""
    store = tmp_path / "sampled.kdtk"
    build(world, "qwen2", store, "--max-tokens", "1200", "--sample", "16", "--sample-temperature", "2")
    out = tmp_path / "run"
    assert llm_train.main(train_argv(world, "qwen2", store, out, "--epochs", "4", "--batch-size", "8")) == 0
    log = losses(out)
    assert np.mean(log[-3:]) < np.mean(log[:3])
    assert held_out_loss(out, world) < held_out_loss(world / "qwen2-student", world) - 0.5
    # KD alone, one step over every sequence, without --temperature: fused_linear_kd on the store's Sampled rows
    # at the temperature they were drawn at.
    argv = train_argv(world, "qwen2", store, tmp_path / "one", "--alpha", "1", "--max-steps", "1", "--batch-size",
                      "1000")
    assert llm_train.main(argv[:argv.index("--temperature")] + argv[argv.index("--temperature") + 2:]) == 0
    meta = hf_data.read_meta(str(store))
    lengths, token_offsets, _, tokens = hf_data.TokenStream(str(store)).read(meta)
    student = transformers.AutoModelForCausalLM.from_pretrained(world / "qwen2-student")
    ids, mask, rows = hf_data.pad_batch([tokens[a:a + n].tolist() for a, n in zip(token_offsets, lengths)], 0)
    with torch.no_grad():
        hidden = student.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][rows]
        expected = kdfast.fused_linear_kd(hidden, student.lm_head.weight, TopKStore.open(store)[0:meta["rows"]],
                                          temperature=2.0)
    np.testing.assert_allclose(losses(tmp_path / "one"), [float(expected)], rtol=1e-4)
    capsys.readouterr()
    for extra, words in ((("--divergence", "reverse_kl"), ("reverse_kl", "sampled store", "divergence='kl'")),
                         (("--tail", "bucket"), ("bucket", "sampled store", "tail='renormalize'")),
                         (("--temperature", "1"), ("--temperature 1", "sampled store", "drawn at T = 2"))):
        argv = train_argv(world, "qwen2", store, tmp_path / "refused", *extra)
        if extra[0] == "--temperature":
            argv = argv[:argv.index("--temperature")] + argv[argv.index("--temperature") + 2:] + list(extra)
        assert llm_train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_llm_train_takes_every_top_k_divergence(world, tmp_path, capsys):
    """reverse_kl and jsd (with --beta) from a top-k store, KD alone (--alpha 1): each lowers its loss, and each is
    the loss it names (the first steps' losses differ: kl ~9.5, reverse_kl ~0.008, jsd ~0.002 at beta 0.5, ~0.001 at
    0.1); an unknown divergence is refused in one line naming the choices."""
    store = tmp_path / "store.kdtk"
    build(world, "llama", store, "--max-tokens", "400")
    first = []
    for divergence, beta in (("kl", "0.5"), ("reverse_kl", "0.5"), ("jsd", "0.5"), ("jsd", "0.1")):
        out = tmp_path / f"{divergence}-{beta}"
        steps = ("--epochs", "6") if beta == "0.5" else ("--max-steps", "1")
        assert llm_train.main(train_argv(world, "llama", store, out, "--divergence", divergence, "--beta", beta,
                                         "--alpha", "1", *steps)) == 0
        log = losses(out)
        first.append(log[0])
        if beta == "0.5":
            assert np.mean(log[-3:]) < 0.8 * np.mean(log[:3]), (divergence, log)
    assert all(a > 1.2 * b for a, b in zip(first, first[1:])), first
    capsys.readouterr()
    assert llm_train.main(train_argv(world, "llama", store, tmp_path / "bad", "--divergence", "kld")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--divergence kld" in err and "kl, reverse_kl, jsd" in err
    assert llm_train.main(train_argv(world, "llama", store, tmp_path / "bad", "--divergence", "jsd", "--beta",
                                     "1.5")) == 2
    assert "beta must be strictly inside (0, 1)" in capsys.readouterr().err
    assert topk_build.main(["--teacher", str(world / "llama-teacher"), "--data", str(world / "a.txt"), "--out",
                            str(tmp_path / "s.kdtk"), "--k", "8", "--sample", "8"]) == 2
    assert "--k 8 and --sample 8: give one" in capsys.readouterr().err
