"""Training holds frozen LM weights in the compute dtype once (autocast would re-cast them every forward): the
same loss and gradients, trainable weights untouched."""
from __future__ import annotations

import copy

import pytest
import torch

from phivlm.config import TuningConfig
from phivlm.loading.tuning import apply_tuning
from phivlm.models.lm import load_lm
from phivlm.models.vlm import IMAGE_ID, PhiVLM
from phivlm.runtime import autocast

CPU = torch.device("cpu")


def _vlm(tuning: str) -> PhiVLM:
    torch.manual_seed(0)
    lm = apply_tuning(load_lm("tiny-llama", attention="eager"), TuningConfig(lm_tuning=tuning, lora_dropout=0.0))
    vlm = PhiVLM(lm, 8, 4).train()
    if tuning == "lora":  # adapters that already moved: B = 0 would hide a wrong base product
        for name, p in vlm.lm.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
    return vlm


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    ids[:, :4] = IMAGE_ID
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "image_features": torch.randn(2, 4, 8, generator=g)}


def _loss_and_grads(vlm: PhiVLM) -> tuple[torch.Tensor, dict]:
    with autocast(CPU, "bf16"):
        loss = vlm(**_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tuning", ["frozen", "lora"])
def test_held_frozen_weights_give_the_same_loss_and_gradients(tuning):
    plain = _vlm(tuning)
    held = copy.deepcopy(plain)
    held.hold_weights_in(torch.bfloat16)
    base = held.base_lm
    frozen = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    trained = [p for p in held.parameters() if p.requires_grad]
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert all(p.dtype == torch.float32 for p in trained)  # projector, separator, adapters: fp32 master copies
    assert base.get_input_embeddings().weight.dtype == torch.float32

    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(held)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) >= (3 if tuning == "frozen" else 10)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_full_tuning_keeps_every_weight_fp32_and_the_head_tied():
    vlm = _vlm("full")
    vlm.hold_weights_in(torch.bfloat16)
    base = vlm.base_lm
    assert all(p.dtype == torch.float32 for p in vlm.parameters())
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight


def test_training_in_bf16_holds_the_frozen_lm_and_trains_the_rest_in_fp32(synth_data, train_run, tiny_config,
                                                                          tmp_path):
    cfg = tiny_config(tmp_path / "run", synth_data["captions_train"], synth_data["images"], tmp_path / "features",
                      lm="tiny-llama", precision="bf16", max_steps=2)
    run = train_run(cfg)
    base = run.vlm.base_lm
    assert all(m.weight.dtype == torch.bfloat16 for m in base.modules() if isinstance(m, torch.nn.Linear))
    assert all(p.dtype == torch.float32 for p in run.vlm.parameters() if p.requires_grad)
    assert base.get_input_embeddings().weight.dtype == torch.float32
    # the checkpoint holds what trained, in fp32
    from helpers import weights

    assert all(w.dtype == torch.float32 for k, w in weights(run.ckpt).items() if k.startswith("projector"))


def test_sharded_training_leaves_frozen_weights_as_they_are():
    from phivlm.train import strategy
    from phivlm.train.distributed import Dist

    assert strategy.OneProcess(Dist(), CPU).holds_frozen_weights and strategy.DDP(Dist(), CPU).holds_frozen_weights
    assert not strategy.FSDP(Dist(), CPU, "full").holds_frozen_weights
