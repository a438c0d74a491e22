"""Weighted k-nearest-neighbour classification of features (the evaluation DINO uses, Wu et al. 2018).

Features are L2-normalised; a query's k most similar bank rows (cosine similarity) vote for their labels with the
weight exp(similarity / T); the class with the largest summed weight is the prediction. Written here (a few tensor
ops) because no installed library provides the temperature-weighted vote. Queries are processed in chunks, so
memory stays at `chunk x bank` similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 20
TEMPERATURE = 0.07


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, *,
               k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Summed vote weights `[Q, num_classes]` of each query's k nearest bank rows (k is capped at the bank size).

    bank `[N, D]`, bank_labels `[N]` (0..num_classes-1), queries `[Q, D]`; computed in float32 on the bank's device.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but {bank_labels.shape[0]} labels")
    if bank.shape[0] == 0:
        raise ValueError("empty k-NN bank")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)  # [N, D]
    labels = bank_labels.to(bank.device).long()  # [N]
    out = []
    for q in F.normalize(queries.float().to(bank.device), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [q, k] cosine similarities of the nearest rows, their indices
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)  # [q, C]
        out.append(votes.scatter_add_(1, labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, *, k: int = K, temperature: float = TEMPERATURE) -> float:
    """Fraction of queries whose weighted k-NN prediction equals their label."""
    if queries.shape[0] == 0:
        raise ValueError("no k-NN queries")
    pred = knn_scores(bank, bank_labels, queries, num_classes, k=k, temperature=temperature).argmax(dim=1)  # [Q]
    return int((pred.cpu() == query_labels.cpu().long()).sum()) / len(pred)


__all__ = ["K", "TEMPERATURE", "knn_scores", "knn_top1"]
