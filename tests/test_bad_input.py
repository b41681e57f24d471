"""Bad input gets a clear answer: a non-zero exit (or, with --skip-bad, a counted skip), one line naming the
input and the problem, no traceback, and earlier outputs left as they were.

Behaviours chosen (and checked here):
- Images: grayscale, RGBA/LA (composited on white), CMYK, 16-bit and palette images are converted to 8-bit
  RGB. Refused: missing, 0-byte, truncated or corrupt files, non-images, images with a side below
  ``MIN_SIDE`` (1x1), images above ``MAX_PIXELS`` (from the header, before any decoding), and paths that
  leave the image folder (``..``, absolute paths, NUL bytes).
- Duplicate ids: ids are labels, not keys. Records that share an id but differ (LLaVA-Instruct gives all
  conversations about one image that image's id) are all kept and reported in one warning per file. A
  record that exactly repeats an earlier one (same id, image and conversation) would silently count twice:
  it is a bad record (an error; skipped and listed with --skip-bad).
- Weights are read from safetensors only; a pickle under a safetensors name, or an adapter_model.bin, is
  refused without being unpickled.

Costly cases run the real CLI in subprocesses (one --skip-bad run over a dataset full of faults, then
single-fault runs in parallel); the rest call the same functions, or ``phivlm.cli.main``, in-process.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from helpers import start_cli
from phivlm.cli import main
from phivlm.config import RunConfig
from phivlm.data.images import MAX_PIXELS, BadImage, image_path, open_rgb
from phivlm.data.sources import load_samples
from phivlm.errors import PhivlmError

Q = "<image>\nWhat is in the picture?"


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def rec(id_, image, *values: str) -> dict:
    return {"id": id_, "image": image, "conversations": turns(*(values or (Q, "A shape.")))}


# -- image files -------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h RGB pixels but holds almost no data (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


# name -> (image, RGB expected at the centre)
GOOD = {
    "gray.png": (lambda: Image.new("L", (32, 32), 128), (128, 128, 128)),
    "rgba.png": (lambda: Image.new("RGBA", (32, 32), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
    "cmyk.jpg": (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), (255, 0, 0)),
    "gray16.png": (lambda: Image.fromarray(np.full((32, 32), 30000, np.uint16)), (117, 117, 117)),  # 30000/256
    "palette.png": (lambda: Image.new("RGB", (32, 32), (0, 0, 255)).convert("P"), (0, 0, 255)),
    "good.jpg": (lambda: Image.new("RGB", (32, 32), (10, 200, 30)), (10, 200, 30)),
}

# bad file name -> (what it is, the problem the message must name)
BAD = {
    "missing.jpg": (None, "image file not found"),
    "trunc.jpg": ("truncated jpeg", "cannot decode image"),
    "trunc.png": ("truncated png", "cannot decode image"),
    "empty.jpg": (b"", r"empty image file \(0 bytes\)"),
    "text.jpg": (b"I am a text file, not a JPEG\n", "not an image file"),
    "one.png": ("1x1", r"image too small \(1x1"),
    "bomb.png": (png_header_only(10_000, 10_000), r"image too large \(10000x10000"),
    # 400 kpx passes the pixel limit, but a resize of its short side to 224 px would ask for ~19 GiB
    "strip.png": (png_header_only(200_000, 2), r"image too elongated \(200000x2"),
    "../../etc/passwd": (None, "escapes the image folder"),
    "/etc/passwd": (None, "escapes the image folder"),
    "a\0b.png": (None, "not a usable image path"),
}


def make_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (make, _) in GOOD.items():
        make().save(folder / name)
    palette_t = Image.new("RGB", (32, 32), (0, 0, 255)).convert("P")
    palette_t.info["transparency"] = palette_t.getpixel((0, 0))
    palette_t.save(folder / "palette_t.png", transparency=palette_t.getpixel((0, 0)))
    for name, (content, _) in BAD.items():
        if name == "trunc.jpg":
            data = (folder / "good.jpg").read_bytes()
            content = data[: len(data) // 2]
        elif name == "trunc.png":
            data = (folder / "gray.png").read_bytes()
            content = data[:-30]
        elif name == "one.png":
            Image.new("RGB", (1, 1)).save(folder / name)
            continue
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("bad-input") / "images")


def test_every_image_kind_becomes_rgb(images):
    for name, (_, rgb) in GOOD.items():
        im = open_rgb(images / name)
        assert im.mode == "RGB" and im.size == (32, 32), name
        assert np.abs(np.array(im.getpixel((16, 16))) - rgb).max() <= 3, (name, im.getpixel((16, 16)))
    assert open_rgb(images / "palette_t.png").getpixel((5, 5)) == (255, 255, 255)  # transparent index -> white


def test_bad_images_are_refused_naming_file_and_problem(images, monkeypatch):
    def no_decoding(self):
        raise AssertionError("an image was decoded before its size was checked")

    for name, (_, problem) in BAD.items():
        if name in ("trunc.jpg", "trunc.png"):
            continue  # these must be decoded to be found out
        with monkeypatch.context() as m, warnings.catch_warnings():
            m.setattr(ImageFile.ImageFile, "load", no_decoding)
            warnings.simplefilter("error")  # no DecompressionBombWarning either: our own limit reports it
            with pytest.raises(BadImage, match=problem) as e:
                open_rgb(image_path(images, name))
        assert "\n" not in str(e.value) and name.split("/")[-1].replace("\0", "\\x00") in str(e.value)
    for name in ("trunc.jpg", "trunc.png"):
        with pytest.raises(BadImage, match=rf"{name}: cannot decode image"):
            open_rgb(image_path(images, name))
    # beyond Pillow's own hard limit (2x its warning limit): still our message, still no traceback
    (images / "huge.png").write_bytes(png_header_only(20_000, 20_000))
    with pytest.raises(BadImage, match="huge.png: image too large"):
        open_rgb(images / "huge.png")
    assert 10_000 * 10_000 > MAX_PIXELS


def test_symlink_loop_is_a_bad_image(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(BadImage, match=r"a.png: not a usable image path \(symlink loop|Too many levels"):
        open_rgb(image_path(tmp_path, "a.png"))


def test_memory_error_while_decoding_is_a_bad_image(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")

    def oom(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", oom)
    with pytest.raises(BadImage, match="x.png: image needs more memory to decode than is available"):
        open_rgb(tmp_path / "x.png")


# -- annotation files ------------------------------------------------------------------------------

def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("content, problem", [
    ("{not json", r"not valid JSON \(line 1"),
    ("", "not valid JSON"),
    (b"[{\"id\": \"caf\xe9\"}]", r"not UTF-8 text \(byte 12\)"),
    ("42", "expected a COCO captions object .* got int"),
    ('"a string"', "expected a COCO .* got str"),
    ('{"images": []}', "expected a COCO .* got dict"),
    ('{"images": {}, "annotations": []}', "COCO file needs lists 'images' and 'annotations'"),
])
def test_unreadable_annotation_files(tmp_path, content, problem):
    path = tmp_path / "data.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for skip_bad in (False, True):  # a whole-file problem is never skipped
        with pytest.raises(PhivlmError, match=rf"{re.escape(str(path))}: {problem}"):
            load_samples(path, skip_bad=skip_bad, skipped=[])


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([rec("a", "a.png")]).encode())
    assert [s.id for s in load_samples(path)] == ["a"]


LLAVA_BAD = [  # (record, problem)
    ("just a string", "record is not an object"),
    ({"id": "x", "conversations": turns(Q, "a")}, "missing 'image'"),
    ({"id": "x", "image": "a.png"}, "missing 'conversations'"),
    (rec("x", "a.png", "no image here", "a"), r"<image> must appear exactly once.*\(found 0\)"),
    (rec("x", "a.png", Q + " <image>", "a"), r"\(found 2\)"),
    (rec("x", "a.png", Q, "  "), "turn 1 has an empty answer"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": Q}, {"from": "human", "value": "b"}]},
     "turn 1 is 'human': turns must alternate"),
    (rec("x", "a.png", Q), r"ends with a human turn \(no answer\)"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": ["human"], "value": Q}]}, "needs 'from'"),
    (rec("x", "a.png", Q, "bad \ud800 text"), "turn 1 is not valid Unicode"),
]


def test_each_bad_llava_record_fails_or_is_skipped(tmp_path):
    good = rec("good", "a.png")
    for i, (bad, problem) in enumerate(LLAVA_BAD):
        path = write(tmp_path / f"bad{i}.json", [good, bad])
        with pytest.raises(PhivlmError, match=rf"{re.escape(str(path))}: record 1\b.*{problem}"):
            load_samples(path)
    path = write(tmp_path / "all.json", [good] + [bad for bad, _ in LLAVA_BAD])
    skipped: list[dict] = []
    assert [s.id for s in load_samples(path, skip_bad=True, skipped=skipped)] == ["good"]
    assert [s["record"].split(" (")[0] for s in skipped] == [f"record {i + 1}" for i in range(len(LLAVA_BAD))]
    for s, (_, problem) in zip(skipped, LLAVA_BAD):
        assert re.search(problem, s["reason"]) and s["file"] == str(path)


def test_each_bad_coco_annotation_fails_or_is_skipped(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 2, "file_name": "c.png"}]
    anns = [
        {"id": 10, "image_id": 1, "caption": "A red circle."},
        {"id": 11, "image_id": 1},  # no caption
        {"id": 12, "image_id": 1, "caption": " "},
        {"id": 13, "image_id": 99, "caption": "x"},
        {"id": 14, "image_id": [1], "caption": "x"},
        {"id": 15, "image_id": 2, "caption": "x"},  # image id 2 names two files
        {"id": 10, "image_id": 1, "caption": "A red circle."},  # exact duplicate of annotation 0
        {"id": 10, "image_id": 1, "caption": "Another caption."},  # reused id, other caption: kept
    ]
    problems = ["missing or empty 'caption'", "missing or empty 'caption'", "image_id 99 not in 'images'",
                r"image_id \[1\] not in 'images'", "listed in 'images' with different file names",
                r"exact duplicate of annotation 0 \(id 10\)"]
    path = write(tmp_path / "coco.json", {"images": images, "annotations": anns})
    with pytest.raises(PhivlmError, match=rf"coco.json: annotation 1: {problems[0]}"):
        load_samples(path)
    skipped: list[dict] = []
    with caplog.at_level(logging.WARNING, "phivlm.data.sources"):
        samples = load_samples(path, skip_bad=True, skipped=skipped)
    assert [(s.id, s.turns[1][1]) for s in samples] == [("10", "A red circle."), ("10", "Another caption.")]
    assert [s["record"] for s in skipped] == [f"annotation {i}" for i in range(1, 7)]
    for s, problem in zip(skipped, problems):
        assert re.search(problem, s["reason"]), (s, problem)
    reuse = [r.getMessage() for r in caplog.records if "reuse the id" in r.getMessage()]
    assert len(reuse) == 1 and "1 records reuse" in reuse[0] and "id 10 in annotation 0 and annotation 7" in reuse[0]


def test_duplicate_ids(tmp_path, caplog):
    """Shared ids are kept (LLaVA-Instruct's ids are image ids) and reported once; exact repeats are bad."""
    data = [rec("000001", "a.png", Q, "A circle."), rec("000001", "a.png", "<image>\nColour?", "Red."),
            rec("000001", "b.png", Q, "A square."), rec("000001", "a.png", Q, "A circle.")]
    path = write(tmp_path / "dup.json", data)
    with pytest.raises(PhivlmError, match=r"dup.json: record 3 \(id 000001\): exact duplicate of record 0"):
        load_samples(path)
    skipped: list[dict] = []
    with caplog.at_level(logging.WARNING, "phivlm.data.sources"):
        samples = load_samples(path, skip_bad=True, skipped=skipped)
    assert len(samples) == 3 and len(skipped) == 1
    assert any("dup.json: 2 records reuse the id of an earlier record" in r.getMessage() for r in caplog.records)


# -- configuration and files, through phivlm.cli.main in-process ------------------------------------------

@pytest.fixture(autouse=True)
def _drop_log_files():
    """Runs add a train.log handler to the root logger; in-process they would pile up."""
    before = list(logging.getLogger().handlers)
    yield
    for h in logging.getLogger().handlers:
        if h not in before:
            logging.getLogger().removeHandler(h)
            h.close()


def error_line(err: str) -> str:
    """The single ``phivlm: error:`` line of ``err`` (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("phivlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, images, untrained):
    """Checkpoints (untrained: only their files matter): frozen tiny-phi, LoRA tiny-phi, frozen on a 48-wide LM."""
    from transformers import PhiConfig, PhiForCausalLM

    from phivlm.models import builtin

    root = tmp_path_factory.mktemp("ckpts")
    lm48 = root / "lm48"
    shutil.copytree(builtin.resolve("tiny-phi"), lm48)
    cfg48 = PhiConfig.from_pretrained(lm48)
    cfg48.hidden_size = 48
    PhiForCausalLM(cfg48).save_pretrained(lm48)
    out = {}
    runs = (("frozen", "tiny-phi", "frozen"), ("lora", "tiny-phi", "lora"), ("lm48", str(lm48), "frozen"))
    for name, lm, mode in runs:
        cfg = RunConfig()
        cfg.model.vision, cfg.model.lm, cfg.tuning.lm_tuning, cfg.data.template = "tiny-clip", lm, mode, "plain"
        out[name] = untrained(root / name, cfg=cfg)
    data = write(root / "data.json", [rec(str(i), n) for i, n in enumerate(GOOD)])
    return {**out, "root": root, "data": data, "images": images}


def pretrain_args(c: dict, out: Path, *extra) -> list:
    return ["pretrain", "--data", c["data"], "--images", c["images"], "--vision", "tiny-clip", "--lm", "tiny-phi",
            "--features", c["root"] / "features", "--output", out, "--max-steps", 1, "--precision", "fp32", *extra]


def test_unknown_projector_and_template_list_the_valid_names(capsys, ckpts, tmp_path):
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "a", "--projector", "mlp3x"))
    assert rc == 2 and "unknown projector 'mlp3x'; valid: linear, mlp2x_gelu, residual" in error_line(err)
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "b", "--template", "vicuna"))
    assert rc == 2 and "unknown template 'vicuna'; valid: auto, chat, phi, plain" in error_line(err)
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "c", "--lm", "tiny-clip"))  # not a language model
    assert rc == 2 and error_line(err).startswith("phivlm: error: tiny-clip: cannot load tokenizer")
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "d", "--vision", "tiny-phi"))  # not a vision tower
    assert rc == 2 and error_line(err).startswith("phivlm: error: tiny-phi: cannot load vision tower")


def test_unwritable_folders_are_named(capsys, ckpts, tmp_path):
    blocker = tmp_path / "a-file"  # tests run as root, so a read-only folder would not stop writes: a file does
    blocker.write_text("")
    rc, err = cli(capsys, *pretrain_args(ckpts, blocker / "run"))
    assert rc == 2 and f"{blocker / 'run'}: output folder is not writable (Not a directory)" in error_line(err)
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "run", "--features", blocker / "feats"))
    assert rc == 2 and f"{blocker / 'feats'}: feature cache folder is not writable" in error_line(err)
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "run", "--images", tmp_path / "nowhere",
                                         "--features", tmp_path / "feats"))
    assert rc == 2 and f"{tmp_path / 'nowhere'}: image folder not found" in error_line(err)


def test_batch_larger_than_the_data(capsys, ckpts, tmp_path):
    rc, err = cli(capsys, *pretrain_args(ckpts, tmp_path / "run", "--batch-size", 1000))
    assert rc == 2 and f"{len(GOOD)} samples < one global batch of 1000" in error_line(err)


def test_unexpected_os_errors_are_one_line_and_traceback_with_v(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err = cli(capsys, "data", "synth", "--out", blocker / "synth", "--train", 1, "--val", 1)
    assert rc == 1 and f"{blocker / 'synth'}" in error_line(err) and "Not a directory" in error_line(err)
    with pytest.raises(NotADirectoryError):  # -v: the full traceback
        main(["-v", "data", "synth", "--out", str(blocker / "synth"), "--train", "1", "--val", "1"])


def test_broken_checkpoints_are_named(capsys, ckpts, tmp_path, monkeypatch):
    frozen = ckpts["frozen"]
    for missing in ("config.yaml", "projector.safetensors"):
        bad = tmp_path / f"no-{missing}"
        shutil.copytree(frozen, bad)
        (bad / missing).unlink()
        rc, err = cli(capsys, "merge", "--checkpoint", bad, "--out", tmp_path / "m")
        assert rc == 2 and f"{bad}: not a checkpoint ({missing} missing)" in error_line(err)

    # a pickle offered as weights: refused, never unpickled
    pickled = tmp_path / "pickled"
    shutil.copytree(frozen, pickled)
    torch.save({"separator": torch.zeros(64)}, pickled / "projector.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called: a pickle was unpickled"))
    rc, err = cli(capsys, "caption", "--checkpoint", pickled, "--image", ckpts["images"] / "good.jpg")
    monkeypatch.undo()
    line = error_line(err)
    assert rc == 2
    assert f"{pickled / 'projector.safetensors'}: not a valid safetensors file" in line and "safetensors only" in line

    # a LoRA checkpoint whose adapter is a pickle (adapter_model.bin) instead of safetensors
    lora = tmp_path / "lora"
    shutil.copytree(ckpts["lora"], lora)
    weights = lora / "adapter" / "adapter_model.safetensors"
    torch.save({}, weights.with_suffix(".bin"))
    weights.unlink()
    rc, err = cli(capsys, "merge", "--checkpoint", lora, "--out", tmp_path / "m")
    assert rc == 2 and f"{lora / 'adapter'}: adapter_model.safetensors missing" in error_line(err)
    assert not (tmp_path / "m").exists()


def test_lora_checkpoint_without_adapter_is_refused(capsys, ckpts, tmp_path):
    lora = tmp_path / "lora"
    shutil.copytree(ckpts["lora"], lora)
    shutil.rmtree(lora / "adapter")  # else a fresh, untrained adapter would load silently
    rc, err = cli(capsys, "merge", "--checkpoint", lora, "--out", tmp_path / "m")
    assert rc == 2 and f"{lora}: not a complete checkpoint (adapter/adapter_config.json missing)" in error_line(err)


def test_checkpoint_of_another_lm_names_both_sizes_and_leaves_outputs(capsys, ckpts, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ckpts["frozen"], out / "checkpoint")  # an earlier run's checkpoint in the output folder
    before = snapshot(out / "checkpoint")
    rc, err = cli(capsys, "finetune", "--checkpoint", ckpts["lm48"], "--lm", "tiny-phi", "--data", ckpts["data"],
                  "--images", ckpts["images"], "--output", out, "--max-steps", 1, "--precision", "fp32")
    line = error_line(err)
    assert rc == 2 and f"{ckpts['lm48'] / 'projector.safetensors'}" in line
    assert "LM hidden size here: 64, in checkpoint: 48" in line
    assert snapshot(out / "checkpoint") == before


# -- the real CLI in subprocesses -------------------------------------------------------------------------

def phivlm(*argv, cwd: Path) -> subprocess.Popen:
    return start_cli(*argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=300)
    return p.returncode, err


GOOD_RECORDS = [rec(f"g{i}", name) for i, name in enumerate([*GOOD, "palette_t.png"])]
REUSED_ID = rec("g0", "gray.png", "<image>\nWhat colour is it?", "Grey.")  # shares g0's id: kept


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, images):
    """``pretrain --skip-bad`` over good records, every bad record kind and every bad image kind at once."""
    root = tmp_path_factory.mktemp("skip-run")
    bad_records = [bad for bad, _ in LLAVA_BAD] + [GOOD_RECORDS[1]]  # ... and an exact duplicate
    bad_images = [rec(f"b{i}", name) for i, name in enumerate(BAD)]
    data = write(root / "data.json", GOOD_RECORDS + [REUSED_ID] + bad_records + bad_images)
    p = phivlm("pretrain", "--data", data, "--images", images, "--vision", "tiny-clip", "--lm", "tiny-phi",
               "--features", root / "features", "--output", root / "run", "--skip-bad", "--epochs", 1,
               "--batch-size", len(GOOD_RECORDS) + 1, "--precision", "fp32", cwd=root)  # one step: all good samples
    rc, err = finish(p)
    n_good = len(GOOD_RECORDS) + 1
    expected = {f"record {n_good + i}": problem for i, (_, problem) in enumerate(LLAVA_BAD)}
    expected[f"record {n_good + len(LLAVA_BAD)}"] = r"exact duplicate of record 1 \(id g1\)"
    expected.update({name: problem for name, (_, problem) in BAD.items()})
    return {"root": root, "rc": rc, "err": err, "data": data, "n_good": n_good, "expected": expected,
            "out": root / "run", "images": images}


def test_skip_bad_lists_every_bad_sample_and_trains_every_good_one(skip_run):
    err = skip_run["err"]
    assert skip_run["rc"] == 0, err
    assert "Traceback" not in err and "phivlm: error" not in err
    rows = [json.loads(line) for line in (skip_run["out"] / "skipped.jsonl").read_text().splitlines()]
    got = {r["record"].split(" (id")[0]: r["reason"] for r in rows}
    assert len(rows) == len(got) == len(skip_run["expected"])
    assert set(got) == set(skip_run["expected"])
    for record, problem in skip_run["expected"].items():
        assert re.search(problem, got[record]), (record, got[record])
    assert all(r["file"] == str(skip_run["data"]) for r in rows)
    log = (skip_run["out"] / "train.log").read_text()
    m = re.search(r"training .* on (\d+) samples \((\d+) skipped\)", log)
    assert m and [int(g) for g in m.groups()] == [skip_run["n_good"], len(skip_run["expected"])], log
    assert "records reuse the id of an earlier record (first: id g0" in err
    (feats,) = (skip_run["root"] / "features").iterdir()
    from phivlm.data.features import FeatureStore

    assert set(FeatureStore(feats).index) == {r["image"] for r in GOOD_RECORDS}
    assert (skip_run["out"] / "checkpoint" / "projector.safetensors").is_file()


@pytest.mark.slow
def test_single_faults_exit_nonzero_with_one_line_and_leave_outputs(skip_run, tmp_path):
    out, images = skip_run["out"], skip_run["images"]
    kept = {name: snapshot(out / name) if (out / name).is_dir() else (out / name).read_bytes()
            for name in ("checkpoint", "skipped.jsonl", "log.jsonl")}
    one_bad_image = write(tmp_path / "one-bad-image.json", GOOD_RECORDS + [rec("t", "trunc.jpg")])
    train = ["--images", images, "--vision", "tiny-clip", "--lm", "tiny-phi", "--features",
             skip_run["root"] / "features", "--output", out, "--max-steps", 1, "--precision", "fp32"]
    runs = {  # run -> what its error line must hold
        "bad image": (["pretrain", "--data", one_bad_image, *train],
                      [f"{images / 'trunc.jpg'}: cannot decode image", "--skip-bad"]),
        "bad records": (["pretrain", "--data", skip_run["data"], *train],
                        [f"{skip_run['data']}: record {skip_run['n_good']}: record is not an object"]),
    }
    procs = {name: phivlm(*argv, cwd=tmp_path) for name, (argv, _) in runs.items()}  # in parallel
    for name, p in procs.items():
        rc, err = finish(p)
        assert rc == 2, (name, err)
        line = error_line(err)
        for part in runs[name][1]:
            assert part in line, (name, line)
    for name, before in kept.items():  # the failed runs into `out` left its outputs byte-identical
        assert (snapshot(out / name) if name == "checkpoint" else (out / name).read_bytes()) == before, name


# -- remote code only on the command line's say-so ---------------------------------------------------------

def test_a_checkpoint_asking_for_remote_code_is_refused_unless_the_command_allows_it(capsys, ckpts, tmp_path):
    import yaml

    from phivlm.loading.checkpoint import load_checkpoint

    ckpt = tmp_path / "remote"
    shutil.copytree(ckpts["frozen"], ckpt)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True  # what a downloaded checkpoint could say
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    image = ckpts["images"] / "good.jpg"
    refused = f"{ckpt}: this checkpoint asks for trust_remote_code"
    for argv in (["caption", "--checkpoint", ckpt, "--image", image, "--device", "cpu"],
                 ["generate", "--checkpoint", ckpt, "--input", tmp_path / "q.jsonl", "--output", tmp_path / "a.jsonl"],
                 ["merge", "--checkpoint", ckpt, "--out", tmp_path / "merged"],
                 ["finetune", "--checkpoint", ckpt, "--data", ckpts["data"], "--images", ckpts["images"],
                  "--output", tmp_path / "ft", "--max-steps", 1]):
        rc, err = cli(capsys, *argv)
        assert rc == 2 and error_line(err).startswith(f"phivlm: error: {refused}"), (argv[0], err)
        assert "--trust-remote-code" in error_line(err)
    with pytest.raises(PhivlmError, match="asks for trust_remote_code"):
        load_checkpoint(ckpt)
    # allowed by the command: the check passes and the (ordinary) model loads
    rc, err = cli(capsys, "caption", "--checkpoint", ckpt, "--image", image, "--device", "cpu",
                  "--max-new-tokens", 2, "--trust-remote-code")
    assert rc == 0, err
