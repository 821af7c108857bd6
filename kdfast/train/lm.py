"""A small GPT-style causal transformer in plain torch, for the LLM main job and tests.

`hidden(tokens)` returns the last hidden states (after the final LayerNorm) and `lm_head` is a separate Linear
without bias, so that a loss can take (hidden, lm_head.weight) and never build the logits, as with a Hugging Face
model's `output_hidden_states[-1]` and `lm_head.weight`. `forward` returns the logits for plain cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    context: int = 64
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


class Block(nn.Module):
    """Pre-norm block: causal self-attention (scaled_dot_product_attention) and a GELU MLP."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim ({cfg.dim}) must be a multiple of heads ({cfg.heads})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        # GPT-2's initialisation: small normal weights keep the first logits near uniform (loss near log V).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) last hidden states, the lm_head's input."""
        if tokens.shape[-1] > self.cfg.context:
            raise ValueError(f"tokens: {tokens.shape[-1]} positions, the model's context is {self.cfg.context}")
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[-1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
