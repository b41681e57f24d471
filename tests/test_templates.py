"""Conversation templates: labels, image slots, LLaVA normalisation, train/inference consistency, truncation."""
from __future__ import annotations

import json

import pytest

from phivlm.data.sources import load_samples
from phivlm.data.templates import (IMAGE_TOKEN, PHI_SYSTEM, TemplateError, encode, encode_prompt, get_template,
                                   resolve_template_name, start_token)
from phivlm.models import builtin
from phivlm.models.lm import load_tokenizer
from phivlm.models.vlm import IGNORE, IMAGE_ID, SEP_ID
from phivlm.errors import PhivlmError

P = 49  # image tokens (7x7 patches)
QA = [("What color is the circle?", "The circle is red."),
      ("How many shapes are there?", "There are 2 shapes."),
      ("Where is the blue square?", "The blue square is at the top left.")]
# template -> LM whose tokenizer it runs with
LMS = {"phi": "tiny-phi", "plain": "tiny-phi", "chat": "tiny-llama"}


def conversation(n: int) -> list[tuple[str, str]]:
    turns = []
    for i, (q, a) in enumerate(QA[:n]):
        turns += [("user", f"{IMAGE_TOKEN}\n{q}" if i == 0 else q), ("assistant", a)]
    return turns


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions."""
    runs, cur = [], []
    for x in labels + [IGNORE]:
        if x != IGNORE:
            cur.append(x)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def render(tok, ids: list[int]) -> str:
    """Decode ids back to text, the 49 image slots + separator shown as ``<image>``."""
    start = ids.index(IMAGE_ID)
    assert ids[start:start + P] == [IMAGE_ID] * P and ids[start + P] == SEP_ID
    assert IMAGE_ID not in ids[start + P:] and SEP_ID not in ids[start + P + 1:]
    return tok.decode(ids[:start]) + IMAGE_TOKEN + tok.decode(ids[start + P + 1:])


@pytest.mark.parametrize("n_turns", [1, 2, 3])
@pytest.mark.parametrize("name", ["phi", "plain", "chat"])
def test_labels_are_exactly_the_answers_and_eos(tiny_tok, name, n_turns):
    tok = tiny_tok[LMS[name]]
    turns = conversation(n_turns)
    enc = encode(get_template(name), tok, turns, P)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels) and enc.turns_kept == n_turns
    # labels are the tokens themselves (unshifted) wherever they are set
    assert all(lab == i for i, lab in zip(ids, labels) if lab != IGNORE)
    answers = [a for _, a in QA[:n_turns]]
    lead = " " if name == "phi" else ""  # the Phi template puts a space between "ASSISTANT:" and the answer
    runs = labelled_runs(labels)
    assert len(runs) == n_turns
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.eos_token_id
        assert tok.eos_token_id not in run[:-1]
        assert tok.decode(run[:-1]) == lead + answer
        assert run[:-1] == tok(lead + answer, add_special_tokens=False)["input_ids"]
    assert sum(lab == tok.eos_token_id for lab in labels) == n_turns
    # exactly one image: 49 contiguous IMAGE_ID slots then one SEP_ID, never labelled
    assert ids.count(IMAGE_ID) == P and ids.count(SEP_ID) == 1
    start = ids.index(IMAGE_ID)
    assert ids[start:start + P + 1] == [IMAGE_ID] * P + [SEP_ID]
    assert all(lab == IGNORE for lab in labels[start:start + P + 1])


@pytest.mark.parametrize("n_turns", [1, 3])
def test_phi_renders_the_reference_prompt(tiny_tok, n_turns):
    tok = tiny_tok["tiny-phi"]
    enc = encode(get_template("phi"), tok, conversation(n_turns), P)
    expected = PHI_SYSTEM + " " + "".join(
        f"USER: {IMAGE_TOKEN + chr(10) if i == 0 else ''}{q} ASSISTANT: {a}<|endoftext|>"
        for i, (q, a) in enumerate(QA[:n_turns]))
    assert render(tok, enc.input_ids) == expected


@pytest.mark.parametrize("n_turns", [1, 3])
def test_chat_renders_the_tokenizers_own_template(tiny_tok, n_turns):
    tok = tiny_tok["tiny-llama"]
    turns = conversation(n_turns)
    enc = encode(get_template("chat"), tok, turns, P)
    msgs = [{"role": r, "content": t} for r, t in turns]
    assert render(tok, enc.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_plain_is_start_then_image_then_caption_then_eos(tiny_tok):
    tok = tiny_tok["tiny-phi"]
    enc = encode(get_template("plain"), tok, [("user", IMAGE_TOKEN), ("assistant", "A red circle.")], P)
    cap = tok("A red circle.", add_special_tokens=False)["input_ids"]
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    assert enc.input_ids == [start] + [IMAGE_ID] * P + [SEP_ID] + cap + [tok.eos_token_id]
    assert enc.labels == [IGNORE] * (P + 2) + cap + [tok.eos_token_id]


def test_start_token_is_bos_else_eos(tiny_tok):
    """Never an image token first: the tokenizer's BOS where it has one, else its EOS."""
    from transformers import AutoTokenizer

    llama, phi = tiny_tok["tiny-llama"], tiny_tok["tiny-phi"]
    assert llama.bos_token_id is None and start_token(llama) == llama.eos_token_id
    assert phi.bos_token_id is None and start_token(phi) == phi.eos_token_id  # <|endoftext|>, like Phi-2
    smol = AutoTokenizer.from_pretrained(builtin.resolve("smollm2-135m"))
    assert smol.convert_ids_to_tokens(start_token(smol)) == "<|im_start|>"


def test_image_before_or_after_question(tmp_path, tiny_tok):
    conv = lambda first: [{"from": "human", "value": first}, {"from": "gpt", "value": "It is red."}]  # noqa: E731
    recs = [{"id": "a", "image": "a.png", "conversations": conv("<image>\nWhat color is it?")},
            {"id": "b", "image": "b.png", "conversations": conv("What color is it?\n<image>")},
            {"id": "c", "image": "c.png", "conversations": conv("What color is it? <image>")}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(recs))
    samples = load_samples(path)
    assert [s.turns[0] for s in samples] == [("user", "<image>\nWhat color is it?")] * 3
    for name in ("phi", "plain", "chat"):
        tok = tiny_tok[LMS[name]]
        encs = [encode(get_template(name), tok, s.turns, P) for s in samples]
        assert encs[0] == encs[1] == encs[2]
        ids = encs[0].input_ids
        assert ids.count(IMAGE_ID) == P and ids.count(SEP_ID) == 1


@pytest.mark.parametrize("name", ["phi", "plain", "chat"])
def test_prompt_is_the_training_prefix(tiny_tok, name):
    """What the model sees at inference after k turns is exactly the training input up to answer k+1."""
    tok, template = tiny_tok[LMS[name]], get_template(name)
    turns = conversation(3)
    enc = encode(template, tok, turns, P)
    starts = [i for i in range(1, len(enc.labels))
              if enc.labels[i] != IGNORE and enc.labels[i - 1] == IGNORE]  # first token of each answer
    assert len(starts) == 3
    for k in range(3):
        prompt = encode_prompt(template, tok, turns[: 2 * k + 1], P)
        assert prompt == enc.input_ids[: starts[k]]


@pytest.mark.parametrize("name", ["phi", "plain", "chat"])
def test_truncation_drops_whole_later_turns(tiny_tok, name):
    tok, template = tiny_tok[LMS[name]], get_template(name)
    turns = conversation(3)
    full = [encode(template, tok, turns[: 2 * k], P) for k in (1, 2, 3)]
    text_len = [len(e.input_ids) - (P + 1) for e in full]  # max_length counts text tokens only
    assert text_len[0] < text_len[1] < text_len[2]
    for limit, kept in [(text_len[2], 3), (text_len[2] - 1, 2), (text_len[1], 2), (text_len[1] - 1, 1),
                        (text_len[0], 1)]:
        enc = encode(template, tok, turns, P, max_length=limit)
        assert enc.turns_kept == kept, limit
        assert enc.input_ids == full[kept - 1].input_ids and enc.labels == full[kept - 1].labels
    # one turn alone too long: its answer's tail is cut, the image never is
    enc = encode(template, tok, turns, P, max_length=text_len[0] - 2)
    assert enc.turns_kept == 1 and len(enc.input_ids) == P + 1 + text_len[0] - 2
    assert enc.input_ids == full[0].input_ids[: len(enc.input_ids)]
    assert enc.input_ids.count(IMAGE_ID) == P and enc.input_ids.count(SEP_ID) == 1


@pytest.mark.parametrize("name", ["phi", "plain", "chat"])
def test_too_short_max_length_raises(tiny_tok, name):
    """A budget that leaves no answer token would train on nothing: fail loudly."""
    tok, template = tiny_tok[LMS[name]], get_template(name)
    prompt = encode_prompt(template, tok, conversation(1)[:1], P)
    with pytest.raises(TemplateError, match="no labelled token"):
        encode(template, tok, conversation(2), P, max_length=len(prompt) - (P + 1))


def test_chat_with_mismatched_eos_raises(tiny_tok):
    tok = load_tokenizer("tiny-llama")  # a fresh copy: the session tokenizer stays untouched
    tok.eos_token = "<|endoftext|>"  # ChatML closes turns with <|im_end|>
    with pytest.raises(TemplateError, match="EOS"):
        encode(get_template("chat"), tok, conversation(1), P)


def test_chat_without_chat_template_raises(tiny_tok):
    with pytest.raises(TemplateError, match="no chat template"):
        encode(get_template("chat"), tiny_tok["tiny-phi"], conversation(1), P)


def test_bad_conversations_raise(tiny_tok):
    tok, template = tiny_tok["tiny-phi"], get_template("phi")
    with pytest.raises(TemplateError, match="exactly one"):
        encode(template, tok, [("user", "no image here"), ("assistant", "ok")], P)
    with pytest.raises(TemplateError, match="exactly one"):
        encode(template, tok, [("user", "<image> <image>"), ("assistant", "ok")], P)
    with pytest.raises(TemplateError, match="alternate"):
        encode(template, tok, [("assistant", "<image>"), ("user", "ok")], P)
    with pytest.raises(TemplateError):  # a prompt must end with a user turn
        encode_prompt(template, tok, conversation(1), P)


def test_auto_and_unknown_template_names(tiny_tok):
    assert resolve_template_name("auto", tiny_tok["tiny-llama"]) == "chat"
    assert resolve_template_name("auto", tiny_tok["tiny-phi"]) == "phi"
    assert resolve_template_name("plain", tiny_tok["tiny-llama"]) == "plain"
    for call in (lambda: resolve_template_name("vicuna", tiny_tok["tiny-phi"]), lambda: get_template("vicuna")):
        with pytest.raises(PhivlmError, match="vicuna") as e:
            call()
        assert all(n in str(e.value) for n in ("chat", "phi", "plain"))
