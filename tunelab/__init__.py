"""tunelab: pretrain and fine-tune decoder-only LLMs on native PyTorch."""

__version__ = "0.1.0"
