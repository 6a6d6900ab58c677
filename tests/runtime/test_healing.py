"""Healing: distillation of the factors toward dense targets, checked against independent math
(the full-vocabulary KL, float64 top-k) and against the model as it came (never made worse)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowrank_infer import LowRankLinear, UniformConfig, compress, healing
from lowrank_infer.data import clean_calibration_text, split_held_out
from lowrank_infer.healing import HealConfig, _held_loss, check_heal_memory, heal, healing_bytes, teacher_targets

from tiny_models import tiny_model

GEN = torch.Generator().manual_seed(0)
TRAIN = torch.randint(3, 128, (8, 24), generator=GEN)
HELD = torch.randint(3, 128, (4, 24), generator=GEN)


@pytest.fixture
def dense_and_compressed():
    dense = tiny_model("llama")
    compressed = copy.deepcopy(dense)
    compress(compressed, UniformConfig(keep=0.3, whiten=False), progress=False)
    return dense, compressed


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".U", ".V"))}


def _others(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".U", ".V"))}


@pytest.mark.parametrize("chunk_rows", [None, 7])  # 7: chunks that cut windows of 24 positions anywhere
def test_teacher_targets_are_the_float64_top_k(dense_and_compressed, monkeypatch, chunk_rows):
    dense, _ = dense_and_compressed
    if chunk_rows:
        monkeypatch.setattr(healing, "_TARGET_ROWS", chunk_rows)
    targets = teacher_targets(dense, TRAIN, top_k=5, batch_size=3)
    with torch.no_grad():
        logp = dense(TRAIN).logits.double().log_softmax(-1)
    values, index = logp.topk(5, dim=-1)
    assert torch.equal(targets.index.long(), index)
    torch.testing.assert_close(targets.logp.double(), values, rtol=1e-5, atol=1e-5)


def test_the_top_of_recorded_targets_is_what_a_smaller_top_k_records(dense_and_compressed):
    dense, _ = dense_and_compressed
    wide, narrow = teacher_targets(dense, TRAIN, top_k=20), teacher_targets(dense, TRAIN, top_k=6)
    cut = wide.top(6)
    assert torch.equal(cut.ids, narrow.ids) and torch.equal(cut.index, narrow.index)
    torch.testing.assert_close(cut.logp, narrow.logp, rtol=0, atol=1e-6)
    for k in (0, 21):
        with pytest.raises(ValueError, match=f"top {k} of targets that hold 20 tokens"):
            wide.top(k)


def test_bfloat16_teacher_targets_are_float32_and_close_to_the_float64_distribution(dense_and_compressed):
    """Under bfloat16 the recorded log-probabilities stay float32 and within bfloat16's rounding of
    float64 math at the tokens they name; nearly all of the float64 top-k is found."""
    dense, _ = dense_and_compressed
    targets = teacher_targets(dense, TRAIN, top_k=5, batch_size=3, compute_dtype="bfloat16")
    with torch.no_grad():
        logp = dense(TRAIN).logits.double().log_softmax(-1)
    assert targets.logp.dtype == torch.float32
    torch.testing.assert_close(targets.logp.double(), logp.gather(-1, targets.index.long()), rtol=0, atol=0.05)
    overlap = (targets.index.long().unsqueeze(-1) == logp.topk(5, dim=-1).indices.unsqueeze(-2)).any(-1)
    assert overlap.float().mean() > 0.9


def _coarsened_kl(teacher: torch.Tensor, student: torch.Tensor, top: int) -> float:
    """KL divergence, float64, between two [.., vocab] log-distributions each reduced to the
    teacher's ``top`` tokens and one bucket holding the rest of the vocabulary."""
    index = teacher.topk(top, dim=-1).indices
    p, q = teacher.exp().gather(-1, index), student.exp().gather(-1, index)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    return (p * (p.log() - q.log())).sum(-1).mean().item()


@pytest.mark.parametrize("top_k", [128, 5])  # 128: the tiny model's whole vocabulary
def test_the_loss_is_the_kl_divergence_of_the_distributions_coarsened_to_the_top_k(dense_and_compressed, top_k):
    dense, compressed = dense_and_compressed
    targets = teacher_targets(dense, HELD, top_k=top_k)
    with torch.no_grad():
        teacher = dense(HELD).logits.double().log_softmax(-1)
        student = compressed(HELD).logits.double().log_softmax(-1)
    if top_k == teacher.shape[-1]:
        expected = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean().item()
    else:
        expected = _coarsened_kl(teacher, student, top_k)
    assert _held_loss(compressed, targets, torch.device("cpu"), batch_size=3) == pytest.approx(expected, rel=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.device_marker = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, **kwargs):
        return type("Out", (), {"logits": self.logits})()


def test_moving_the_rest_of_the_vocabulary_onto_the_top_tokens_is_penalized():
    """A student that copies the teacher within its top tokens but puts the rest of the vocabulary's
    mass on them too is worse than the teacher itself (a top-only sum would score it below zero)."""
    teacher_logits = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    targets = teacher_targets(_Logits(teacher_logits), torch.zeros(2, 6, dtype=torch.long), top_k=8)
    # Every token outside the teacher's top 8 made e^10 times less likely; the top tokens keep their ratios.
    in_top = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter(-1, targets.index.long(), True)
    greedy = torch.where(in_top, teacher_logits, teacher_logits - 10)
    assert _held_loss(_Logits(teacher_logits), targets, torch.device("cpu"), 2) == pytest.approx(0.0, abs=1e-6)
    teacher, student = teacher_logits.double().log_softmax(-1), greedy.double().log_softmax(-1)
    top_only = (teacher.exp() * (teacher - student)).masked_fill(~in_top, 0).sum(-1).mean().item()
    greedy_loss = _held_loss(_Logits(greedy), targets, torch.device("cpu"), 2)
    assert top_only < 0 < greedy_loss
    assert greedy_loss == pytest.approx(_coarsened_kl(teacher, student, 8), rel=1e-4)


def test_healing_lowers_the_held_out_loss_and_trains_only_the_factors(dense_and_compressed):
    dense, compressed = dense_and_compressed
    train, held = teacher_targets(dense, TRAIN), teacher_targets(dense, HELD)
    others, factors = _others(compressed), _factors(compressed)
    count = sum(p.numel() for p in compressed.parameters())
    report = heal(compressed, train, held, HealConfig(steps=12, lr=3e-3, eval_every=4))
    assert report.best_step > 0 and report.held_after < report.held_before
    # The reported loss is the one the kept factors score, measured again here.
    assert _held_loss(compressed, held, torch.device("cpu"), 2) == pytest.approx(report.held_after, rel=1e-6)
    assert all(torch.equal(p, others[n]) for n, p in compressed.named_parameters() if n in others)
    assert any(not torch.equal(p, factors[n]) for n, p in compressed.named_parameters() if n in factors)
    assert sum(p.numel() for p in compressed.parameters()) == count
    assert all(p.requires_grad for p in compressed.parameters())  # flags as they were


def test_a_bfloat16_model_heals_as_its_float32_copy_does(dense_and_compressed):
    """Steps of about 0.1 % are under bfloat16's spacing: updating bfloat16 factors directly kept
    under a third of the float32 model's gain and moved the factors elsewhere (float32 masters fix it)."""
    dense, compressed = dense_and_compressed
    start = _factors(compressed)
    healed = {}
    for dtype in (torch.float32, torch.bfloat16):
        teacher, student = copy.deepcopy(dense).to(dtype), copy.deepcopy(compressed).to(dtype)
        report = heal(student, teacher_targets(teacher, TRAIN), teacher_targets(teacher, HELD),
                      HealConfig(steps=12, lr=1e-3, eval_every=4, decay=False))  # every step 0.1 %
        factors = _factors(student)
        assert all(p.dtype == dtype for p in factors.values())
        healed[dtype] = (report.held_before - report.held_after, {n: p.double() for n, p in factors.items()})
    (gain32, f32), (gain16, f16) = healed[torch.float32], healed[torch.bfloat16]
    assert gain16 > 0.7 * gain32 > 0
    moved = sum((f32[n] - start[n].double()).square().sum() for n in start).sqrt()
    apart = sum((f16[n] - f32[n]).square().sum() for n in start).sqrt()
    assert apart < 0.6 * moved


@pytest.mark.parametrize("dtype, extra", [(torch.float32, 12), (torch.bfloat16, 18)])
def test_healing_bytes_bound_what_the_compressed_model_holds_in_training(dense_and_compressed, dtype, extra):
    """Against the compressed model itself: its bytes plus, per factor weight, the gradient and
    Adam's moments (and below float32 the float32 master and the gradient in its dtype)."""
    dense, compressed = (m.to(dtype) for m in dense_and_compressed)
    factors = sum(p.numel() for n, p in compressed.named_parameters() if n.endswith((".U", ".V")))
    held = sum(p.numel() * p.element_size() for p in compressed.parameters()) + extra * factors
    assert held <= healing_bytes(dense, 0.3) <= 1.1 * held


def test_healing_that_cannot_fit_is_refused(dense_and_compressed):
    dense, _ = dense_and_compressed
    need = healing_bytes(dense, 0.3)
    check_heal_memory(dense, 0.3, need, "cuda:0")
    with pytest.raises(ValueError, match=r"--heal-steps trains every factor on cuda:0 at once: about [0-9.]+ GB "
                                         r"\(the model compressed to keep 0.3, plus 12 bytes per factor weight.*"
                                         r"compress without --heal-steps"):
        check_heal_memory(dense, 0.3, need - 1, "cuda:0")


def test_a_worse_model_is_never_kept(dense_and_compressed, monkeypatch):
    """Steps that only hurt (an optimizer pushing the factors up the gradient): the held-out loss
    never improves, so the factors stay bit for bit what compression made."""
    dense, compressed = dense_and_compressed
    train, held = teacher_targets(dense, TRAIN), teacher_targets(dense, HELD)
    factors = _factors(compressed)
    monkeypatch.setattr(torch.optim, "Adam", lambda groups, **_: torch.optim.SGD(groups, maximize=True))
    report = heal(compressed, train, held, HealConfig(steps=6, lr=1e-1, eval_every=2, patience=2))
    assert report.best_step == 0 and report.held_after == report.held_before and report.steps_run == 4
    assert all(torch.equal(p, factors[n]) for n, p in compressed.named_parameters() if n in factors)


def test_a_run_longer_than_its_windows_cycles_through_them_in_order(dense_and_compressed, monkeypatch):
    dense, compressed = dense_and_compressed
    train, held = teacher_targets(dense, TRAIN[:3]), teacher_targets(dense, HELD)
    trained = []
    real_kl = healing._kl

    def recording_kl(model, targets, device, head=None):
        if torch.is_grad_enabled():  # a training step (held-out scores run without gradients)
            trained.append([next(i for i, w in enumerate(TRAIN) if torch.equal(w, row)) for row in targets.ids])
        return real_kl(model, targets, device, head)

    monkeypatch.setattr(healing, "_kl", recording_kl)
    heal(compressed, train, held, HealConfig(steps=7, lr=1e-3, batch_size=1, eval_every=7))
    assert trained == [[0], [1], [2], [0], [1], [2], [0]]


class _Poison(torch.optim.SGD):
    """An optimizer whose second step leaves a NaN in the factors (as a diverging run would)."""

    def step(self, closure=None):
        super().step(closure)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("nan")


def test_a_non_finite_loss_restores_the_factors(dense_and_compressed, monkeypatch):
    dense, compressed = dense_and_compressed
    train, held = teacher_targets(dense, TRAIN), teacher_targets(dense, HELD)
    factors = _factors(compressed)
    monkeypatch.setattr(torch.optim, "Adam", lambda groups, **_: _Poison(groups))
    with pytest.raises(ValueError, match=r"heal: training loss at step 3 is nan; the factors were restored"):
        heal(compressed, train, held, HealConfig(steps=20, lr=1e-3, eval_every=5))
    assert all(torch.equal(p, factors[n]) for n, p in compressed.named_parameters() if n in factors)


def test_healing_scores_held_out_windows_about_ten_times_a_run_unless_told():
    assert [HealConfig(steps=n).eval_every for n in (1, 100, 400, 1000)] == [10, 10, 40, 100]
    assert HealConfig(steps=400, eval_every=7).eval_every == 7


def test_healing_lowers_its_rate_to_zero_by_default_and_refinement_does_not():
    from lowrank_infer.refinement import RefineConfig

    assert HealConfig(steps=4).decay and not HealConfig(steps=4, decay=False).decay
    assert not RefineConfig(steps=4).decay


def test_bad_settings_and_models_are_refused(dense_and_compressed):
    dense, _ = dense_and_compressed
    with pytest.raises(ValueError, match="heal steps must be an integer >= 1"):
        HealConfig(steps=0)
    with pytest.raises(ValueError, match="heal lr must be a positive number"):
        HealConfig(steps=1, lr=float("nan"))
    targets = teacher_targets(dense, HELD)
    with pytest.raises(ValueError, match="no low-rank layer"):
        heal(dense, targets, targets, HealConfig(steps=1))
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())


def test_unk_markers_are_removed_and_the_held_out_part_is_disjoint():
    assert clean_calibration_text("the <unk> cat <unk>\n<unk> sat") == "the cat\n sat"
    tokens = torch.arange(1000)
    fit, held = split_held_out(tokens)
    assert torch.equal(torch.cat([fit, held]), tokens) and held.numel() == 100
    with pytest.raises(ValueError, match="held-out fraction"):
        split_held_out(tokens, 1.0)


def test_bfloat16_healing_casts_the_frozen_dense_layers_once_and_gives_them_back(monkeypatch):
    """Under bfloat16 the layers kept dense (frozen) train in their bfloat16 values, as autocast
    would have cast them, and come back float32 bit for bit; the factors still heal."""
    import dataclasses

    from lowrank_infer import healing
    from lowrank_infer.allocation import uniform_plan
    from lowrank_infer.structure import target_shapes

    dense = tiny_model("llama")
    plan = uniform_plan(target_shapes(dense), 0.5)
    kept = ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj")
    plan = dataclasses.replace(plan, layers=[dataclasses.replace(l, rank=None) if l.name in kept else l for l in plan.layers])
    compressed = copy.deepcopy(dense)
    compress(compressed, UniformConfig(keep=0.5, whiten=False), plan=plan, progress=False)
    modules = dict(compressed.named_modules())
    assert all(type(modules[name]) is torch.nn.Linear for name in kept)  # left as they were
    others = _others(compressed)
    seen = {}
    real = healing.train_early_stopped

    def spy(*args, **kwargs):
        seen.update({name: modules[name].weight.dtype for name in kept})
        return real(*args, **kwargs)

    monkeypatch.setattr(healing, "train_early_stopped", spy)
    report = heal(compressed, teacher_targets(dense, TRAIN), teacher_targets(dense, HELD),
                  HealConfig(steps=12, lr=3e-3, eval_every=4, compute_dtype="bfloat16"))
    assert seen == {name: torch.bfloat16 for name in kept}
    assert report.best_step > 0 and report.held_after < report.held_before
    for name, p in compressed.named_parameters():
        if name in others:
            assert p.dtype == torch.float32 and torch.equal(p, others[name]), name
