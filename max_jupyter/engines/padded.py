"""``PaddedBatch``: the batch cache of the transformers backend.

Rows are left-padded to one length: column ``j`` of every row is one cache position, the
attention mask hides each row's padding, and each row counts its own positions from 0
(``position_ids``), so a row attends to exactly its own tokens at the positions it would
have alone. A finished row leaves by index selection; columns that only padding holds
afterwards are cut off, so the batch never computes over more columns than its longest
live row needs.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


class PaddedBatch:
    """Live rows (their numbers, in batch order), each row's length, the ``DynamicCache``
    ``[rows, heads, columns, head_dim]`` and the mask ``[rows, columns]``."""

    def __init__(self, cache: DynamicCache | None, rows: list[int], lengths: list[int], device: torch.device):
        self.cache, self.rows, self.lengths = cache, rows, lengths
        width = max(lengths)
        self.mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            self.mask[i, width - n:] = 1

    @staticmethod
    def inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, position_ids)`` ``[rows, longest]`` of left-padded ``prompts`` (padding
        is token 0 at position 0: masked, so never read)."""
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        positions = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            positions[i, width - len(p):] = torch.arange(len(p))
        return ids.to(device), positions.to(device)

    def step_inputs(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [rows, 1], position_ids [rows, 1], mask [rows, columns + 1])`` of one
        step feeding ``tokens`` (in batch order); the batch is not changed yet."""
        device = self.mask.device
        ids = torch.tensor(tokens, device=device)[:, None]
        positions = torch.tensor(self.lengths, device=device)[:, None]
        mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=torch.long, device=device)], 1)
        return ids, positions, mask

    def stepped(self, mask: torch.Tensor) -> None:
        """A step went through: the new mask, every row one longer."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]

    def restore(self) -> None:
        """Cut every cache layer back to the mask's columns (after a failed step, whose
        layers may have grown by one or not)."""
        columns = self.mask.shape[1]
        for layer in self.cache.layers:
            excess = layer.get_seq_length() - columns
            if excess > 0:
                layer.crop(-excess)

    def drop(self, rows: frozenset[int]) -> None:
        """Take ``rows`` out, then cut the columns only padding holds now."""
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0]  # the cache's memory goes back at once
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        pad = self.mask.shape[1] - max(self.lengths)  # leading columns no live row uses
        if pad > 0:
            self.mask = self.mask[:, pad:]
            for layer in self.cache.layers:
                if layer.get_seq_length() > 0:
                    layer.keys, layer.values = layer.keys[..., pad:, :], layer.values[..., pad:, :]

    def row_buffers(self, deltas: list[dict[int, torch.Tensor]], hidden: int, device: torch.device,
                    dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Layer -> ``[rows, 1, hidden]``: each row's delta at that layer (zeros for a row
        without one, so its residual is unchanged to the bit), for every layer any row steers."""
        layers = sorted({layer for d in deltas for layer in d})
        buffers = {}
        for layer in layers:
            buffer = torch.zeros(len(deltas), 1, hidden, device=device, dtype=dtype)
            for i, d in enumerate(deltas):
                if layer in d:
                    buffer[i, 0] = d[layer]
            buffers[layer] = buffer
        return buffers
