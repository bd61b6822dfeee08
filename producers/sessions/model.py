"""The session encoder: a small Transformer over a session's events; the session vector is its masked mean.

Event vector = sum of one embedding per categorical field + a projection of the numeric values
and their missing flags + per text field the mean of its hashed word embeddings (EmbeddingBag)
+ a projection of the standardised ln(1 + gap) since the previous event; then a learned position
embedding, LayerNorm and dropout. A masked event's vector is replaced by a learned [MASK] vector
(before the position is added). `torch.nn.TransformerEncoder` (pre-norm, GELU) with a padding
mask, then the mean of the outputs over the session's real events: that mean (d_model numbers) is
the session embedding. A projection head is used only by the contrastive loss.

Objective: `mem_weight * MEM + contrastive_weight * InfoNCE`, on two augmented views of each session.
- Masked-event modelling (MEM): ~mask_prob of a view's events (at least one) are masked; from the
  outputs at those positions the model predicts every categorical field of the event (cross-entropy,
  OOV included) and its standardised numeric values (MSE, where present). This teaches the encoder
  what events are and how they depend on their context within a session.
- Contrastive InfoNCE (temperature `temperature`, in-batch negatives, symmetric): each view is a
  random contiguous crop of the session with random event dropout (and the MEM masking); the
  projected pooled vectors of a session's two views must be closer to each other than to any other
  session's. MEM alone never trains the pooling (it reads per-event outputs), so nothing would make
  the mean vector a good summary of the session; the contrastive term trains exactly that vector.
Both terms come from the same two forward passes (one per view), which halves the cost on a CPU.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from producers.sessions.config import SessionEncoderConfig


class SessionEncoder(nn.Module):
    def __init__(self, sizes: dict[str, int], n_numeric: int, n_text: int, config: SessionEncoderConfig):
        super().__init__()
        d = config.d_model
        self.cat_names = list(sizes)
        self.n_numeric = n_numeric
        self.cat = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in sizes.values())
        self.num = nn.Linear(2 * n_numeric, d) if n_numeric else None
        self.txt = nn.ModuleList(nn.EmbeddingBag(config.text_buckets + 1, d, mode="mean", padding_idx=0)
                                 for _ in range(n_text))
        self.gap = nn.Linear(1, d)
        self.mask_vector = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.mask_vector, std=0.02)
        self.position = nn.Embedding(config.max_events, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(d, config.n_heads, dim_feedforward=2 * d, dropout=config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # no nested tensors: the same arithmetic in training and inference, whatever the padding
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)
        # heads: MEM per categorical field and for the numeric values; projection for InfoNCE
        self.cat_heads = nn.ModuleList(nn.Linear(d, n) for n in sizes.values())
        self.num_head = nn.Linear(d, n_numeric) if n_numeric else None
        self.projection = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def events(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L, d] event vectors before positions."""
        B, L = batch["mask"].shape
        x = self.gap(batch["gap"].unsqueeze(-1))
        for j, emb in enumerate(self.cat):
            x = x + emb(batch["cat"][..., j])
        if self.num is not None:
            x = x + self.num(batch["num"])
        for j, bag in enumerate(self.txt):
            words = batch["txt"][:, :, j, :].reshape(B * L, -1)
            x = x + bag(words).view(B, L, -1)
        return x

    def forward(self, batch: dict[str, torch.Tensor],
                masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-event outputs [B, L, d], session vectors [B, d]); `masked` [B, L] marks events to hide."""
        x = self.events(batch)
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_vector.expand_as(x), x)
        L = x.shape[1]
        x = x + self.position(torch.arange(L, device=x.device)).unsqueeze(0)
        x = self.drop(self.norm(x))
        real = batch["mask"]
        h = self.out_norm(self.encoder(x, src_key_padding_mask=~real))
        weights = real.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return h, pooled

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(batch)[1]


def mem_loss(model: SessionEncoder, h: torch.Tensor, batch: dict[str, torch.Tensor],
             masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per categorical field + MSE of the present numeric values, at the masked events."""
    out = h[masked]  # [M, d]
    terms = []
    for j, head in enumerate(model.cat_heads):
        terms.append(F.cross_entropy(head(out), batch["cat"][masked][:, j]))
    if model.num_head is not None:
        k = model.n_numeric
        values, missing = batch["num"][masked][:, :k], batch["num"][masked][:, k:]
        present = 1.0 - missing
        se = (model.num_head(out) - values) ** 2 * present
        terms.append(se.sum() / present.sum().clamp(min=1.0))
    if not terms:  # text-only events: nothing to predict
        return h.sum() * 0.0
    return torch.stack(terms).mean()


def info_nce(model: SessionEncoder, a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between the projected pooled vectors of two views (row i of a and b: one session)."""
    za = F.normalize(model.projection(a), dim=-1)
    zb = F.normalize(model.projection(b), dim=-1)
    logits = za @ zb.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
