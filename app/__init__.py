"""lorafleet: serve thousands of LoRA fine-tunes of one base model on a shared GPU fleet."""

__version__ = "0.1.0"
