"""PerLanguageGradients: every language's share equals the gradient of that language's utterances
alone, including the share derived by subtraction (the language with the most utterances). On a toy FFN;
test_probe_exactness.py checks the same on the s2t_transformer_gdps model through the task."""
import pytest
import torch
from torch import nn

from fairseq_gdps.gdps.gradient_capture import PerLanguageGradients


class TimeMajorFFN(nn.Module):
    def __init__(self, dim=6, hidden=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):  # (T, B, C), as fairseq's layers see it
        return self.fc2(torch.relu(self.fc1(x)))


def per_utterance_loss(model, x):
    """A loss that is a sum over utterances, so each language's share of it is separable."""
    return (model(x) ** 2).sum(dim=(0, 2)) * torch.linspace(0.5, 1.5, x.size(1), dtype=x.dtype)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for layer in (model.fc1, model.fc2) for p in layer.parameters()])


def reference_shares(model, x, lang_ids):
    out = {}
    for lang in torch.unique(lang_ids).tolist():
        model.zero_grad()
        per_utterance_loss(model, x)[lang_ids == lang].sum().backward()
        out[lang] = flat_grad(model).clone()
    model.zero_grad()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lang_ids", [[2, 0, 2, 1, 2, 0, 2], [1, 1, 1, 1], [0, 3, 3, 0, 5]])
def test_each_share_is_that_languages_gradient(dtype, lang_ids):
    torch.manual_seed(0)
    model = TimeMajorFFN().to(dtype)
    lang_ids = torch.tensor(lang_ids)
    x = torch.randn(5, len(lang_ids), 6, dtype=dtype)
    expected = reference_shares(model, x, lang_ids)
    with PerLanguageGradients({"ffn": (model.fc1, model.fc2)}, lang_ids) as capture:
        per_utterance_loss(model, x).sum().backward()
    got = {lang: blocks["ffn"] for lang, blocks in capture.gradients().items()}
    assert got.keys() == expected.keys()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for lang in expected:
        torch.testing.assert_close(got[lang], expected[lang], **tol)
    torch.testing.assert_close(sum(got.values()), flat_grad(model), **tol)
    # the language with the most utterances is the derived one; the probe hooks are gone afterwards
    counts = [int((lang_ids == lang).sum()) for lang in capture.languages]
    assert counts[capture.derived] == max(counts)
    assert not capture._handles


def test_frozen_parameters_multiply_every_share_out():
    torch.manual_seed(1)
    model = TimeMajorFFN()
    model.fc1.bias.requires_grad_(False)
    lang_ids = torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(4, 5, 6)
    with PerLanguageGradients({"ffn": (model.fc1, model.fc2)}, lang_ids) as capture:
        per_utterance_loss(model, x).sum().backward()
    got = capture.gradients()
    model.fc1.bias.requires_grad_(True)
    expected = reference_shares(model, x, lang_ids)
    for lang in expected:
        torch.testing.assert_close(got[lang]["ffn"], expected[lang], rtol=1e-5, atol=1e-5)


def test_gradients_can_be_read_twice():
    torch.manual_seed(2)
    model = TimeMajorFFN()
    lang_ids = torch.tensor([0, 1, 1])
    with PerLanguageGradients({"ffn": (model.fc1, model.fc2)}, lang_ids) as capture:
        per_utterance_loss(model, torch.randn(3, 3, 6)).sum().backward()
    first = {lang: g["ffn"].clone() for lang, g in capture.gradients().items()}
    second = capture.gradients()
    for lang in first:
        assert torch.equal(first[lang], second[lang]["ffn"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frozen_bias", [False, True])
def test_a_capture_without_shares_keeps_their_gram_matrix(dtype, frozen_bias):
    """keep_shares=False: each layer's shares are reduced to their Gram matrix during the backward
    pass (layers with a derived share) or at complete() (the others), and freed; the Gram matrix is
    that of the languages' own gradients, and the shares can no longer be read."""
    torch.manual_seed(3)
    model = TimeMajorFFN().to(dtype)
    model.fc1.bias.requires_grad_(not frozen_bias)   # fc1 then has no derived share
    lang_ids = torch.tensor([2, 0, 2, 1, 2, 0, 2])
    x = torch.randn(5, len(lang_ids), 6, dtype=dtype)
    with PerLanguageGradients({"ffn": (model.fc1, model.fc2)}, lang_ids, keep_shares=False) as capture:
        per_utterance_loss(model, x).sum().backward()
        # fc2's shares (derived, float) are reduced and freed as soon as its gradients arrive
        assert ("ffn", 1) in capture._gram and ("ffn", 1) not in capture._weight
        assert (("ffn", 0) in capture._weight) == frozen_bias
    capture.complete()
    assert not capture._weight and not capture._bias and not capture._total
    model.fc1.bias.requires_grad_(True)
    expected = reference_shares(model, x, lang_ids)
    # (a frozen parameter's share is its would-be gradient, as with the shares kept)
    rows = torch.stack([expected[lang] for lang in capture.languages]).double()
    scale = float((rows @ rows.T).diagonal().max())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((capture.block_gram("ffn") - rows @ rows.T).abs().max()) < tol * scale
    assert capture.block_size("ffn") == rows.size(1)
    with pytest.raises(RuntimeError, match="Gram matrices of the shares only"):
        capture.gradients()


def test_a_capture_without_shares_refuses_a_second_backward_pass():
    torch.manual_seed(4)
    model = TimeMajorFFN()
    lang_ids = torch.tensor([0, 1, 1])
    x = torch.randn(3, 3, 6)
    with PerLanguageGradients({"ffn": (model.fc1, model.fc2)}, lang_ids, keep_shares=False):
        per_utterance_loss(model, x).sum().backward()
        with pytest.raises(RuntimeError, match="after its shares were reduced"):
            per_utterance_loss(model, x).sum().backward()
