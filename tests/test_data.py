"""Annotation readers (COCO, LLaVA), the on-disk feature cache and the padding collator."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from phivlm.data import features as features_mod
from phivlm.data.dataset import Collator
from phivlm.data.features import FeatureStore, build_features, cache_dir
from phivlm.data.images import open_rgb
from phivlm.data.sources import load_samples
from phivlm.data.templates import IMAGE_TOKEN
from phivlm.models.vision import VisionTower
from phivlm.models.vlm import IGNORE
from phivlm.errors import PhivlmError

N_IMAGES = 6  # feature-cache tests: 3 shards of 2


# -- readers -----------------------------------------------------------------------------------

def test_coco_one_sample_per_caption(synth_data):
    raw = json.loads(Path(synth_data["captions_train"]).read_text())
    files = {im["id"]: im["file_name"] for im in raw["images"]}
    samples = load_samples(synth_data["captions_train"])
    assert len(samples) == len(raw["annotations"]) == 5 * len(raw["images"])
    for s, ann in zip(samples, raw["annotations"]):
        assert s.image == files[ann["image_id"]]
        assert s.turns == [("user", IMAGE_TOKEN), ("assistant", ann["caption"].strip())]


def test_coco_limit_is_a_seeded_subset_of_images(synth_data):
    path = synth_data["captions_train"]
    all_images = {s.image for s in load_samples(path)}
    a = load_samples(path, limit=10, seed=1)
    assert len({s.image for s in a}) == 10 and len(a) == 50  # every caption of each kept image
    assert {s.image for s in a} <= all_images
    assert a == load_samples(path, limit=10, seed=1)  # deterministic
    assert {s.image for s in a} != {s.image for s in load_samples(path, limit=10, seed=2)}
    assert len(load_samples(path, limit=10_000)) == 5 * len(all_images)  # limit above size keeps all


def test_llava_reader(synth_data):
    raw = json.loads(Path(synth_data["instruct_train"]).read_text())
    samples = load_samples(synth_data["instruct_train"])
    assert len(samples) == len(raw)
    for s, rec in zip(samples, raw):
        assert (s.id, s.image, s.types) == (rec["id"], rec["image"], rec["types"])
        conv = rec["conversations"]
        assert [r for r, _ in s.turns] == ["user", "assistant"] * (len(conv) // 2)
        assert [t for r, t in s.turns if r == "assistant"] == [c["value"] for c in conv if c["from"] == "gpt"]
        question = conv[0]["value"].replace(IMAGE_TOKEN, "").strip()
        assert s.turns[0][1] == f"{IMAGE_TOKEN}\n{question}"  # normalised: image first
        assert sum(t.count(IMAGE_TOKEN) for _, t in s.turns) == 1
        assert s.turns[2:] == [("user" if c["from"] == "human" else "assistant", c["value"]) for c in conv[2:]]


def test_reader_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "no image"},
                                                                     {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(PhivlmError, match="bad.json.*record 0"):
        load_samples(bad)
    skipped: list[dict] = []
    with pytest.raises(PhivlmError, match="no usable samples"):
        load_samples(bad, skip_bad=True, skipped=skipped)
    assert len(skipped) == 1
    with pytest.raises(PhivlmError, match="not found"):
        load_samples(tmp_path / "missing.json")


# -- feature cache -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_names(synth_data):
    return sorted(p.name for p in Path(synth_data["images"]).glob("*.png"))[:N_IMAGES]


@pytest.fixture(scope="module")
def direct_features(synth_data, tiny_tower, image_names):
    """The tower run directly on the images (fp32), the reference for the cache."""
    images = [open_rgb(Path(synth_data["images"]) / n) for n in image_names]
    return tiny_tower(tiny_tower.preprocess(images))


@pytest.fixture
def encoded(monkeypatch):
    """Records the image names the cache builder encodes and the images run through a tower."""
    record = {"names": [], "forward": 0}
    get_item = features_mod._Images.__getitem__

    def counting_get_item(self, i):
        record["names"].append(self.names[i])
        return get_item(self, i)

    forward = VisionTower.forward

    def counting_forward(self, pixels):
        record["forward"] += pixels.shape[0]
        return forward(self, pixels)

    monkeypatch.setattr(features_mod._Images, "__getitem__", counting_get_item)
    monkeypatch.setattr(VisionTower, "forward", counting_forward)
    return record


def build(tower, synth_data, names, root):
    return build_features(tower, synth_data["images"], names, root, batch_size=2, shard_size=2, precision="fp32")


def test_features_match_tower_and_resume(tmp_path, synth_data, tiny_tower, image_names, direct_features,
                                         encoded):
    store, skipped = build(tiny_tower, synth_data, image_names, tmp_path)
    assert skipped == [] and encoded["forward"] == N_IMAGES and sorted(encoded["names"]) == image_names
    feats = store.get(image_names)
    assert feats.dtype == torch.float32 and feats.shape == (N_IMAGES, 49, tiny_tower.hidden_size)
    torch.testing.assert_close(feats, direct_features, rtol=1e-3, atol=1e-5)  # fp16 storage
    folder = cache_dir(tmp_path, tiny_tower, synth_data["images"])
    assert store.folder == folder
    shards = sorted(folder.glob("shard_*.json"))
    assert len(shards) == 3

    # a second call encodes nothing and finds everything
    encoded.update(names=[], forward=0)
    store, _ = build(tiny_tower, synth_data, image_names, tmp_path)
    assert encoded == {"names": [], "forward": 0} and len(store) == N_IMAGES

    # resume: one shard lost (the first, so new shard names must not collide with the ones kept)
    lost = json.loads(shards[0].read_text())["names"]
    shards[0].unlink()
    shards[0].with_suffix(".npy").unlink()
    store, _ = build(tiny_tower, synth_data, image_names, tmp_path)
    assert sorted(encoded["names"]) == sorted(lost) and encoded["forward"] == len(lost)
    assert len(store) == N_IMAGES
    torch.testing.assert_close(store.get(image_names), direct_features, rtol=1e-3, atol=1e-5)
    assert len(FeatureStore(folder)) == N_IMAGES  # and so does a fresh reader


def test_other_tower_gets_other_folder(tmp_path, synth_data, tiny_tower, image_names, direct_features):
    last = VisionTower("tiny-clip", feature_layer=-1)
    assert last.identity != tiny_tower.identity
    store_a, _ = build(tiny_tower, synth_data, image_names[:2], tmp_path)
    store_b, _ = build(last, synth_data, image_names[:2], tmp_path)
    assert store_a.folder != store_b.folder and store_b.folder == cache_dir(tmp_path, last, synth_data["images"])
    assert not torch.allclose(store_a.get(image_names[:2]), store_b.get(image_names[:2]), atol=1e-2)
    assert VisionTower("tiny-clip").identity == tiny_tower.identity  # same tower, same folder
    # a cache folder written by another tower is refused
    meta = store_a.folder / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "identity": "someone-else"}))
    with pytest.raises(PhivlmError, match="another vision tower"):
        build(tiny_tower, synth_data, image_names[:2], tmp_path)


def _copy_images(src, dst, names):
    dst.mkdir()
    for n in names:
        (dst / n).write_bytes((Path(src) / n).read_bytes())
    return dst


def _direct(tower, folder, names):
    return tower(tower.preprocess([open_rgb(Path(folder) / n) for n in names]))


def test_changed_image_is_encoded_again(tmp_path, synth_data, tiny_tower, image_names, encoded):
    """A dataset regenerated in place, or a file replaced: the row is checked against its file (size, mtime)."""
    images = _copy_images(synth_data["images"], tmp_path / "images", image_names[:3])
    build_features(tiny_tower, images, image_names[:3], tmp_path / "f", batch_size=2, precision="fp32")
    target = images / image_names[0]
    target.write_bytes((Path(synth_data["images"]) / image_names[3]).read_bytes())  # other pixels, same name
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    encoded.update(names=[], forward=0)
    store, _ = build_features(tiny_tower, images, image_names[:3], tmp_path / "f", batch_size=2, precision="fp32")
    assert encoded["names"] == [image_names[0]]
    torch.testing.assert_close(store.get(image_names[:3]), _direct(tiny_tower, images, image_names[:3]),
                               rtol=1e-3, atol=1e-5)
    assert len(list(store.folder.glob("shard_*.json"))) == 2  # the old row is kept but replaced


def test_other_image_folder_same_names(tmp_path, synth_data, tiny_tower, image_names):
    """Two folders holding files of the same names never share features."""
    a = _copy_images(synth_data["images"], tmp_path / "a", image_names[:2])
    b = tmp_path / "b"
    b.mkdir()
    for n, other in zip(image_names[:2], image_names[2:4]):
        (b / n).write_bytes((Path(synth_data["images"]) / other).read_bytes())
    sa, _ = build_features(tiny_tower, a, image_names[:2], tmp_path / "f", precision="fp32")
    sb, _ = build_features(tiny_tower, b, image_names[:2], tmp_path / "f", precision="fp32")
    assert sa.folder != sb.folder
    torch.testing.assert_close(sb.get(image_names[:2]), _direct(tiny_tower, b, image_names[:2]), rtol=1e-3, atol=1e-5)
    assert json.loads((sb.folder / "meta.json").read_text())["images"] == str(b.resolve())


def test_concurrent_writers_do_not_collide(tmp_path, synth_data, tiny_tower, image_names, monkeypatch):
    """Writer B fills the cache while writer A is encoding: both sets of rows survive, each with its own image."""
    root, first, second = tmp_path / "f", image_names[:2], image_names[2:4]
    forward = VisionTower.forward
    state = {"interleaved": False}

    def a_forward(self, pixels):
        if not state["interleaved"]:  # A has chosen where to write; B runs to completion now
            state["interleaved"] = True
            build_features(tiny_tower, synth_data["images"], second, root, shard_size=1, precision="fp32")
        return forward(self, pixels)

    monkeypatch.setattr(VisionTower, "forward", a_forward)
    build_features(tiny_tower, synth_data["images"], first, root, shard_size=1, precision="fp32")
    monkeypatch.setattr(VisionTower, "forward", forward)
    assert state["interleaved"]
    store = FeatureStore(cache_dir(root, tiny_tower, synth_data["images"]))
    assert len(store) == 4 and store.bad_shards == 0
    names = first + second
    torch.testing.assert_close(store.get(names), _direct(tiny_tower, synth_data["images"], names), rtol=1e-3,
                               atol=1e-5)


def test_damaged_shard_is_skipped_and_encoded_again(tmp_path, synth_data, tiny_tower, image_names, encoded,
                                                    caplog):
    store, _ = build(tiny_tower, synth_data, image_names[:4], tmp_path)
    js = sorted(store.folder.glob("shard_*.json"))[0]
    rows = json.loads(js.read_text())
    js.write_text(json.dumps({**rows, "names": rows["names"] + ["extra.png"]}))  # names and rows disagree
    encoded.update(names=[], forward=0)
    with caplog.at_level(logging.WARNING):
        store, _ = build(tiny_tower, synth_data, image_names[:4], tmp_path)
    assert "damaged feature shard" in caplog.text and sorted(encoded["names"]) == sorted(rows["names"])
    assert FeatureStore(store.folder).bad_shards == 1 and "extra.png" not in store
    torch.testing.assert_close(store.get(image_names[:4]), _direct(tiny_tower, synth_data["images"],
                                                                   image_names[:4]), rtol=1e-3, atol=1e-5)


def test_bad_image_is_skipped(tmp_path, synth_data, tiny_tower, image_names):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes((Path(synth_data["images"]) / image_names[0]).read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    store, skipped = build_features(tiny_tower, images, ["good.png", "broken.png", "absent.png"], tmp_path / "f",
                                    precision="fp32")
    assert "good.png" in store and len(store) == 1
    assert sorted(s["image"] for s in skipped) == ["absent.png", "broken.png"]


def test_store_missing_image_raises(tmp_path, synth_data, tiny_tower, image_names):
    store, _ = build(tiny_tower, synth_data, image_names[:1], tmp_path)
    with pytest.raises(PhivlmError, match="nope.png"):
        store.get([image_names[0], "nope.png"])
    with pytest.raises(PhivlmError, match="meta.json"):
        FeatureStore(tmp_path / "not-a-cache")


# -- collator ----------------------------------------------------------------------------------

def test_collator_right_pads(tmp_path, synth_data, tiny_tower, image_names):
    store, _ = build(tiny_tower, synth_data, image_names[:2], tmp_path)
    items = [(image_names[0], [5, -1, -2, 6, 7], [IGNORE, IGNORE, IGNORE, 6, 7]),
             (image_names[1], [8, -1, -2], [IGNORE, IGNORE, 9])]
    batch = Collator(store, pad_id=3)(items)
    assert batch["input_ids"].tolist() == [[5, -1, -2, 6, 7], [8, -1, -2, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 6, 7], [IGNORE, IGNORE, 9, IGNORE, IGNORE]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels"))
    assert torch.equal(batch["image_features"], store.get(image_names[:2]))
