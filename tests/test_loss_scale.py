"""Mixed precision: the probe divides fairseq's loss scale out of the gradients it records, so that
steps taken at different loss scales (the scale changes during training) compare."""
from types import SimpleNamespace

import pytest
import torch
from fairseq.optim.dynamic_loss_scaler import DynamicLossScaler

from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate
from fairseq_gdps.tasks.gradient_probe import loss_scale_of


def test_loss_scale_of_fairseqs_optimizers():
    assert loss_scale_of(SimpleNamespace()) == 1.0                      # fp32 optimizers have no scaler
    assert loss_scale_of(SimpleNamespace(scaler=None)) == 1.0           # --bf16: no scaling
    assert loss_scale_of(SimpleNamespace(scaler=DynamicLossScaler(init_scale=128.0))) == 128.0   # --fp16
    amp = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert loss_scale_of(SimpleNamespace(scaler=amp)) == 1024.0         # --amp (torch's GradScaler)


def test_update_divides_the_loss_scale_out():
    g = {0: {"ffn": torch.randn(6)}, 1: {"ffn": torch.randn(6)}}
    tokens = torch.tensor([3.0, 5.0])
    plain, scaled = PerLanguageUpdate({"ffn": 6}, 2), PerLanguageUpdate({"ffn": 6}, 2)
    plain.add(g, tokens)
    scaled.add({lang: {"ffn": 256.0 * t["ffn"]} for lang, t in g.items()}, tokens, loss_scale=256.0)
    torch.testing.assert_close(scaled.blocks["ffn"], plain.blocks["ffn"], rtol=1e-15, atol=0)
    assert torch.equal(scaled.tokens, plain.tokens)
    with pytest.raises(ValueError, match="loss_scale must be positive"):
        plain.add(g, tokens, loss_scale=0.0)
