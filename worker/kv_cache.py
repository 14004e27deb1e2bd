"""The paged KV-cache tensors (the block bookkeeping lives in block_allocator.py).

Per layer one K and one V tensor shaped ``[num_blocks, block_size, n_kv_heads, head_dim]``: a cache
slot ``s`` is row ``s % block_size`` of block ``s // block_size``, which is what
``BatchLayout.slot_mapping`` addresses and what a paged-attention kernel reads through block tables.
"""

from __future__ import annotations

import torch

from lorafleet.worker.model_config import ModelConfig


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (float16/bfloat16/float32 only)."""
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype):
        if dtype not in allowed.values():
            raise ValueError(f"dtype {dtype} is not one of {sorted(allowed)}")
        return dtype
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(allowed)}")
    return allowed[dtype]


def resolve_device(device: torch.device | str) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>`` so devices compare equal to the ones tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class KVCache:
    """K and V tensors of every layer, allocated once (zeros) at construction."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | str,
        device: torch.device | str,
    ) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for _ in range(config.num_hidden_layers):
            self.k.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.v.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer."""
        return self.k[index], self.v[index]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype | str) -> int:
        """Bytes one block takes over all layers, K and V together."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
        per_layer = block_size * config.num_key_value_heads * config.head_dim * itemsize
        return 2 * config.num_hidden_layers * per_layer

    @staticmethod
    def num_blocks_for_budget(
        config: ModelConfig, block_size: int, dtype: torch.dtype | str, budget_bytes: int
    ) -> int:
        """How many whole blocks fit in ``budget_bytes``; ValueError when not even one does."""
        per_block = KVCache.bytes_per_block(config, block_size, dtype)
        n = int(budget_bytes) // per_block
        if n < 1:
            raise ValueError(
                f"a KV budget of {budget_bytes} bytes holds no block of {block_size} tokens "
                f"({per_block} bytes each)"
            )
        return n
