"""phivlm's own model type for ``transformers`` (exports whose projector Llava cannot hold, e.g. ``residual``).

``register()`` teaches ``AutoConfig`` and ``AutoModelForImageTextToText`` the model type ``"phivlm"``, so
``from_pretrained`` loads such an export without ``trust_remote_code``. ``import phivlm`` arranges for it
to run as soon as ``transformers`` is imported (see ``phivlm/__init__.py``). ``formats``: the ``transformers``
layouts (Llava, phivlm's own) that ``phivlm export`` writes and ``phivlm.loading.export`` reads back.
"""
from __future__ import annotations


def register() -> None:
    """Register ``PhivlmConfig`` / ``PhivlmForConditionalGeneration`` / ``PhivlmProcessor`` with the Auto classes
    (idempotent)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .configuration import PhivlmConfig
    from .modeling import PhivlmForConditionalGeneration
    from .processing import PhivlmProcessor

    AutoConfig.register(PhivlmConfig.model_type, PhivlmConfig, exist_ok=True)
    AutoModelForImageTextToText.register(PhivlmConfig, PhivlmForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(PhivlmConfig, PhivlmProcessor, exist_ok=True)
