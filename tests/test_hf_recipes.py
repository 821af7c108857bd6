"""The README's recipes for Hugging Face causal LMs and TRL's GKD trainer, run from the README itself on tiny
randomly initialised models (built from a config, no download), against the losses they replace. Skipped without
transformers (and trl)."""
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 101


def readme_recipes() -> list:
    """The python blocks of the README's section on Hugging Face and TRL recipes, in order."""
    text = README.read_text()
    section = text.split("## Recipes: Hugging Face causal LMs and TRL's GKD trainer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_block(index: int) -> dict:
    namespace = {}
    exec(compile(readme_recipes()[index], f"README.md recipe {index}", "exec"), namespace)
    return namespace


def tiny_model(kind: str, width: int, seed: int):
    """Float64, so that the comparisons below test the recipes and not float32 rounding."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return transformers.LlamaForCausalLM(config).double().eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).double().eval()  # eval: no dropout, so the two losses see one network


def batch(seed=0, rows=3, length=11):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0                      # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :4] = -100                           # a prompt without loss
    return input_ids, attention_mask, labels


def test_readme_has_both_recipes():
    assert len(readme_recipes()) == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_last_hidden_state_is_the_lm_head_input(kind):
    model = tiny_model(kind, 32, 0)
    input_ids, attention_mask, _ = batch()
    full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), full)
    assert out.logits.shape[1] == 1  # the model itself built no (tokens x vocabulary) logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.9, 2.0)])
def test_hf_distillation_loss_matches_the_logits_composition(kind, alpha, temperature):
    loss_fn = run_block(0)["hf_distillation_loss"]
    student, teacher = tiny_model(kind, 32, 0), tiny_model(kind, 48, 1)
    input_ids, attention_mask, labels = batch()
    loss = loss_fn(student, teacher, input_ids, attention_mask, labels, alpha=alpha, temperature=temperature)
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params)

    # The same loss from both models' full logits.
    s = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    y = labels[:, 1:]
    keep = y != -100
    kl = (F.softmax(t / temperature, -1) * (F.log_softmax(t / temperature, -1) - F.log_softmax(s / temperature, -1)))
    kd = kl.sum(-1)[keep].sum() / keep.sum() * temperature**2
    expected = alpha * kd + (1 - alpha) * F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12)


# --- TRL's GKD trainer -------------------------------------------------------------------------------------------

def gkd_trainer(tmp_path, beta, cls=None, max_steps=2):
    pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    cls = cls or run_block(1)["FusedGKDTrainer"]
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    processing = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                      eos_token="</s>")
    input_ids, attention_mask, labels = batch(rows=4)
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                              "labels": labels.tolist()})

    def collate(rows):
        return {key: torch.tensor([r[key] for r in rows]) for key in ("input_ids", "attention_mask", "labels")}

    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=max_steps, lmbda=0.0,
                     beta=beta, learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1,
                     use_cpu=True, disable_tqdm=True, seed=0)
    student, teacher = tiny_model("llama", 32, 0), tiny_model("llama", 48, 1)
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collate,
               processing_class=processing), collate([data[i] for i in range(len(data))])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("accumulated", [None, 17])
def test_fused_gkd_loss_matches_trl(tmp_path, beta, accumulated):
    from trl.experimental.gkd import GKDTrainer
    trainer, inputs = gkd_trainer(tmp_path, beta)
    model = trainer.model
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=accumulated)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    expected = GKDTrainer.compute_loss(trainer, model, inputs, num_items_in_batch=accumulated)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12)


def test_fused_gkd_trainer_trains(tmp_path):
    trainer, _ = gkd_trainer(tmp_path, 0.5, max_steps=3)
    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())


# --- TRL's DistillationTrainer: kdfast.train.trl_loss.use_fused_loss() -----------------------------------------------

def distillation_trainer(tmp_path, beta, temperature=1.0, max_steps=2):
    pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    processing = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                      eos_token="</s>", padding_side="left")
    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=gen)) for n in (3, 5, 4, 6)]
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=max_steps,
                              beta=beta, temperature=temperature, max_completion_length=4, learning_rate=1e-3,
                              report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                              disable_tqdm=True, seed=0)
    student, teacher = tiny_model("llama", 32, 0).float(), tiny_model("llama", 48, 1).float()
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=processing,
                               train_dataset=Dataset.from_dict({"prompt": prompts}))


def completions(rows=3, prompt=4, completion=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"prompt_ids": torch.randint(3, VOCAB, (rows, prompt), generator=gen),
              "completion_ids": torch.randint(3, VOCAB, (rows, completion), generator=gen)}
    inputs["prompt_mask"] = torch.ones_like(inputs["prompt_ids"])
    inputs["prompt_mask"][0, :2] = 0                 # left padding of the prompt
    inputs["completion_mask"] = torch.ones_like(inputs["completion_ids"])
    inputs["completion_mask"][1, 3:] = 0             # a completion that ended early
    return inputs


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature,accumulated", [(1.0, None), (2.0, 23)])
def test_fused_distillation_loss_matches_trl(tmp_path, beta, temperature, accumulated):
    from kdfast.train.trl_loss import use_fused_loss

    trainer = distillation_trainer(tmp_path, beta, temperature)
    model = trainer.accelerator.unwrap_model(trainer.model)
    inputs = completions()
    params = list(model.parameters())
    expected, expected_entropy, expected_n = trainer._compute_loss(model, inputs, accumulated)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    restore = use_fused_loss()
    try:
        loss, entropy, n = trainer._compute_loss(model, inputs, accumulated)
    finally:
        restore()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert int(n) == int(expected_n) == 13
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_distillation_trainer_trains_with_the_fused_loss(tmp_path):
    from trl.trainer import distillation_trainer as module

    from kdfast.train.trl_loss import fused_divergence_loss, use_fused_loss

    trainer = distillation_trainer(tmp_path, 0.5, max_steps=2)
    before = trainer.model.lm_head.weight.detach().clone()
    restore = use_fused_loss()
    try:
        assert module._chunked_divergence_loss is fused_divergence_loss
        result = trainer.train()
    finally:
        restore()
    assert module._chunked_divergence_loss is not fused_divergence_loss
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
