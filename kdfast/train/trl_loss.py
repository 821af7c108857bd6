"""kdfast's fused linear + KD as the loss of TRL's DistillationTrainer (trl.trainer.DistillationTrainer).

TRL's trainer projects the student's and the teacher's last hidden states through their lm_head weights chunk by
chunk (trl.trainer.distillation_trainer._chunked_divergence_loss). `use_fused_loss()` is the one call that puts
`fused_divergence_loss`, the same loss on kdfast's fused kernels, in its place for every DistillationTrainer of the
process; it returns a function that puts TRL's own back.
"""
from __future__ import annotations

import inspect

import torch

from ..fused_linear import TeacherHead, default_chunk_size, fused_linear_kd

# The arguments TRL passes (TRL 1.16); use_fused_loss refuses a TRL whose loss takes others.
PARAMETERS = ("student_hidden_states", "teacher_hidden_states", "student_lm_head_weight", "teacher_lm_head_weight",
              "completion_mask", "beta", "num_items_in_batch", "student_lm_head_bias", "teacher_lm_head_bias",
              "student_logit_scale", "teacher_logit_scale", "student_final_logit_softcapping",
              "teacher_final_logit_softcapping", "temperature")


def _full(tensor):
    """A plain tensor of an FSDP2-sharded (DTensor) lm_head weight or bias, gathered once for the whole loss."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


def _scaled(tensor, scale: float):
    return tensor if tensor is None or scale == 1.0 else tensor * scale


@torch.no_grad()
def _entropy_sum(hidden, weight, bias, temperature: float) -> torch.Tensor:
    """Sum over rows of the entropy of softmax((hidden @ weight.T + bias) / T), a chunk of rows at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk = default_chunk_size(max(1, hidden.shape[0]), weight.shape[0], torch.float32, hidden.device.type)
    for lo in range(0, hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(hidden[lo:lo + chunk], weight, bias).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        total -= (logp.exp() * logp).sum()
    return total


def fused_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                          completion_mask, beta, num_items_in_batch=None, student_lm_head_bias=None,
                          teacher_lm_head_bias=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
                          student_final_logit_softcapping=None, teacher_final_logit_softcapping=None, temperature=1.0):
    """TRL's generalized JSD of the tempered next-token distributions (beta 0: KL(teacher || student), 1: the
    reverse KL, between: the JSD with mixture (1 - beta) p_student + beta p_teacher), mean over the positions where
    completion_mask is set (sum / num_items_in_batch when given), from kdfast.fused_linear_kd: no (tokens x
    vocabulary) logits are kept. Returns (loss, the student's entropy summed over those positions, their count), as
    TRL's function does; the entropy (a logged metric) costs one more chunked projection without gradient.
    Logit soft-capping (Gemma-style) is not supported: it raises."""
    if student_final_logit_softcapping is not None or teacher_final_logit_softcapping is not None:
        raise ValueError("kdfast's fused distillation loss has no final-logit soft-capping (the model's config sets "
                         "final_logit_softcapping); keep TRL's own loss for this model")
    s_w = _scaled(_full(student_lm_head_weight), student_logit_scale)
    s_b = _scaled(_full(student_lm_head_bias), student_logit_scale)
    with torch.no_grad():
        t_w = _scaled(_full(teacher_lm_head_weight), teacher_logit_scale)
        t_b = _scaled(_full(teacher_lm_head_bias), teacher_logit_scale)
    valid = completion_mask.reshape(-1) != 0
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    beta = float(beta)
    divergence = {0.0: "kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    loss = fused_linear_kd(h_s, s_w, TeacherHead(h_t, t_w.to(h_t.dtype), None if t_b is None else t_b.to(h_t.dtype)),
                           student_bias=s_b, temperature=temperature, divergence=divergence,
                           beta=beta if divergence == "jsd" else 0.5, scale_t2=False)
    n_valid = valid.sum()
    if num_items_in_batch is not None:  # TRL's reduction: sum over the local rows / the global count
        loss = loss * n_valid / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss, _entropy_sum(h_s.detach(), s_w.detach(), None if s_b is None else s_b.detach(), temperature), n_valid


def use_fused_loss():
    """Makes TRL's DistillationTrainer compute its loss with fused_divergence_loss (every trainer of this process,
    from now on). Returns a function that restores TRL's own loss."""
    from trl.trainer import distillation_trainer as module

    original = getattr(module, "_chunked_divergence_loss", None)
    if original is None or tuple(inspect.signature(original).parameters) != PARAMETERS:
        import trl

        raise RuntimeError(f"TRL {trl.__version__}'s DistillationTrainer has no loss function of the form kdfast "
                           f"replaces (trl.trainer.distillation_trainer._chunked_divergence_loss{PARAMETERS}, "
                           f"as in TRL 1.16)")
    module._chunked_divergence_loss = fused_divergence_loss

    def restore():
        module._chunked_divergence_loss = original

    return restore
