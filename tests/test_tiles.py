"""Image tiles (``--image-tiles``): each tile encoded alone, tokens in tile order, tile markers in the prompt,
the tower's settings checked, and the cache identity kept apart."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from phivlm.data.templates import encode, encode_prompt, get_template, image_slots, tile_markers
from phivlm.errors import PhivlmError
from phivlm.models import builtin
from phivlm.models.vision import VisionTower, select_features, split_tiles
from phivlm.models.vlm import IGNORE, IMAGE_ID, SEP_ID


def test_split_tiles_cuts_row_major():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    tiles = split_tiles(x, 3)
    assert tiles.shape == (18, 3, 2, 2)
    for b in range(2):
        for r in range(3):
            for c in range(3):
                assert torch.equal(tiles[b * 9 + r * 3 + c], x[b, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2])
    assert split_tiles(x, 1) is x


@pytest.mark.parametrize("name,cls,size,tiles,tokens", [
    ("tiny-clip", "CLIPVisionModel", 224, 2, 0),  # 112-px tiles: 3x3 patches of 32 px, interpolated
    ("tiny-siglip", "SiglipVisionModel", 128, 2, 16),  # 64-px tiles (native): 4x4 patches pooled to 2x2
    ("tiny-dinov2", "Dinov2WithRegistersModel", 84, 3, 9),  # 28-px tiles: 2x2 patches pooled to 1
])
def test_each_tile_is_encoded_alone(name, cls, size, tiles, tokens):
    """The tower's features are a direct transformers forward of each tile on its own, in row-major order; a change
    in one tile changes only that tile's tokens."""
    tower = VisionTower(name, feature_layer=-2, image_size=size, tiles=tiles, image_tokens=tokens)
    model = getattr(transformers, cls).from_pretrained(builtin.resolve(name), dtype=torch.float32).eval()
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    got = tower(px)
    per_tile = tower.tokens_per_tile
    assert got.shape == (2, tiles * tiles * per_tile, tower.hidden_size) and tower.num_patches == got.shape[1]
    s = size // tiles
    kw = {"interpolate_pos_encoding": True} if tower.interpolate else {}
    with torch.no_grad():
        for b in range(2):
            for i in range(tiles * tiles):
                r, c = divmod(i, tiles)
                tile = px[b:b + 1, :, r * s:(r + 1) * s, c * s:(c + 1) * s]
                hidden = model(pixel_values=tile, output_hidden_states=True, **kw).hidden_states[-2]
                want = select_features(hidden, tower.prefix, tower.pooled_side)[0]
                torch.testing.assert_close(got[b, i * per_tile:(i + 1) * per_tile], want, atol=1e-5, rtol=1e-5)
    px2 = px.clone()
    px2[0, :, :s, :s] += 1.0  # the top-left tile of image 0 only
    diff = (tower(px2) - got).abs().amax(-1)
    assert diff[0, :per_tile].min() > 1e-3 and diff[0, per_tile:].max() == 0 and diff[1].max() == 0


def test_tile_settings_are_checked():
    with pytest.raises(PhivlmError, match="multiple of tiles"):
        VisionTower("tiny-dinov2", image_size=85, tiles=3)
    with pytest.raises(PhivlmError, match="whole 14-px patches"):
        VisionTower("tiny-dinov2", image_size=28, tiles=3)
    with pytest.raises(PhivlmError, match="not a multiple of the 9 tiles"):
        VisionTower("tiny-dinov2", image_size=84, tiles=3, image_tokens=4)
    with pytest.raises(PhivlmError, match="per tile"):
        VisionTower("tiny-dinov2", image_size=84, tiles=3, image_tokens=81)  # 3x3 per tile; the grid is 2x2


def test_tiles_are_part_of_the_identity():
    base = VisionTower("tiny-dinov2", image_size=84, image_tokens=9)
    tiled = VisionTower("tiny-dinov2", image_size=84, image_tokens=9, tiles=3)
    assert tiled.identity != base.identity and tiled.num_patches == base.num_patches == 9
    assert VisionTower("tiny-dinov2", image_size=84, image_tokens=9, tiles=1).identity == base.identity


def test_image_slots_put_each_tile_after_its_marker(tiny_tok):
    tiny_tok = tiny_tok["tiny-llama"]
    assert image_slots(tiny_tok, 4) == [IMAGE_ID] * 4 + [SEP_ID]
    slots = image_slots(tiny_tok, 8, tiles=2)
    want: list[int] = []
    for marker in (" top left:", " top right:", " bottom left:", " bottom right:"):
        want += tiny_tok(marker, add_special_tokens=False)["input_ids"] + [IMAGE_ID] * 2
    assert slots == want + [SEP_ID]
    assert tile_markers(3)[4] == " center:" and tile_markers(3)[8] == " bottom right:" and len(tile_markers(3)) == 9
    assert tile_markers(4)[6] == " row 2 column 3:" and len(tile_markers(4)) == 16


def test_image_slots_can_put_each_marker_after_its_tile(tiny_tok):
    tiny_tok = tiny_tok["tiny-llama"]
    assert image_slots(tiny_tok, 4, markers="after") == [IMAGE_ID] * 4 + [SEP_ID]  # no tiles: no markers
    want: list[int] = []
    for marker in (" top left;", " top right;", " bottom left;", " bottom right;"):
        want += [IMAGE_ID] * 2 + tiny_tok(marker, add_special_tokens=False)["input_ids"]
    assert image_slots(tiny_tok, 8, tiles=2, markers="after") == want + [SEP_ID]
    assert tile_markers(3, after=True)[4] == " center;"


def test_tiled_prompts_and_training_samples(tiny_tok):
    """The markers are unlabelled prompt text, in training and at inference alike; ``max_length`` still counts
    only the conversation's text."""
    tiny_tok = tiny_tok["tiny-llama"]
    slots = image_slots(tiny_tok, 9, tiles=3)
    tpl = get_template("plain")
    turns = [("user", "<image>\nWhat color is the circle?"), ("assistant", "red")]
    enc = encode(tpl, tiny_tok, turns, slots)
    start = enc.input_ids.index(IMAGE_ID) - slots.index(IMAGE_ID)
    assert enc.input_ids[start:start + len(slots)] == slots
    assert all(lab == IGNORE for lab in enc.labels[:start + len(slots)])
    prompt = encode_prompt(tpl, tiny_tok, turns[:1], slots)
    assert prompt == enc.input_ids[:len(prompt)] and enc.input_ids.count(IMAGE_ID) == 9
    text = len(encode(tpl, tiny_tok, turns, 9).input_ids) - 10
    assert len(encode(tpl, tiny_tok, turns, slots, max_length=text).input_ids) == len(enc.input_ids)  # not cut


def test_a_tiled_run_trains_caches_and_answers(synth_data, tiny_config, tmp_path):
    """``pretrain`` with tiles: the cache holds every tile's tokens under its own key, the training samples carry
    the markers, and ``Assistant`` encodes and prompts the checkpoint's way (its answers equal an export's:
    test_export)."""
    from PIL import Image

    from phivlm.data.features import FeatureStore, cache_dir
    from phivlm.infer import Assistant
    from phivlm.models.vision import build_tower
    from phivlm.train.loop import train

    cfg = tiny_config(tmp_path / "run", synth_data["captions_train"], synth_data["images"], tmp_path / "features")
    cfg.model.vision, cfg.model.image_size, cfg.model.image_tokens, cfg.model.image_tiles = "tiny-dinov2", 84, 9, 3
    cfg.model.tile_markers = "after"
    ckpt = train(cfg)
    tower = build_tower(cfg.model)
    store = FeatureStore(cache_dir(tmp_path / "features", tower, synth_data["images"]))
    assert store.meta["patches"] == 9 and len(store) > 0
    assistant = Assistant(ckpt, device="cpu", precision="fp32")
    assert assistant.loaded.tower.tiles == 3 and assistant.slots == image_slots(assistant.tok, 9, 3, "after")
    name = next(iter(store.index))
    feats = assistant.features([Image.open(Path(synth_data["images"]) / name).convert("RGB")])
    torch.testing.assert_close(feats, store.get([name]), atol=2e-3, rtol=2e-3)  # the cache is the tower's
    ids, _ = assistant._batch([[("user", assistant.first_turn("What is it?"))]])
    assert ids[0].tolist().count(IMAGE_ID) == 9
    assert assistant.tok.decode(ids[0][ids[0] >= 0]).count("bottom right;") == 1
