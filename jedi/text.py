"""A tiny deterministic text conditioner for tiny models (real SD uses the CLIP text encoder, added later).

Words are lower-cased, split on non-alphanumerics and hashed with CRC32 (stable across processes and machines,
unlike Python's ``hash``) into a small vocabulary; a learned ``nn.Embedding`` plus a learned position embedding
gives the (N, T, context_dim) cross-attention context. Token 0 is padding, so the empty caption ("" -- the null
condition of classifier-free guidance) is all padding: a learned, non-zero null embedding, like CLIP's for "".
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TextConfig", "TextConditioner", "tokenize"]

_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class TextConfig:
    """Vocabulary size (hash buckets incl. padding id 0), max tokens T, and the embedding width (UNet context_dim)."""

    vocab_size: int = 512
    max_len: int = 16
    context_dim: int = 32


def tokenize(captions: list[str], vocab_size: int, max_len: int) -> torch.Tensor:
    """Hash-tokenize captions: word -> 1 + crc32(word) % (vocab_size - 1), padded/truncated with 0 to max_len.

    Args:
        captions: list of N strings.
        vocab_size: number of ids (>= 2); id 0 is padding.
        max_len: T, tokens per caption.

    Returns:
        (N, T) int64 token ids.

    Raises:
        TypeError: captions is not a list/tuple of strings.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a list of strings")
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)
    for i, cap in enumerate(captions):
        words = _WORD.findall(cap.lower())[:max_len]
        for j, w in enumerate(words):
            ids[i, j] = 1 + zlib.crc32(w.encode()) % (vocab_size - 1)
    return ids


class TextConditioner(nn.Module):
    """Captions -> (N, T, context_dim) context for the UNet's cross-attention (learned with the UNet)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.vocab_size < 2 or cfg.max_len < 1:
            raise ValueError(f"need vocab_size >= 2 and max_len >= 1, got {cfg}")
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.context_dim)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, cfg.context_dim))
        # unit-scale tokens, like CLIP's output that cross-attention expects; small positions on top
        nn.init.normal_(self.token_emb.weight, std=1.0)
        nn.init.normal_(self.pos_emb, std=0.1)

    def forward(self, captions: list[str]) -> torch.Tensor:
        """Embed N captions.

        Args:
            captions: list of N strings ("" = the null caption).

        Returns:
            (N, max_len, context_dim) float32 on the module's device.
        """
        ids = tokenize(captions, self.cfg.vocab_size, self.cfg.max_len).to(self.pos_emb.device)
        return self.token_emb(ids) + self.pos_emb  # (N, T, D) + (T, D)
