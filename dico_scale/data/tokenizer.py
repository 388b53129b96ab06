"""Captions <-> token ids with open_clip's bundled CLIP BPE, plus one pad token appended to the vocabulary.

Layout of a tokenised caption: [BOS, w1, ..., wn, EOS, PAD, ...]; BOS/EOS are CLIP's <start_of_text>/<end_of_text>.
"""
from __future__ import annotations

import functools

import torch
from open_clip.tokenizer import SimpleTokenizer


class TokenLayout:
    """[BOS, w1, ..., wn, EOS, PAD, ...] around a tokenizer's word ids (`words`): what every captioner's tokenizer
    gives the data pipeline (models/captioner.py)."""
    bos: int
    eos: int
    pad: int

    def words(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """BOS + words + EOS, the words truncated so that the whole fits in max_tokens."""
        return [self.bos, *self.words(text)[: max_tokens - 2], self.eos]

    def batch(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        rows = [self.encode(t, max_tokens) for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids]


@functools.cache
def clip_bpe() -> SimpleTokenizer:
    """One per process (~0.1 s to build: its merges file): the stage, the captioner and its reference share it."""
    return SimpleTokenizer()  # ships inside open_clip: no download


class CaptionTokenizer(TokenLayout):
    def __init__(self):
        self.bpe = clip_bpe()
        self.bos = self.bpe.sot_token_id
        self.eos = self.bpe.eot_token_id
        self.pad = len(self.bpe.encoder)  # 49408: one past CLIP's vocabulary
        self.vocab_size = self.pad + 1

    def words(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode(self, ids) -> str:
        """Words between BOS and the first EOS/PAD."""
        words = []
        for t in ids.tolist() if torch.is_tensor(ids) else ids:
            if t == self.bos:
                continue
            if t in (self.eos, self.pad):
                break
            words.append(t)
        return self.bpe.decode(words).strip()

