"""A torch Dataset over a prepared folder's flat arrays (no per-sample objects kept in memory)."""

from __future__ import annotations

import numpy as np
import torch


class PreparedDataset(torch.utils.data.Dataset):
    """Samples `{"input_ids": list[int], "loss_mask": list[int]}` (the batch contract)."""

    def __init__(self, arrays: dict[str, np.ndarray], index: np.ndarray, conv_ids: list[str]):
        self.arrays = arrays
        self.index = np.asarray(index, dtype=np.int64)
        self.conv_ids = conv_ids
        off = arrays["offsets"]
        self.lengths = (off[1:] - off[:-1])[self.index]
        """Token length of each sample, for length bucketing (`collate.length_grouped_order`)."""

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        j = int(self.index[i])
        a, b = int(self.arrays["offsets"][j]), int(self.arrays["offsets"][j + 1])
        return {"input_ids": self.arrays["input_ids"][a:b].tolist(),
                "loss_mask": self.arrays["loss_mask"][a:b].tolist()}

    def conversation_id(self, i: int) -> str:
        return self.conv_ids[int(self.index[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_loss_tokens(self) -> int:
        off, m = self.arrays["offsets"], self.arrays["loss_mask"]
        return int(sum(int(m[off[j]:off[j + 1]].sum()) for j in self.index))
