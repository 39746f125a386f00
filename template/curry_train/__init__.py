"""curry_train: runnable, tested LLM-training primitives on torch.distributed."""

__version__ = "0.2.0"
