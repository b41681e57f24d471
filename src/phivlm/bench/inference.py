"""Bench figures 4-5: feature caching (``build_features`` against the bare forward of the tower's model, for the
bench's CLIP and the demo's tower) and generation
(``phivlm.generate`` against ``LlavaForConditionalGeneration.generate``)."""
from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path

import torch

from ..runtime import compute_dtype
from . import measure
from .measure import interleave, memory, paired_ratio
from .profiling import profile_calls
from .env import Env, demo_tower, make_vlm

log = logging.getLogger("phivlm.bench")
PROMPT = "<image>\nDescribe the image in detail."


def features_figure(env: Env) -> dict:
    """``build_features`` with the bench's tower against the bare ``CLIPVisionModel`` forward (every layer)."""
    return _feature_caching(env, env.tower, env.clip, "features")


def demo_features_figure(env: Env) -> dict:
    """``build_features`` with the demo's tower (``demo_tower``: its image size, tiles, pooling and feature
    layer) against that model's bare forward, every layer, on the same preprocessed tiles."""
    from transformers import AutoModel

    from ..models import builtin
    from ..models.vision import build_tower

    m = demo_tower(env.cfg.quick)
    bare = AutoModel.from_pretrained(builtin.resolve(m.vision), dtype=torch.float32, use_safetensors=True).eval()
    out = _feature_caching(env, build_tower(m), bare, "demo_features")
    out["tower"] = {"name": m.vision, "feature_layer": m.feature_layer, "image_size": m.image_size,
                    "image_tokens": m.image_tokens, "tiles": m.image_tiles}
    return out


def _feature_caching(env: Env, tower, bare, figure: str) -> dict:
    from ..data.features import build_features
    from ..models.vision import split_tiles

    cfg = env.cfg
    names = env.image_names
    tiles = split_tiles(env.pixels(names, tower), tower.tiles)  # what the model sees: tiles, if any
    per_batch = cfg.feature_batch * tower.tiles ** 2
    roots: list[Path] = []

    def phivlm_features(r: int) -> None:
        root = env.work / f"bench-{figure}-{len(roots)}"
        roots.append(root)
        build_features(tower, env.images, names, root, batch_size=cfg.feature_batch)  # precision auto

    @torch.no_grad()
    def bare_forward(r: int) -> None:
        with env.autocast():
            for chunk in tiles.split(per_batch):
                bare(pixel_values=chunk)

    fns = {"phivlm": phivlm_features, "reference": bare_forward}
    for fn in fns.values():
        fn(-1)
    mem = {"phivlm": memory(lambda: phivlm_features(-1), tower.model),
           "reference": memory(lambda: bare_forward(-1), bare)}
    log.info("%s: %d interleaved rounds of %d images", figure, cfg.rounds, len(names))
    timing = interleave(fns, cfg.rounds)
    prof = profile_calls(env, figure, {k: (lambda fn=fn: fn(-1)) for k, fn in fns.items()})
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    out = {"images": len(names), "batch_size": cfg.feature_batch}
    for name in fns:
        t = timing[name]
        out[name] = {"images_per_s": statistics.median(len(names) / w for w in t.wall), "wall_s": t.wall,
                     "cpu_s": t.cpu, "memory": mem[name]}
        if prof:
            out[name]["profile"] = prof[name]
    out["speedup"] = paired_ratio(timing["reference"], timing["phivlm"])
    return out


def generation_figure(env: Env) -> dict:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.streamers import BaseStreamer

    from ..data.templates import encode_prompt, get_template, resolve_template_name
    from ..generate import GenerationConfig, generate
    from .reference import Reference

    cfg = env.cfg
    vlm = make_vlm(env).eval()
    ref = Reference(env.clip, vlm, env.feature_layer)
    ref.model.eval()
    dtype = compute_dtype(torch.device("cpu"), "auto")
    vlm.prepare_decoding(dtype)  # what Assistant (chat, serve, eval, generate) does
    template = get_template(resolve_template_name("auto", env.tok))
    ids = torch.tensor([encode_prompt(template, env.tok, [("user", PROMPT)], env.tower.num_patches)])
    mask = torch.ones_like(ids)
    rids = ref.ids(ids)
    pixels = env.pixels(env.image_names[:1])
    n_new = cfg.new_tokens
    gen = GenerationConfig(max_new_tokens=n_new)  # greedy
    hf_gen = HFGenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                eos_token_id=env.tok.eos_token_id, pad_token_id=env.tok.pad_token_id)
    ttft: dict[str, list[float]] = {"phivlm": [], "reference": []}
    tokens: dict[str, list[int]] = {}

    class FirstToken(BaseStreamer):
        def __init__(self, t0: float):
            self.t0, self.calls = t0, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                ttft["reference"].append(time.perf_counter() - self.t0)

        def end(self):
            pass

    @torch.no_grad()
    def phivlm_generate(r: int) -> None:
        t0 = time.perf_counter()
        first: list[float] = []

        def on_tokens(_):
            if not first:
                first.append(time.perf_counter() - t0)

        with env.autocast():
            feats = env.tower(pixels).float()
            out = generate(vlm, ids, mask, feats, {-1}, gen, on_tokens=on_tokens)  # no EOS: n_new tokens
        ttft["phivlm"].append(first[0])
        tokens["phivlm"] = out[0]

    @torch.no_grad()
    def reference_generate(r: int) -> None:
        streamer = FirstToken(time.perf_counter())
        with env.autocast():
            out = ref.model.generate(input_ids=rids, attention_mask=mask, pixel_values=pixels,
                                     generation_config=hf_gen, streamer=streamer)
        tokens["reference"] = out[0, ids.shape[1]:].tolist()

    fns = {"phivlm": phivlm_generate, "reference": reference_generate}
    for fn in fns.values():
        fn(-1)
    fast_tokens, decoder, vlm.decoder = tokens["phivlm"], vlm.decoder, None
    phivlm_generate(-1)  # the same weights through transformers' decoder: what models.decoder must reproduce
    same_as_transformers, vlm.decoder = tokens["phivlm"] == fast_tokens, decoder
    tokens["phivlm"] = fast_tokens
    mem = {"phivlm": memory(lambda: phivlm_generate(-1), vlm, env.tower.model),
           "reference": memory(lambda: reference_generate(-1), ref.model)}
    for v in ttft.values():
        v.clear()
    log.info("generation: %d interleaved rounds of %d new tokens", cfg.rounds, n_new)
    timing = interleave(fns, cfg.rounds)
    prof = profile_calls(env, "generation", {k: (lambda fn=fn: fn(-1)) for k, fn in fns.items()})
    out = {"new_tokens": n_new, "prompt_tokens": int(ids.shape[1]), "batch_size": 1,
           "same_tokens": tokens["phivlm"] == tokens["reference"],
           "tokens_agreeing": next((i for i, (a, b) in enumerate(zip(tokens["phivlm"], tokens["reference"])) if a != b),
                                   min(len(tokens["phivlm"]), len(tokens["reference"]))),
           "same_tokens_as_transformers_decoder": same_as_transformers,
           "decoder": "phivlm" if decoder is not None else "transformers",
           "tokens": {k: len(v) for k, v in tokens.items()}}
    for name in fns:
        t, first = timing[name], ttft[name][:len(timing[name].wall)]
        out[name] = {
            "total_s": t.median_wall, "ttft_s": statistics.median(first),
            "tokens_per_s": statistics.median((n_new - 1) / (w - f) for w, f in zip(t.wall, first)),
            "end_to_end_tokens_per_s": statistics.median(n_new / w for w in t.wall),
            "wall_s": t.wall, "cpu_s": t.cpu, "ttft_all_s": first, "memory": mem[name]}
        if prof:
            out[name]["profile"] = prof[name]
    p, r = out["phivlm"], out["reference"]
    out["speedup"] = r["total_s"] / p["total_s"]
    out["speedup_tokens_per_s"] = p["tokens_per_s"] / r["tokens_per_s"]
    out["speedup_ttft"] = r["ttft_s"] / p["ttft_s"]
    del vlm, ref
    measure._trim()
    return out
