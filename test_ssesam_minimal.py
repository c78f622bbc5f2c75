"""Tests for ssesam_minimal.py. Each re-derives its result the obvious way and compares.

CPU only, no network, no real CIFAR: where CIFAR files are needed they are written small, in the
real pickle layout, into a temporary folder.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssesam_minimal as sm

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

# The seed README's usage snippet, verbatim: our SSESAM must run it unchanged.
SEED_SNIPPET = """
if optim_mode == 'ssesam':
    # Identify tail samples using their class labels
    tail_mask = torch.where((targets[:, None] == tail_classes[None, :].to(targets.device)).sum(1) == 1, True, False)

    # Compute and backpropagate head loss
    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=0)  # Perturb for head classes

    # Recompute logits for head classes and calculate updated gradients
    logits = model(images)
    head_loss = lossFunc(logits[~tail_mask], targets[~tail_mask]).sum() / targets.size(0)
    head_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()  # Accumulate and restore head gradients

    # Compute and backpropagate tail loss
    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(n_i=1)  # Perturb for tail classes

    # Recompute logits for tail classes and calculate updated gradients
    logits = model(images)
    tail_loss = lossFunc(logits[tail_mask], targets[tail_mask]).sum() / targets.size(0)
    tail_loss.backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()  # Accumulate and restore tail gradients

    # Update model parameters
    optimizer.update()

    # Combine head and tail losses
    loss = head_loss + tail_loss
"""

C = 10
COUNTS = [200, 154, 119, 92, 71, 55, 42, 33, 25, 20]  # synthetic IF 10; tail (n < 50) = classes 6..9
ETA = 50
TAIL_CLASSES = torch.tensor([c for c, n in enumerate(COUNTS) if n < ETA])


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return sm.CifarResNet(8, C).to(dtype)


def batch(seed=1, B=16, dtype=torch.float64, labels=None, size=8):
    """Random images (small: the network pools globally, and float64 convolutions are slow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g) if labels is None else torch.as_tensor(labels)
    return x, y


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def grads_at(model, loss_fn):
    """Plain autograd: the gradient of loss_fn(model) w.r.t. every parameter, as a list."""
    return list(torch.autograd.grad(loss_fn(model), list(model.parameters())))


def naive_eps(grads, rho):
    """eps = rho * g / (||g|| + 1e-16), written as a per-parameter Python loop."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [rho * g / (norm + 1e-16) for g in grads]


def shifted(model, eps):
    """A copy of model with w + eps."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(m.parameters(), eps):
            p.add_(e)
    return m


def ce_sum(model, x, y, mask, B):
    return F.cross_entropy(model(x)[mask], y[mask], reduction="sum") / B


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def cifar_resnet_param_count(depth, num_classes):
    """Count by hand: 3x3 convs without bias, BN (gamma, beta), option-A shortcuts, fc with bias."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16                      # stem conv + bn
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            in_planes = planes
    return total + 64 * num_classes + num_classes


def test_resnet32_has_the_published_parameter_count():
    for num_classes, published in ((100, 0.470e6), (10, 0.464e6)):
        n = sum(p.numel() for p in sm.resnet32(num_classes).parameters())
        assert n == cifar_resnet_param_count(32, num_classes)
        assert abs(n - published) < 0.5e3  # LDAM-DRW: 0.47 M / 0.46 M
    for depth in (8, 20, 56):
        assert sum(p.numel() for p in sm.CifarResNet(depth, 7).parameters()) == cifar_resnet_param_count(depth, 7)


def test_resnet32_has_32_weight_layers_and_parameter_free_shortcuts():
    m = sm.resnet32(100)
    layers = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 32
    shortcuts = [x for x in m.modules() if isinstance(x, sm.ShortcutA)]
    assert len(shortcuts) == 2 and all(sum(p.numel() for p in s.parameters()) == 0 for s in shortcuts)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 100)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = sm.ShortcutA(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()


def test_resnet34_is_the_official_21_3m_backbone():
    m = sm.resnet34(100)
    assert sum(p.numel() for p in m.parameters()) == 21_328_292
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_normed_linear_gives_cosines():
    lin = sm.NormedLinear(5, 3)
    x = torch.randn(4, 5, dtype=torch.float64)
    w = lin.weight.detach().double()
    want = torch.stack([torch.stack([F.cosine_similarity(x[i], w[:, c], dim=0) for c in range(3)])
                        for i in range(4)])
    assert torch.allclose(lin.double()(x), want, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def manual_ce(z, y):
    """-log softmax(z)_y, one sample at a time."""
    return torch.stack([-(z[i, y[i]] - torch.log(torch.exp(z[i]).sum())) for i in range(len(y))])


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, C, generator=g, dtype=torch.float64), torch.randint(0, C, (8,), generator=g)


def test_ce_is_per_sample_cross_entropy():
    z, y = loss_inputs()
    got = sm.LongTailLoss("CE", COUNTS).double()(z, y)
    assert got.shape == (8,) and torch.allclose(got, manual_ce(z, y), atol=1e-12)


def test_la_adds_tau_log_prior_and_va_is_its_alias():
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z + 0.75 * torch.log(n / n.sum()), y)
    for name in ("LA", "VA"):
        assert torch.allclose(sm.LongTailLoss(name, COUNTS).double()(z, y), want, atol=1e-12)


def test_vs_scales_then_shifts_and_reduces_to_ce():
    z, y = loss_inputs()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = manual_ce(z * (n / n.max()) ** 0.05 + 0.75 * torch.log(n / n.sum()), y)
    assert torch.allclose(sm.LongTailLoss("VS", COUNTS).double()(z, y), want, atol=1e-12)
    plain = sm.LongTailLoss("VS", COUNTS, tau=0.0, vs_gamma=0.0).double()(z, y)
    assert torch.allclose(plain, manual_ce(z, y), atol=1e-12)


def test_ldam_margins_and_closed_form():
    z, y = loss_inputs()
    z = torch.tanh(z)  # cosine logits lie in [-1, 1]
    crit = sm.LongTailLoss("LDAM", COUNTS).double()
    m = [n ** -0.25 for n in COUNTS]
    margins = [0.5 * v / max(m) for v in m]
    assert torch.allclose(crit.margin.double(), torch.tensor(margins, dtype=torch.float64), atol=1e-7)
    assert abs(max(margins) - 0.5) < 1e-12 and margins.index(0.5) == C - 1  # the rarest class
    want = []
    for i in range(len(y)):
        t = 30 * (z[i, y[i]] - crit.margin[y[i]].double())
        others = [30 * z[i, j] for j in range(C) if j != y[i]]
        want.append(-(t - torch.log(torch.exp(t) + sum(torch.exp(o) for o in others))))
    assert torch.allclose(crit(z, y), torch.stack(want), atol=1e-9)
    plain = sm.LongTailLoss("LDAM", COUNTS, max_m=0.0, s=1.0).double()(z, y)
    assert torch.allclose(plain, manual_ce(z, y), atol=1e-12)


def test_drw_weights_are_class_balanced_and_sum_to_c():
    crit = sm.LongTailLoss("CE", COUNTS)
    crit.set_drw(True)
    raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS]
    want = torch.tensor([w * C / sum(raw) for w in raw])
    assert torch.allclose(crit.weight, want, rtol=1e-5)
    z, y = loss_inputs()
    assert torch.allclose(crit(z.float(), y), manual_ce(z, y).float() * want[y], rtol=1e-5)
    crit.set_drw(False)
    assert torch.equal(crit.weight, torch.ones(C))


# ---------------------------------------------------------------------------------------------
# perturbation: ||eps|| = rho, eps = rho g / ||g|| as a plain loop would compute it, exact restore
# ---------------------------------------------------------------------------------------------

def backward_head_tail(model, x, y, which):
    tail = torch.isin(y, TAIL_CLASSES)
    mask = tail if which == "tail" else ~tail
    ce_sum(model, x, y, mask, len(y)).backward()


@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam-head", "ssesam-tail"])
def test_climb_moves_w_by_rho_along_the_normalised_gradient(kind):
    model = tiny_model()
    x, y = batch()
    w0 = [p.detach().clone() for p in model.parameters()]
    if kind == "sam":
        opt, rho = sm.SAM(sgd(model), model, rho=0.05), 0.05
        F.cross_entropy(model(x), y).backward()
    elif kind == "imbsam":
        opt, rho = sm.ImbSAM(sgd(model), model, rho=0.07), 0.07
        backward_head_tail(model, x, y, "tail")
    else:
        opt = sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=0.1, gamma=0.7, total_epochs=10)
        rho = 0.05 if kind == "ssesam-head" else 0.1
        backward_head_tail(model, x, y, kind.split("-")[1])
    want = naive_eps([p.grad.clone() for p in model.parameters()], rho)
    if kind == "sam":
        opt.first_step()
    elif kind == "imbsam":
        opt.second_step()
    else:
        opt.compute_and_add_epsilon(n_i=0 if kind == "ssesam-head" else 1)
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert abs(math.sqrt(sum(float((e * e).sum()) for e in eps)) - rho) < 1e-12
    for e, e_want in zip(eps, want):
        assert torch.allclose(e, e_want, atol=1e-15, rtol=1e-10)
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_restore_gives_back_w_bit_for_bit():
    model = tiny_model(torch.float32)
    x, y = batch(dtype=torch.float32)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    F.cross_entropy(model(x), y).backward()
    opt.compute_and_add_epsilon(0)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    opt.compute_grad_sum_and_restore_p()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_zero_gradient_gives_zero_eps_not_nan():
    model = tiny_model()
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w0 = flat(model).clone()
    opt.compute_and_add_epsilon(0)
    assert torch.equal(flat(model), w0)


# ---------------------------------------------------------------------------------------------
# stage switch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,T", [(0.7, 200), (0.7, 10), (0.7, 15), (0.5, 4), (0.33, 7), (0.0, 5),
                                     (0.99, 3)])
def test_head_rho_is_zero_iff_update_rho_was_called_at_least_gamma_T_times(gamma, T):
    model = tiny_model()
    opt = sm.SSESAM(sgd(model), model, head_rho=0.05, tail_rho=0.1, gamma=gamma, total_epochs=T)
    cut = round(gamma * T, 9)  # gamma * T as a decimal: 0.7 * 10 is 7, not 7.000000000000001
    for k in range(T + 2):
        assert opt.head_rho == (0.0 if k >= cut else 0.05), (k, cut)
        assert opt.tail_rho == 0.1 and opt.rho_is == [opt.head_rho, 0.1]
        opt.update_rho()


def test_official_switch_points():
    model = tiny_model()
    # gamma 0.7, T 200: epochs 1-140 perturb the head, 141-200 do not
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=200)
    on = []
    for _ in range(200):
        on.append(opt.head_rho > 0)
        opt.update_rho()
    assert on == [True] * 140 + [False] * 60
    # gamma 0.7, T 10: head rho 0.05 after 1-6 calls, 0 from the 7th on (as checked on the official code)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=10)
    after = []
    for _ in range(10):
        opt.update_rho()
        after.append(opt.head_rho)
    assert after == [0.05] * 6 + [0.0] * 4


def test_bad_ssesam_arguments_raise():
    model = tiny_model()
    for kwargs in ({"gamma": 1.0}, {"gamma": -0.1}, {"head_rho": -1.0}, {"total_epochs": 0}):
        args = {"head_rho": 0.05, "tail_rho": 0.1, **kwargs}
        with pytest.raises(ValueError):
            sm.SSESAM(sgd(model), model, **args)


# ---------------------------------------------------------------------------------------------
# the efficient steps give the same new weights as the definitions (float64)
# ---------------------------------------------------------------------------------------------

def run_seed_snippet(model, x, y, head_rho, tail_rho, gamma, T, epochs_done=0):
    optimizer = sm.SSESAM(sgd(model), model, head_rho, tail_rho, gamma=gamma, total_epochs=T)
    for _ in range(epochs_done):
        optimizer.update_rho()
    scope = {"torch": torch, "optim_mode": "ssesam", "targets": y, "images": x, "model": model,
             "tail_classes": TAIL_CLASSES, "lossFunc": nn.CrossEntropyLoss(reduction="none"),
             "optimizer": optimizer}
    exec(SEED_SNIPPET, scope)
    return scope


def run_step(step, opt, model, x, y, imbsam_weight="group"):
    crit = sm.LongTailLoss("CE", COUNTS).double()
    tail = torch.isin(y, TAIL_CLASSES)
    return step(model, crit, opt, x, y, tail, imbsam_weight)


@pytest.mark.parametrize("epochs_done", [0, 7])  # stage 1 (3F+4B) and stage 2 (2F+3B)
def test_efficient_ssesam_step_equals_the_seed_snippets_4_pass_order(epochs_done):
    ref, fast = tiny_model(), tiny_model()
    ref_opt_args = dict(head_rho=0.05, tail_rho=0.1, gamma=0.7, T=10, epochs_done=epochs_done)
    fast_opt = sm.SSESAM(sgd(fast), fast, 0.05, 0.1, gamma=0.7, total_epochs=10)
    for _ in range(epochs_done):
        fast_opt.update_rho()
    assert fast_opt.head_rho == (0.05 if epochs_done == 0 else 0.0)
    x, y = batch()
    scope = run_seed_snippet(ref, x, y, **ref_opt_args)
    run_step(sm.ssesam_step, fast_opt, fast, x, y)
    assert torch.allclose(flat(fast), flat(ref), rtol=0, atol=1e-10)
    # a second step, through SGD's momentum buffers too
    x2, y2 = batch(seed=2)
    scope.update(images=x2, targets=y2)
    exec(SEED_SNIPPET, scope)
    run_step(sm.ssesam_step, fast_opt, fast, x2, y2)
    assert torch.allclose(flat(fast), flat(ref), rtol=0, atol=1e-10)


def test_ssesam_step_follows_the_update_rule():
    # G = grad L_head(w + eps_head) + grad L_tail(w + eps_tail), eps_g = rho_g grad L_g(w) / ||.||
    model = tiny_model()
    x, y = batch()
    B, tail = len(y), torch.isin(y, TAIL_CLASSES)
    g_h = grads_at(model, lambda m: ce_sum(m, x, y, ~tail, B))
    g_t = grads_at(model, lambda m: ce_sum(m, x, y, tail, B))
    G = [a + b for a, b in zip(grads_at(shifted(model, naive_eps(g_h, 0.05)), lambda m: ce_sum(m, x, y, ~tail, B)),
                               grads_at(shifted(model, naive_eps(g_t, 0.1)), lambda m: ce_sum(m, x, y, tail, B)))]
    lr, wd = 0.1, 1e-3
    want = torch.cat([(p.detach() - lr * (g + wd * p.detach())).reshape(-1)  # first SGD step: buf = g
                      for p, g in zip(model.parameters(), G)])
    run_step(sm.ssesam_step, sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.7, total_epochs=10), model, x, y)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


def test_imbsam_step_follows_its_rule_for_both_weightings():
    # G = grad L_head(w) + grad L_tail(w + eps_tail)
    for weight in ("group", "batch"):
        model = tiny_model()
        x, y = batch()
        tail = torch.isin(y, TAIL_CLASSES)
        n_h, n_t = (int((~tail).sum()), int(tail.sum())) if weight == "group" else (len(y), len(y))
        g_h = grads_at(model, lambda m: ce_sum(m, x, y, ~tail, n_h))
        g_t = grads_at(model, lambda m: ce_sum(m, x, y, tail, n_t))
        g_tp = grads_at(shifted(model, naive_eps(g_t, 0.05)), lambda m: ce_sum(m, x, y, tail, n_t))
        want = torch.cat([(p.detach() - 0.1 * (a + b + 1e-3 * p.detach())).reshape(-1)
                          for p, a, b in zip(model.parameters(), g_h, g_tp)])
        run_step(sm.imbsam_step, sm.ImbSAM(sgd(model), model, rho=0.05), model, x, y, weight)
        assert torch.allclose(flat(model), want, rtol=0, atol=1e-10), weight


def test_imbsam_batch_weighting_equals_ssesam_with_gamma_0():
    a, b = tiny_model(), tiny_model()
    opt_a = sm.ImbSAM(sgd(a), a, rho=0.1)
    opt_b = sm.SSESAM(sgd(b), b, head_rho=0.05, tail_rho=0.1, gamma=0.0, total_epochs=10)
    assert opt_b.head_rho == 0.0  # gamma = 0: no head perturbation from the very first step
    for seed in (1, 2):
        x, y = batch(seed)
        run_step(sm.imbsam_step, opt_a, a, x, y, "batch")
        run_step(sm.ssesam_step, opt_b, b, x, y)
    assert torch.allclose(flat(a), flat(b), rtol=0, atol=1e-12)


def test_sam_step_follows_its_rule():
    model = tiny_model()
    x, y = batch()
    g = grads_at(model, lambda m: F.cross_entropy(m(x), y))
    g_p = grads_at(shifted(model, naive_eps(g, 0.05)), lambda m: F.cross_entropy(m(x), y))
    want = torch.cat([(p.detach() - 0.1 * (a + 1e-3 * p.detach())).reshape(-1)
                      for p, a in zip(model.parameters(), g_p)])
    run_step(sm.sam_step, sm.SAM(sgd(model), model, rho=0.05), model, x, y)
    assert torch.allclose(flat(model), want, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# passes per step, BN statistics, empty groups
# ---------------------------------------------------------------------------------------------

def make_opt(name, model, epochs_done=0):
    if name == "sgd":
        return sgd(model)
    if name == "sam":
        return sm.SAM(sgd(model), model, 0.05)
    if name == "imbsam":
        return sm.ImbSAM(sgd(model), model, 0.05)
    opt = sm.SSESAM(sgd(model), model, 0.05, 0.1, gamma=0.5, total_epochs=2)
    for _ in range(epochs_done):
        opt.update_rho()
    return opt


@pytest.mark.parametrize("name,epochs_done,passes", [
    ("sgd", 0, (1, 1)), ("sam", 0, (2, 2)), ("imbsam", 0, (2, 3)),
    ("ssesam", 0, (3, 4)), ("ssesam", 1, (2, 3))])
def test_forward_and_backward_passes_per_step(name, epochs_done, passes):
    model = tiny_model(torch.float32)
    opt = make_opt(name, model, epochs_done)
    count = {"F": 0, "B": 0}
    model.register_forward_hook(lambda *a: count.__setitem__("F", count["F"] + 1))
    model.conv1.weight.register_hook(lambda g: count.__setitem__("B", count["B"] + 1))  # once per backward
    x, y = batch(dtype=torch.float32)
    sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), opt, x, y, torch.isin(y, TAIL_CLASSES))
    assert (count["F"], count["B"]) == passes


@pytest.mark.parametrize("name", ["sam", "imbsam", "ssesam"])
def test_bn_running_stats_come_from_the_unperturbed_forward_only(name):
    model = tiny_model(torch.float32)
    twin = copy.deepcopy(model)
    x, y = batch(dtype=torch.float32)
    twin.train()
    twin(x)  # one forward at w: what the running statistics should hold after the step
    sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), make_opt(name, model), x, y,
                   torch.isin(y, TAIL_CLASSES))
    bufs = dict(model.named_buffers())
    for k, v in twin.named_buffers():
        assert torch.equal(bufs[k], v), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", ["sgd", "sam", "imbsam", "ssesam"])
@pytest.mark.parametrize("group", ["head", "tail"])
def test_a_batch_with_an_empty_group_gives_no_nan(name, group):
    model = tiny_model(torch.float32)
    labels = [0, 1, 2, 3] * 4 if group == "head" else [6, 7, 8, 9] * 4
    x, y = batch(dtype=torch.float32, labels=labels)
    opt = make_opt(name, model)
    _, loss_i = sm.STEPS[name](model, sm.LongTailLoss("CE", COUNTS), opt, x, y,
                               torch.isin(y, TAIL_CLASSES))
    assert torch.isfinite(loss_i).all() and torch.isfinite(flat(model)).all()
    h, t = sm.split_losses(loss_i, torch.isin(y, TAIL_CLASSES), "group")
    assert torch.isfinite(h) and torch.isfinite(t)


def test_split_losses_weightings():
    loss_i = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    tail = torch.tensor([False, True, False, True, True])
    h, t = sm.split_losses(loss_i, tail, "batch")
    assert h.item() == (1 + 3) / 5 and t.item() == (2 + 4 + 5) / 5
    h, t = sm.split_losses(loss_i, tail, "group")
    assert h.item() == (1 + 3) / 2 and t.item() == (2 + 4 + 5) / 3


# ---------------------------------------------------------------------------------------------
# schedule and evaluation
# ---------------------------------------------------------------------------------------------

def test_cosine_lr_is_stepped_before_each_epoch_as_officially():
    cfg = sm.Config()
    assert abs(sm.lr_at(0, cfg) - 0.005 * (1 + math.cos(math.pi / 200))) < 1e-15
    assert abs(sm.lr_at(0, cfg) - 0.0099994) < 1e-7
    assert abs(sm.lr_at(139, cfg) - 0.002061) < 1e-6
    assert abs(sm.lr_at(199, cfg)) < 1e-15  # the last epoch trains at lr 0


def test_many_medium_few_for_cifar100_if100():
    counts = sm.lt_class_counts(500, 100, 100)
    g = sm.shot_groups(counts, 500)
    assert [int(g[k].sum()) for k in ("many", "med", "few")] == [35, 35, 30]
    assert all((n > 100) == bool(g["many"][c]) and (n < 20) == bool(g["few"][c]) for c, n in enumerate(counts))


class PredictById(nn.Module):
    """Reads an image id from pixel (0, 0) (also written at (0, 31), so mirroring keeps it) and
    predicts preds[id]."""

    def __init__(self, preds, C):
        super().__init__()
        self.preds, self.C = torch.tensor(preds), C

    def forward(self, inp):
        ids = ((inp[:, 0, 0, 0] * sm.STD[0] + sm.MEAN[0]) * 255).round().long()
        return F.one_hot(self.preds[ids], self.C).float()


def test_evaluate_reports_mean_per_class_accuracy_and_groups():
    counts = [300, 100, 50, 10]  # n_max 300: many (> 60) = classes 0, 1; med = 2; few (< 12) = 3
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    preds = [0, 1, 1, 1, 2, 0, 3, 0, 0, 3]
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = x[:, 0, 0, 31] = torch.arange(len(y), dtype=torch.uint8)
    per_class = [100 * sum(p == c for p, t in zip(preds, y.tolist()) if t == c) / int((y == c).sum())
                 for c in range(4)]  # 50, 100, 50, 50
    r = sm.evaluate(PredictById(preds, 4), x, y, counts, 300, batch_size=3)
    for suffix in ("", "_tta"):  # the id survives mirroring, so flip-TTA changes nothing here
        assert abs(r["avg" + suffix] - sum(per_class) / 4) < 1e-9
        assert abs(r["many" + suffix] - (per_class[0] + per_class[1]) / 2) < 1e-9
        assert abs(r["med" + suffix] - per_class[2]) < 1e-9
        assert abs(r["few" + suffix] - per_class[3]) < 1e-9


def test_flip_tta_averages_the_logits_of_image_and_mirror():
    # class 0 when the left half is brighter (logit 1), class 1 otherwise (logit 2): averaging an
    # image with its mirror always lands on class 1
    class LeftRight(nn.Module):
        def forward(self, inp):
            left = inp[:, 0, :, :16].mean((1, 2)) > inp[:, 0, :, 16:].mean((1, 2))
            return torch.stack([left.float(), 2 * (~left).float()], 1)

    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    x[:2, :, :, :16] = 255  # images 0, 1: bright left, label 0
    x[2, :, :, 16:] = 255   # image 2: bright right, label 1
    y = torch.tensor([0, 0, 1])
    r = sm.evaluate(LeftRight(), x, y, [10, 10], 10)
    assert r["avg"] == 100.0      # plain: all three right
    assert r["avg_tta"] == 50.0   # TTA: class 0 images become class 1 (0 %), class 1 stays (100 %)
