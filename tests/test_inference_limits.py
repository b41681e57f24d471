"""What one request may cost in chat, serve and generate: question and context caps, cancellation."""
from __future__ import annotations

import json
import threading
import time

import pytest

from phivlm.cli import main
from phivlm.data.templates import IMAGE_TOKEN, encode_prompt
from phivlm.generate import GenerationConfig
from phivlm.infer import MAX_QUESTION_CHARS, Assistant, load_image
from phivlm.errors import PhivlmError


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    return Assistant(tiny_checkpoint, "cpu")


def prompt_tokens(a: Assistant, turns) -> int:
    return len(encode_prompt(a.template, a.tok, turns, a.loaded.tower.num_patches))


def conversation(a: Assistant, exchanges: int) -> list[tuple[str, str]]:
    turns = []
    for i in range(exchanges):
        q = f"What is shape number {i}?"
        turns += [("user", a.first_turn(q) if i == 0 else q), ("assistant", f"a circle, number {i}")]
    return turns + [("user", "And the last one?")]


def test_fit_drops_the_oldest_exchanges_and_keeps_the_image(assistant, monkeypatch):
    turns = conversation(assistant, 6)
    full = prompt_tokens(assistant, turns)
    monkeypatch.setattr(type(assistant), "context", property(lambda self: full))  # 0 tokens of room left
    fitted, dropped = assistant.fit(turns, max_new_tokens=40)
    assert dropped >= 1 and len(fitted) == len(turns) - 2 * dropped
    assert prompt_tokens(assistant, fitted) + 40 <= full
    assert IMAGE_TOKEN in fitted[0][1] and sum(IMAGE_TOKEN in t for _, t in fitted) == 1  # the image stays, once
    assert fitted[-1] == turns[-1] and fitted[1:] == turns[2 * dropped + 1:]
    assert assistant.fit(turns, max_new_tokens=0) == (turns, 0)  # what fits is left alone


def test_questions_that_cannot_fit_are_refused(assistant, monkeypatch):
    with pytest.raises(PhivlmError, match=f"question too long .*at most {MAX_QUESTION_CHARS}"):
        assistant.fit([("user", assistant.first_turn("x" * (MAX_QUESTION_CHARS + 1)))], 8)
    monkeypatch.setattr(type(assistant), "context", property(lambda self: 20))
    with pytest.raises(PhivlmError, match="do not fit the model's context of 20 tokens"):
        assistant.fit([("user", assistant.first_turn("What colour is it?"))], 8)


def test_closing_a_stream_stops_generation(assistant, synth_data, monkeypatch):
    """A cancelled answer (the page's Clear, a closed chat) stops computing within one token."""
    from pathlib import Path

    vlm = assistant.loaded.vlm
    steps = {"n": 0}
    step = vlm.step

    def counting_step(*args, **kwargs):
        steps["n"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(vlm, "step", counting_step)
    monkeypatch.setattr(assistant, "eos_ids", {-7})  # never stops on its own
    image = load_image(next(Path(synth_data["images"]).glob("*.png")))
    stream = assistant.stream(image, [("user", assistant.first_turn("Describe it."))], GenerationConfig(500))
    next(stream)
    next(stream)
    stream.close()
    assert not any(t.name == "phivlm-generate" for t in threading.enumerate())
    after = steps["n"]
    time.sleep(0.2)
    assert steps["n"] == after < 20


def test_generate_refuses_an_oversized_prompt_before_any_work(tiny_checkpoint, synth_data, tmp_path, capsys):
    rows = [{"image": "000000000001.png", "prompt": "What colour?"},
            {"image": "000000000002.png", "prompt": "y" * (MAX_QUESTION_CHARS + 5)}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "in.jsonl"),
               "--images", synth_data["images"], "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc != 0 and "in.jsonl: line 2: question too long" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()
