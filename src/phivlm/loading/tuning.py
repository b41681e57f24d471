"""How the language model is adapted: frozen, LoRA, QLoRA (NF4 4-bit base) or full tuning.

Freezing and adapters are applied here, outside the model classes (as TinyLLaVA Factory does).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import TuningConfig
from ..models.dropout import use_fast_dropout
from ..models.lm import LORA_TARGETS
from ..errors import PhivlmError

log = logging.getLogger(__name__)


def quantization_config(tuning: TuningConfig):
    """bitsandbytes NF4 with double quantisation and bf16 compute (QLoRA), else None."""
    if tuning.lm_tuning != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise PhivlmError("--lm-tuning qlora needs bitsandbytes: pip install 'phivlm[qlora]'") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_targets(lm: nn.Module, tuning: TuningConfig) -> list[str]:
    if tuning.lora_targets:
        return [t.strip() for t in tuning.lora_targets.split(",") if t.strip()]
    return LORA_TARGETS.get(lm.config.model_type, ["all-linear"])


def fix_bnb_cpu_repacking(lm: nn.Module) -> None:
    """bitsandbytes on CPU repacks NF4 weights in an eval no-grad forward, after which training fails
    ("a view of a leaf Variable..."); turning off its AVX512-bf16 path avoids the repacking."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in lm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_adapter(lm: nn.Module, folder: Path, trainable: bool):
    """A saved PEFT adapter, from safetensors only (an ``adapter_model.bin`` pickle is refused, never unpickled)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise PhivlmError(f"{folder}: {name} missing (adapters are read from safetensors only)")
    try:
        return PeftModel.from_pretrained(lm, str(folder), is_trainable=trainable)
    except (OSError, ValueError, SafetensorError) as e:
        raise PhivlmError(f"{folder}: cannot load the LoRA adapter ({str(e).splitlines()[0]})") from None


def apply_tuning(lm: nn.Module, tuning: TuningConfig, adapter_dir: str | None = None, trainable: bool = True):
    """Freeze or wrap ``lm`` per ``tuning.lm_tuning`` (one of config.LM_TUNINGS, as ``RunConfig.validate``
    checks); loads an existing PEFT adapter if given."""
    if tuning.lm_tuning in ("frozen", "full"):
        lm.requires_grad_(trainable and tuning.lm_tuning == "full")
    else:
        from peft import LoraConfig, get_peft_model

        lm.requires_grad_(False)
        if tuning.lm_tuning == "qlora":
            fix_bnb_cpu_repacking(lm)
        if adapter_dir:
            lm = load_adapter(lm, Path(adapter_dir), trainable)
        else:
            cfg = LoraConfig(r=tuning.lora_rank, lora_alpha=tuning.lora_alpha, lora_dropout=tuning.lora_dropout,
                             target_modules=lora_targets(lm, tuning), task_type="CAUSAL_LM")
            lm = get_peft_model(lm, cfg)
        use_fast_dropout(lm)
    if tuning.gradient_checkpointing and trainable:
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm
