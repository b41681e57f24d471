"""phivlm: train and serve small LLaVA-style vision-language models."""

__version__ = "0.1.0"
