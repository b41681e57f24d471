"""VQA scoring: the official VQAv2 answer normalisation and accuracy, plus exact match.

The rules follow ``vqaEval.py`` of the VQA evaluation toolkit (GT-Vision-Lab/VQA): strip or space out
punctuation, drop periods not inside numbers, lowercase, number words -> digits, drop articles, restore
contractions. Unlike the toolkit (whose references are pre-normalised), references are normalised too.
"""
from __future__ import annotations

import re
from collections import defaultdict

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the toolkit's pattern; removes periods not before a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Remove punctuation next to a space (or anywhere, if the text has a 1,000-style number), else space it
    out; then drop periods that do not start a decimal."""
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQAv2 normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"a red car"`` -> ``"red car"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(pred: str, refs: list[str]) -> float:
    """VQAv2 accuracy: min(#matching references / 3, 1), averaged over the leave-one-out subsets of the
    references as the toolkit does; with a single reference, a normalised exact match."""
    p = normalize_answer(pred)
    gts = [normalize_answer(r) for r in refs]
    if len(gts) == 1:
        return float(p == gts[0])
    hits = sum(g == p for g in gts)
    return sum(min(1.0, (hits - (g == p)) / 3) for g in gts) / len(gts)


def exact_match(pred: str, refs: list[str]) -> float:
    """1 if the prediction equals a reference, ignoring case and surrounding whitespace only."""
    return float(pred.strip().lower() in {r.strip().lower() for r in refs})


def score_answers(refs: list[list[str]], preds: list[str], types: list[str | None]) -> dict[str, dict[str, float]]:
    """``{"exact_match": {"all": .., type: ..}, "vqa_accuracy": {...}}`` (per question type where given)."""
    scores: dict[str, dict[str, list[float]]] = {"exact_match": defaultdict(list), "vqa_accuracy": defaultdict(list)}
    for r, p, t in zip(refs, preds, types, strict=True):
        for name, fn in (("exact_match", exact_match), ("vqa_accuracy", vqa_accuracy)):
            s = fn(p, r)
            scores[name]["all"].append(s)
            if t:
                scores[name][t].append(s)
    return {name: {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: (kv[0] != "all", kv[0]))}
            for name, by in scores.items()}
