"""Language-model loading through ``AutoModelForCausalLM``: a hub id, a local folder or a built-in name."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import PhivlmError
from . import builtin

# LoRA target modules per architecture (model_type); others fall back to every linear layer.
LORA_TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    path = builtin.resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # missing files; not a tokenizer (e.g. a vision model's folder)
        raise PhivlmError(f"{name}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise PhivlmError(f"{name}: tokenizer has no EOS token; the model could never learn to stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only fills padding; padding is masked and never a label
    return tok


def attention_for(device: torch.device) -> str:
    """The LM's attention kernel on ``device``: ``eager`` on CPU, where PyTorch's SDPA (flash) backward kernel is
    slow at these lengths (SmolLM2-135M, batch 16, bf16 on AVX512-BF16: stage-1 step 2.03 -> 1.60 s, stage-2 LoRA
    step 2.92 -> 2.06 s); ``sdpa`` elsewhere."""
    return "eager" if device.type == "cpu" else "sdpa"


def decoder_layers(lm: torch.nn.Module, flag: str) -> list[torch.nn.Module]:
    """The LM's repeated blocks: modules of the classes its ``_no_split_modules`` names (e.g. LlamaDecoderLayer);
    a one-line error naming ``flag`` (the option that needs them) where it names none."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise PhivlmError(f"{flag}: cannot find the decoder layers of {type(lm).__name__} (its _no_split_modules "
                          f"names none); train without {flag}")
    return layers


def load_lm(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
            quantization_config=None, device_map=None, attention: str | None = None) -> PreTrainedModel:
    """``attention``: the ``attn_implementation`` (None: the model's default)."""
    path = builtin.resolve(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,  # never unpickle
            quantization_config=quantization_config, device_map=device_map, attn_implementation=attention)
    except (OSError, ValueError) as e:  # missing or pickle-only weights; not a causal LM
        raise PhivlmError(f"{name}: cannot load language model ({str(e).splitlines()[0]})") from None
