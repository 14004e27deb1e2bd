"""Multi-LoRA kernels: SGMV shrink/expand (Triton, with a torch reference path)."""

from lorafleet.kernels.lora_ops import add_lora, add_lora_slices, sgmv_expand, sgmv_shrink

__all__ = ["add_lora", "add_lora_slices", "sgmv_expand", "sgmv_shrink"]
