"""``phivlm eval``: caption metrics equal pycocoevalcap's, VQAv2 normalisation, input kinds, grounding baselines,
training logs (TensorBoard, periodic validation), and a trained tiny model far above its baselines with a
report whose plot and links are all there."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import log_records
from phivlm.errors import PhivlmError

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
STEPS = 60  # training steps of the tiny model


# -- VQA scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
    ("a red car", "red car"),  # articles removed
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("yes!", "yes"),  # punctuation not next to a space is spaced out, then whitespace collapses
    ("red, blue", "red blue"),  # punctuation next to a space is removed
    ("left-hand", "left hand"),
    ("none", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),  # a 1,000-style number: punctuation removed, not spaced
    ("dont", "don't"),  # contractions restored
    ("isnt it", "isn't it"),
    ("it's red", "it's red"),  # apostrophes are kept
    ("  Top\tRight\n", "top right"),
])
def test_vqa_normalisation_known_cases(text, expected):
    from phivlm.evaluate.vqa import normalize_answer

    assert normalize_answer(text) == expected


def test_vqa_accuracy_rules():
    from phivlm.evaluate.vqa import exact_match, vqa_accuracy

    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)  # 3 of 10 humans: leave-one-out average, not 1
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("The red.", ["red"]) == 1.0  # one reference: normalised exact match
    assert exact_match("The red.", ["red"]) == 0.0 and exact_match(" Red ", ["red"]) == 1.0


def test_score_answers_by_type():
    from phivlm.evaluate.vqa import score_answers

    s = score_answers([["red"], ["2"], ["blue"]], ["Red.", "two", "green"], ["color", "count", "color"])
    assert s["vqa_accuracy"] == {"all": pytest.approx(2 / 3), "color": 0.5, "count": 1.0}
    assert s["exact_match"] == {"all": 0.0, "color": 0.0, "count": 0.0}


# -- caption metrics -------------------------------------------------------------------------------

TOY_REFS = {
    1: ["A large red circle at the top left.", "The image shows a red circle in the top left corner.",
        "A red circle on a white background."],
    2: ["Two blue squares side by side.", "A pair of blue squares.", "Two squares, both blue, in the middle."],
    3: ["A small green triangle at the bottom.", "There is a green triangle near the bottom edge."],
    4: ["A yellow circle and a purple square.", "Shapes on white: a yellow circle and a purple square."],
}
TOY_SYSTEMS = {
    "good": {1: "A red circle at the top left.", 2: "Two blue squares.", 3: "A small green triangle at the bottom.",
             4: "A yellow circle and a purple triangle."},
    "poor": {1: "A blue square.", 2: "", 3: "A triangle, a triangle!", 4: "Shapes on white."},
}


def reference_scores(refs: dict, preds: dict) -> dict[str, float]:
    """pycocoevalcap's own pipeline (its COCOEvalCap.evaluate, without SPICE), called directly. The METEOR
    scorer is pycocoevalcap's ``Meteor``: the running instance is reused, as its Java process takes tens of
    seconds to load on a busy machine."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from phivlm.evaluate.caption_metrics import _meteor

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    meteor = _meteor()
    assert type(meteor) is Meteor
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@needs_java
@pytest.mark.slow
def test_caption_metrics_equal_pycocoevalcap():
    from phivlm.evaluate.caption_metrics import METRICS, caption_metrics

    ours = caption_metrics(TOY_REFS, TOY_SYSTEMS)
    for name, preds in TOY_SYSTEMS.items():
        ref = reference_scores(TOY_REFS, preds)
        assert set(ours[name]) == set(METRICS) == set(ref)
        for m in METRICS:
            assert ours[name][m] == pytest.approx(ref[m], abs=1e-9), (name, m)
    assert ours["good"]["CIDEr"] > 1.0 > ours["poor"]["CIDEr"]
    assert ours["good"]["METEOR"] > ours["poor"]["METEOR"] > 0


@needs_java
def test_caption_metrics_need_one_caption_per_image():
    from phivlm.evaluate.caption_metrics import caption_metrics

    with pytest.raises(PhivlmError, match="exactly the reference images"):
        caption_metrics(TOY_REFS, {"x": {1: "a red circle"}})


# -- inputs and baselines --------------------------------------------------------------------------

def test_read_task_detects_coco_llava_and_jsonl(synth_data, tmp_path):
    from phivlm.evaluate.run import read_task

    kind, items = read_task(synth_data["captions_val"])
    coco = json.loads(Path(synth_data["captions_val"]).read_text())
    assert kind == "captions" and len(items) == len(coco["images"])
    assert all(len(it.refs) == 5 and it.prompt == "" for it in items)

    kind, items = read_task(synth_data["instruct_val"])
    llava = json.loads(Path(synth_data["instruct_val"]).read_text())
    assert kind == "qa" and len(items) == sum(len(r["conversations"]) // 2 for r in llava)
    rec = llava[0]
    first = [it for it in items if it.image == rec["image"]]
    assert [it.type for it in first] == rec["types"]
    assert [it.refs for it in first] == [[t["value"]] for t in rec["conversations"][1::2]]
    assert all("<image>" not in it.prompt and it.prompt for it in items)

    kind, items = read_task(synth_data["qa_val"], limit=3)
    assert kind == "qa" and len({it.image for it in items}) == 3 and all(it.type for it in items)

    f = tmp_path / "multi.jsonl"
    f.write_text('{"image": "a.png", "question": "How many?", "answer": ["2", "two", "3"]}\n\n'
                 '{"image": "b.png", "question": "Colour?", "answer": "red"}\n')
    kind, items = read_task(f)
    assert kind == "qa" and items[0].refs == ["2", "two", "3"] and items[1].refs == ["red"]
    assert items[0].type is None
    f.write_text('{"image": "a.png", "question": "How many?", "answer": "2"}\n{"image": "b.png"}\n')
    with pytest.raises(PhivlmError, match="line 2"):
        read_task(f)


def test_baselines_replace_features():
    from phivlm.evaluate.baselines import BASELINES

    feats = torch.randn(7, 49, 16)
    assert torch.equal(BASELINES["blind"](feats, 0), torch.zeros_like(feats))
    for seed in range(5):
        shuf = BASELINES["shuffled"](feats, seed)
        src = [next(j for j in range(7) if torch.equal(shuf[i], feats[j])) for i in range(7)]
        assert sorted(src) == list(range(7)) and all(s != i for i, s in enumerate(src))
    with pytest.raises(PhivlmError):
        BASELINES["shuffled"](feats[:1], 0)


# -- loss curves -----------------------------------------------------------------------------------

def test_loss_plot_reads_the_last_run_and_draws_both_curves(tmp_path):
    from phivlm.evaluate.report import plot_losses, read_losses

    log = tmp_path / "log.jsonl"
    old = [{"step": s, "loss": 9.0} for s in (10, 20)]
    new = ([{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (5, 10, 15, 20)]
           + [{"step": 10, "val_loss": 0.5}, {"step": 20, "val_loss": 0.25}])
    log.write_text("".join(json.dumps(r) + "\n" for r in old + new) + "not json\n")
    train, val = read_losses(log)
    assert train == [(5, 0.6), (10, 0.3), (15, 0.2), (20, 0.15)] and val == [(10, 0.5), (20, 0.25)]
    png = tmp_path / "loss.png"
    assert plot_losses(log, png) == ["train", "validation"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


# -- a trained tiny model, its training logs, the eval command and the report ----------------------


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """Stage 2 (full tuning) of tiny-clip + tiny-llama on the synthetic instructions, validation every 20 steps."""
    from phivlm.config import RunConfig
    from phivlm.train.loop import train

    out = tmp_path_factory.mktemp("trained")
    cfg = RunConfig()
    cfg.model.vision, cfg.model.lm = "tiny-clip", "tiny-llama"
    cfg.data.data, cfg.data.val_data = synth_data["instruct_train"], synth_data["instruct_val"]
    cfg.data.images, cfg.data.template, cfg.data.features = synth_data["images"], "auto", str(out / "features")
    cfg.tuning.lm_tuning = "full"
    cfg.train.output, cfg.train.precision, cfg.train.device = str(out / "run"), "fp32", "cpu"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.lm_lr = STEPS, 16, 3e-3, 3e-3
    cfg.train.log_every, cfg.train.eval_every = 10, 20
    return train(cfg)


@pytest.fixture(scope="module")
def eval_run(trained, synth_data, tmp_path_factory):
    """``phivlm eval`` on the held-out Q&A and captions, with both baselines: (out folder, metrics, stdout)."""
    from phivlm.cli import main

    out = tmp_path_factory.mktemp("eval") / "eval"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["eval", "--checkpoint", str(trained), "--data", synth_data["qa_val"], "--captions",
                     synth_data["captions_val"], "--images", synth_data["images"], "--out", str(out),
                     "--device", "cpu"])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text()), printed.getvalue()


def test_training_writes_jsonl_tensorboard_and_periodic_validation(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained.parent
    recs = log_records(run)
    val_steps = list(range(20, STEPS + 1, 20))
    assert [r["step"] for r in recs if "val_loss" in r] == val_steps  # every 20 steps, the last at the end
    assert [r["step"] for r in recs if "loss" in r] == list(range(10, STEPS + 1, 10))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"loss", "val_loss", "lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val_loss")] == val_steps
    assert acc.Scalars("loss")[-1].value == pytest.approx([r["loss"] for r in recs if "loss" in r][-1])


@needs_java
def test_eval_outputs_and_report_render(eval_run):
    out, metrics, printed = eval_run
    assert f"report: {out / 'report.md'}" in printed and "VQAv2 accuracy: model" in printed
    assert metrics["conditions"] == ["model", "blind", "shuffled"]
    qa, caps = metrics["tasks"]["qa"], metrics["tasks"]["captions"]
    assert qa["counts"]["all"] == qa["n"] and set(qa["counts"]) == {"all", "color", "shape", "count", "position"}
    for c in metrics["conditions"]:
        assert set(qa["scores"][c]) == {"exact_match", "vqa_accuracy"}
        assert set(qa["scores"][c]["vqa_accuracy"]) == set(qa["counts"])
        assert set(caps["scores"][c]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == qa["n"] + caps["n"]
    assert {"task", "image", "prompt", "refs", "type", "model", "blind", "shuffled"} <= set(preds[0])

    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"loss.png", "metrics.json", "predictions.jsonl"} <= set(links)
    assert sum(link.startswith("thumbs/") for link in links) == 16  # 8 examples per task
    for link in links:
        assert (out / link).is_file(), link
    assert "VQAv2 accuracy" in report and "CIDEr" in report and "Loss curves (train, validation)" in report
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG"


@needs_java
def test_baseline_predictions_are_the_model_on_replaced_features(trained, eval_run, synth_data):
    """Each baseline answer is what the model says given the zeroed / the other image's features."""
    from phivlm.data.images import image_path, open_rgb
    from phivlm.evaluate.baselines import derangement
    from phivlm.evaluate.run import MAX_NEW_TOKENS
    from phivlm.generate import GenerationConfig
    from phivlm.infer import Assistant

    preds = [json.loads(line) for line in (eval_run[0] / "predictions.jsonl").read_text().splitlines()]
    names = list(dict.fromkeys(p["image"] for p in preds))  # the order the eval numbers images in
    other = dict(zip(names, (names[j] for j in derangement(len(names), 0))))
    a = Assistant(trained, "cpu")
    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS["qa"])
    qa = [p for p in preds if p["task"] == "qa"]
    differ = [p for p in qa if p["model"] != p["shuffled"]][:3]  # so that the check is not vacuous
    checked = [p for p in qa if p["image"] in names[:2] and p not in differ] + differ
    for p in checked:
        conv = [[("user", a.first_turn(p["prompt"]))]]
        own, theirs = (open_rgb(image_path(synth_data["images"], n)) for n in (p["image"], other[p["image"]]))
        assert other[p["image"]] != p["image"]
        assert a.answer([own], conv, gen) == [p["model"]]
        assert a.answer([theirs], conv, gen) == [p["shuffled"]]
        zeros = torch.zeros_like(a.features([own]))
        assert a.answer([], conv, gen, features=zeros) == [p["blind"]]
    assert len(checked) >= 4 and differ


@pytest.mark.slow
def test_trained_model_far_above_baselines(learned_eval):
    """The learnability recipe's checkpoint (conftest ``learned``: colour-only stage 2, 300 steps), scored by
    ``phivlm eval`` on the held-out colour questions: far above both of its baselines in the same eval run."""
    metrics = learned_eval["metrics"]
    qa = metrics["tasks"]["qa"]
    assert metrics["conditions"] == ["model", "blind", "shuffled"]
    assert qa["n"] >= 150 and qa["counts"] == {"all": qa["n"], "color": qa["n"]}
    acc = {c: s["vqa_accuracy"]["all"] for c, s in qa["scores"].items()}
    assert acc["model"] >= acc["blind"] + 0.15 and acc["model"] >= acc["shuffled"] + 0.15, acc
    report = (learned_eval["out"] / "report.md").read_text()
    assert f"{acc['model']:.1%}" in report, "the report shows the model's accuracy"


def test_eval_llava_input_without_baselines(trained, synth_data, tmp_path):
    from phivlm.cli import main

    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(trained.parent), "--data", synth_data["instruct_val"], "--images",
                 synth_data["images"], "--out", str(out), "--limit", "2", "--no-baselines", "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["conditions"] == ["model"] and list(metrics["tasks"]) == ["qa"]
    llava = json.loads(Path(synth_data["instruct_val"]).read_text())[:2]
    assert metrics["tasks"]["qa"]["n"] == sum(len(r["conversations"]) // 2 for r in llava)
    report = (out / "report.md").read_text()
    assert "blind" not in report and "shuffled (other image)" not in report
    for link in re.findall(r"\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "missing.jsonl"), "--images",
                 synth_data["images"], "--out", str(out)]) == 2


def test_eval_chosen_baseline(trained, synth_data, tmp_path, capsys):
    """``--baselines shuffled`` runs that baseline alone; an unknown name is a one-line error."""
    from phivlm.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(trained.parent), "--data", synth_data["qa_val"], "--images",
            synth_data["images"], "--out", str(out), "--limit", "2", "--device", "cpu"]
    assert main(args + ["--baselines", "shuffled"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["conditions"] == ["model", "shuffled"]
    assert set(metrics["tasks"]["qa"]["scores"]) == {"model", "shuffled"}
    report = (out / "report.md").read_text()
    assert "*shuffled* by another image's" in report and "*blind*" not in report
    capsys.readouterr()
    assert main(args + ["--baselines", "shuffled,upside-down"]) == 2
    assert "unknown baseline 'upside-down'" in capsys.readouterr().err
