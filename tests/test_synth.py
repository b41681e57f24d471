"""Tests for the procedural shapes dataset (phivlm.data.synth)."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from phivlm.data.synth import (
    COLORS,
    POSITIONS,
    SHAPES,
    Obj,
    captions,
    qa_pairs,
    render,
    sample_scene,
    synthesize,
)

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n_train=40, n_val=10, seed=0)
    return out


def _load(path: Path):
    return json.loads(path.read_text())


def _cell_box(position: str, size: int = 224) -> tuple[int, int, int, int]:
    row, col = divmod(POSITIONS.index(position), 3)
    cell = size / 3
    x0, y0, x1, y1 = col * cell, row * cell, (col + 1) * cell, (row + 1) * cell
    return math.ceil(x0), math.ceil(y0), math.floor(x1), math.floor(y1)


def test_determinism(ds: Path, tmp_path: Path) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    synthesize(same, n_train=40, n_val=10, seed=0)
    synthesize(other, n_train=40, n_val=10, seed=1)
    # synth.json holds absolute paths, so it differs between output dirs
    names = [p.name for p in ds.iterdir() if p.is_file() and p.name != "synth.json"]
    assert len(names) == 5
    for name in names:
        assert (ds / name).read_bytes() == (same / name).read_bytes(), name
    images = sorted(p.name for p in (ds / "images").iterdir())
    assert images == sorted(p.name for p in (same / "images").iterdir())
    def png(root: Path, name: str) -> bytes:
        return (root / "images" / name).read_bytes()

    assert all(png(ds, n) == png(same, n) for n in images)
    assert (ds / "captions_train.json").read_bytes() != (other / "captions_train.json").read_bytes()
    assert any(png(ds, n) != png(other, n) for n in images)


def test_coco_format(ds: Path) -> None:
    summary = _load(ds / "synth.json")
    assert summary["n_train"] == 40 and summary["n_val"] == 10
    ann_ids: list[int] = []
    all_ids: list[int] = []
    for split in ("train", "val"):
        coco = _load(ds / f"captions_{split}.json")
        assert {"info", "images", "annotations"} <= coco.keys()
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        for im in coco["images"]:
            assert {"id", "file_name", "height", "width", "objects"} <= im.keys()
            assert im["file_name"] == f"{im['id']:012d}.png"
            assert per_image[im["id"]] == 5
            caps = {a["caption"] for a in coco["annotations"] if a["image_id"] == im["id"]}
            assert len(caps) == 5
            with Image.open(ds / "images" / im["file_name"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (224, 224))
            all_ids.append(im["id"])
        assert set(per_image) == {im["id"] for im in coco["images"]}
        ann_ids += [a["id"] for a in coco["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    assert all_ids == list(range(1, 51))  # train ids first, then val


def test_llava_format(ds: Path) -> None:
    for split in ("train", "val"):
        coco = _load(ds / f"captions_{split}.json")
        objects = {f"{im['id']:012d}": [Obj(**o) for o in im["objects"]] for im in coco["images"]}
        records = _load(ds / f"instruct_{split}.json")
        assert len(records) == len(coco["images"])
        for rec in records:
            assert {"id", "image", "conversations", "types"} <= rec.keys()
            assert rec["image"] == rec["id"] + ".png"
            conv = rec["conversations"]
            assert len(conv) % 2 == 0 and len(conv) // 2 == len(rec["types"])
            assert 2 <= len(rec["types"]) <= 4
            assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert sum(c["value"].count("<image>") for c in conv) == 1
            first = conv[0]["value"]
            assert first.startswith("<image>\n") or first.endswith("\n<image>")
            assert set(rec["types"]) & {"color", "shape", "count"}
            objs = objects[rec["id"]]
            for t, (q, a) in zip(rec["types"], zip(conv[::2], conv[1::2])):
                _check_answer(t, q["value"].replace("<image>", "").strip(), a["value"], objs)


@pytest.mark.parametrize("turns", [(2, 4), (1, 1), (4, 8)])
def test_conversations_give_no_answer_away(tmp_path: Path, turns: tuple[int, int]) -> None:
    """No turn names what another turn answers: each answer needs the image, as a lone question does."""
    synthesize(tmp_path, n_train=60, n_val=0, seed=3, turns=turns)
    objects = {im["file_name"]: [Obj(**o) for o in im["objects"]]
               for im in _load(tmp_path / "captions_train.json")["images"]}
    lengths, firsts = Counter(), Counter()
    for rec in _load(tmp_path / "instruct_train.json"):
        objs, types = objects[rec["image"]], rec["types"]
        conv = [c["value"].replace("<image>", "").strip().lower() for c in rec["conversations"]]
        questions, answers = conv[::2], conv[1::2]
        lengths[len(types)] += 1
        assert min(turns[0], len(objs) + 1) <= len(types) <= min(turns[1], len(objs) + 1)
        about = []  # the object each other question names (by its shape, its colour or both)
        for t, q in zip(types, questions):
            if t != "count":
                words = set(re.findall(r"[a-z]+", q))
                (obj,) = [o for o in objs if o.shape in words or o.color in words]
                about.append(obj.position)
        assert len(about) == len(set(about))  # at most one question per object
        for i, (t, a) in enumerate(zip(types, answers)):
            others = " ".join(questions[:i] + questions[i + 1:] + answers[:i] + answers[i + 1:])
            if t in ("color", "shape"):
                assert a not in re.findall(r"[a-z]+", others), (rec["conversations"], a)
        firsts[types[0]] += 1
    assert len(lengths) > 1 or turns == (1, 1)
    # every kind of question comes first somewhere: a fixed first question would teach its answer type
    assert {"color", "shape", "count"} <= set(firsts), firsts


def _check_answer(t: str, q: str, a: str, objs: list[Obj]) -> None:
    """The answer follows from the scene alone."""
    words = set(re.findall(r"[a-z]+", q.lower()))
    if t == "count":
        assert a == str(len(objs))
        return
    (obj,) = [o for o in objs if o.shape in words or o.color in words]
    expected = {"color": obj.color, "shape": obj.shape, "position": obj.position}[t]
    assert a == expected, (q, a, objs)


def test_qa_val_and_type_coverage(ds: Path) -> None:
    coco = _load(ds / "captions_val.json")
    objects = {im["file_name"]: [Obj(**o) for o in im["objects"]] for im in coco["images"]}
    rows = [json.loads(line) for line in (ds / "qa_val.jsonl").read_text().splitlines()]
    assert len(rows) == sum(3 * len(o) + 1 for o in objects.values())
    for r in rows:
        assert set(r) == {"image", "question", "answer", "type"} and "<image>" not in r["question"]
        _check_answer(r["type"], r["question"], r["answer"], objects[r["image"]])
    types = Counter(t for rec in _load(ds / "instruct_train.json") for t in rec["types"])
    assert all(types[t] >= 5 for t in ("color", "shape", "count", "position")), types


def test_shape_questions_weighted(tmp_path: Path) -> None:
    """Conversations ask "what shape is the <colour> object?" about twice as often as each other object question
    (a binomial check over ~1,000 questions: off by > 5 standard deviations only if the weights are not used)."""
    synthesize(tmp_path, n_train=400, n_val=1, seed=0, turns=(4, 4))
    types = Counter(t for rec in _load(tmp_path / "instruct_train.json") for t in rec["types"] if t != "count")
    n = sum(types.values())
    sd = math.sqrt(n * 0.5 * 0.5)
    assert abs(types["shape"] - n / 2) < 5 * sd, types
    assert abs(types["color"] - types["position"]) < 5 * math.sqrt(n / 4), types


@pytest.mark.parametrize("jitter", [False, True])
def test_render_grounded(jitter: bool) -> None:
    rng = random.Random(123)
    for _ in range(30):
        objs = sample_scene(rng)
        img = render(objs, rng=rng if jitter else None)
        assert img.mode == "RGB" and img.size == (224, 224)
        by_cell = {o.position: o for o in objs}
        colored = 0
        for pos in POSITIONS:
            box = _cell_box(pos)
            cell_colors = {c for _, c in img.crop(box).getcolors(maxcolors=1 << 16)}
            if pos not in by_cell:
                assert cell_colors == {WHITE}, pos
                continue
            o = by_cell[pos]
            assert img.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == COLORS[o.color]
            assert cell_colors == {WHITE, COLORS[o.color]}
            n = sum(cnt for cnt, c in img.crop(box).getcolors(maxcolors=1 << 16) if c != WHITE)
            assert (n > 1200) == (o.size == "large"), (o, n)
            colored += n
        # every coloured pixel lies inside its object's cell
        total = sum(cnt for cnt, c in img.getcolors(maxcolors=1 << 16) if c != WHITE)
        assert total == colored


def test_scene_constraints() -> None:
    rng = random.Random(0)
    counts: Counter[int] = Counter()
    for _ in range(200):
        objs = sample_scene(rng)
        counts[len(objs)] += 1
        for key in ("shape", "color", "position"):
            assert len({getattr(o, key) for o in objs}) == len(objs)
        for o in objs:
            assert o.shape in SHAPES and o.color in COLORS and o.size in ("small", "large")
        assert [o.size for o in objs] == sorted((o.size for o in objs), key=lambda s: s != "large")
        n = len(objs)
        pairs = qa_pairs(objs, rng)
        assert [p["answer"] for p in pairs if p["type"] == "count"] == [str(n)]
        types = Counter(p["type"] for p in pairs)
        assert types == {"color": n, "shape": n, "count": 1, "position": n}
        for p in pairs:
            _check_answer(p["type"], p["question"], p["answer"], objs)
    assert set(counts) == {1, 2, 3}


def test_captions_main_object_first() -> None:
    rng = random.Random(7)
    color_re = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
    for _ in range(100):
        objs = sample_scene(rng)
        caps = captions(objs, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert color_re.search(cap.lower()).group(1) == objs[0].color, cap
            assert cap.lower().index(objs[0].shape) < min(
                (cap.lower().index(o.shape) for o in objs[1:]), default=len(cap)
            )
            for o in objs:
                assert all(w in cap.lower() for w in (o.size, o.color, o.shape)), (cap, o)
