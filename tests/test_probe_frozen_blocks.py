"""FFN blocks that get no gradient (frozen, with everything below them): the probe leaves them
out under the default --gdps-track '*', and says why when the user asked for them."""
import subprocess

import pytest
import torch
from torch import nn

from fairseq_gdps.gdps.gradient_capture import PerLanguageGradients
from gdps_training import environment, run_all, stage1_args


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.low = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 4)])
        self.high = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 4)])

    def forward(self, x):
        for fc1, fc2 in (self.low, self.high):
            x = x + fc2(torch.relu(fc1(x)))
        return x


def test_a_frozen_block_with_nothing_trained_below_has_no_gradient_and_the_rest_are_exact():
    torch.manual_seed(0)
    model = TwoBlocks()
    for p in model.low.parameters():
        p.requires_grad_(False)
    x, lang_ids = torch.randn(5, 4, 4), torch.tensor([0, 1, 1, 0])
    blocks = {"low": tuple(model.low), "high": tuple(model.high)}
    with PerLanguageGradients(blocks, lang_ids) as capture:
        model(x).square().sum().backward()
    assert capture.blocks_without_gradient() == ["low"]
    with pytest.raises(RuntimeError, match="low: layer 0 got no gradient .*everything below it are frozen"):
        capture.gradients()
    shares = capture.gradients(["high"])
    for lang in (0, 1):   # each language's share is the gradient of its utterances alone
        model.zero_grad()
        model(x[:, lang_ids == lang]).square().sum().backward()
        expected = torch.cat([p.grad.reshape(-1) for layer in model.high for p in layer.parameters()])
        torch.testing.assert_close(shares[lang]["high"], expected)


@pytest.mark.slow
def test_stage1_with_a_frozen_encoder_tracks_the_decoder_and_refuses_an_encoder_track(tiny_data, tmp_path):
    from fairseq_gdps.gdps.stats import GradientStatistics

    save = tmp_path / "frozen_encoder"
    [log] = run_all([stage1_args(tiny_data, save, 2, "--gdps-freeze", "encoder.*", "--update-freq", "2")])
    assert "get no gradient (frozen, with everything below them) and are not tracked: encoder." in log
    stats = GradientStatistics.load(save / "stats.pt")
    assert stats.num_steps == 2
    assert stats.module_names and all(m.startswith("decoder.") for m in stats.module_names)

    refused = subprocess.run([str(c) for c in stage1_args(tiny_data, tmp_path / "refused", 1, "--gdps-freeze", "encoder.*",
                                                          "--gdps-track", "encoder.*")],
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "--gdps-track 'encoder.*': FFN block(s) encoder." in refused.stdout + refused.stderr
    assert "so there is nothing to measure: leave them out" in refused.stdout + refused.stderr
