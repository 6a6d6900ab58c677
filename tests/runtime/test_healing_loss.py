"""The healing loss fused through the output layer, against float64 autograd of the plain formula
(log_softmax over the whole vocabulary) and against the plain path on a compressed model; no fusing
where a model's logits are more than its head's output."""

import copy
from types import SimpleNamespace

import pytest
import torch

from lowrank_infer import UniformConfig, compress
from lowrank_infer import healing_loss
from lowrank_infer.healing import teacher_targets
from lowrank_infer.healing_loss import coarsened_kl, frozen_copy, fusable_head

from tiny_models import tiny_model

IDS = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(1))


class _Base(torch.nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)

    def forward(self, ids, use_cache=None):
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(self.embed(ids))))


class _ToyLM(torch.nn.Module):
    """A float64 causal-LM shape: a base model's hidden states and an output layer with a bias."""

    def __init__(self, vocab=40, width=12):
        super().__init__()
        torch.manual_seed(0)
        self.model, self.lm_head = _Base(128, width), torch.nn.Linear(width, vocab)  # ids < 128
        self.double()
        self.lm_head.requires_grad_(False)

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids, use_cache=None):
        return SimpleNamespace(logits=self.lm_head(self.model(ids).last_hidden_state))


def _teacher(vocab, top_k):
    logits = 3 * torch.randn(*IDS.shape, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = logits.log_softmax(-1).topk(top_k, dim=-1)
    return top.values, top.indices


def _reference_loss(model, teacher_logp, index):
    """The coarsened KL from a vocabulary-wide log_softmax, autograd all the way."""
    logp = model(IDS).logits.log_softmax(-1)
    s, p = logp.gather(-1, index), teacher_logp.exp()
    rest_t, rest_s = 1 - p.sum(-1), 1 - s.exp().sum(-1)
    kl = (p * (teacher_logp - s)).sum(-1)
    if index.shape[-1] < logp.shape[-1]:
        kl = kl + rest_t * (rest_t.log() - rest_s.log())
    return kl.mean()


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("top_k", [5, 40])  # 40: the whole vocabulary (no rest bucket)
@pytest.mark.parametrize("chunk_rows", [7, 1000])  # several chunks with a ragged last one; one chunk
def test_the_fused_loss_and_its_gradient_are_those_of_the_float64_formula(top_k, chunk_rows, monkeypatch):
    model = _ToyLM()
    monkeypatch.setattr(healing_loss, "CHUNK_LOGITS", chunk_rows * 40)
    logp, index = _teacher(40, top_k)
    assert fusable_head(model, IDS[:1, :8]) is model.lm_head

    fused = coarsened_kl(model, IDS, logp, index, model.lm_head)
    expected = _reference_loss(model, logp, index)
    assert expected.item() > 0.1
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=0)
    for got, want in zip(_grads(model, fused), _grads(model, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def _compressed_student():
    """A uniformly compressed tiny model whose factors alone train, the dense model's top-5
    targets on ``IDS``, and its fusable output layer."""
    dense = tiny_model("llama")
    student = copy.deepcopy(dense)
    compress(student, UniformConfig(keep=0.3, whiten=False), progress=False)
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith((".U", ".V")))
    return student, teacher_targets(dense, IDS, top_k=5), fusable_head(student, IDS[:1, :8])


def test_a_compressed_model_gets_the_loss_and_factor_gradients_of_the_plain_path():
    student, targets, head = _compressed_student()
    assert head is student.lm_head
    fused = coarsened_kl(student, IDS, targets.logp, targets.index, head)
    plain = coarsened_kl(student, IDS, targets.logp, targets.index)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    for got, want in zip(_grads(student, fused), _grads(student, plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert not coarsened_kl(student, IDS, targets.logp, targets.index, head).requires_grad


class _SoftCapped(torch.nn.Module):
    """A causal LM whose logits are its head's, soft-capped (as Gemma 2 does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.base_model_prefix = "inner"

    @property
    def base_model(self):
        return self.inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, ids, **kwargs):
        out = self.inner(ids, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out


def test_no_fused_head_where_the_logits_are_more_than_the_head_or_the_head_trains():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits large enough for the cap to bend them
    model.requires_grad_(False)
    assert fusable_head(model, IDS[:1, :8]) is model.lm_head
    assert fusable_head(_SoftCapped(model), IDS[:1, :8]) is None
    model.lm_head.weight.requires_grad_(True)
    assert fusable_head(model, IDS[:1, :8]) is None


def test_the_head_cast_once_gives_the_same_loss_and_gradients_under_autocast():
    """``frozen_copy``: a bfloat16 copy of the (embedding-tied) output layer, the original left
    float32, and the fused loss and factor gradients under bfloat16 autocast bit for bit unchanged."""
    student, targets, head = _compressed_student()
    cast = frozen_copy(head, "bfloat16")
    assert cast.weight.dtype == torch.bfloat16 and not cast.weight.requires_grad
    assert head.weight.dtype == torch.float32 and head.weight is student.model.embed_tokens.weight
    assert frozen_copy(head, "float32") is head
    results = []
    for which in (head, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = coarsened_kl(student, IDS, targets.logp, targets.index, which)
        results.append((loss, *_grads(student, loss)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
