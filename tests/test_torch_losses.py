"""Torch losses against the numpy reference (SPEC 4, 7): log-linear policy and small GPT-2."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import simulator as sim  # noqa: E402
import simulator.torch_backend as tb  # noqa: E402
from simulator.optim import batches  # noqa: E402

BETA = 0.7


@pytest.fixture(scope="module")
def world():
    env = sim.FiniteEnv.random(6, 4, 3, beta=BETA, seed=1)
    data = env.sample(40, seed=2)
    rng = np.random.default_rng(0)
    theta, ref = rng.normal(size=3), 0.3 * rng.normal(size=3)
    return env, data, theta, ref


def _policy(world, theta=None):
    env, _, th, ref = world
    return tb.TorchLogLinearPolicy(env.features, th if theta is None else theta, ref)


AGG_CASES = [("dpo", {}), ("kldpo-tau", {"tau": 0.5}), ("kldpo-clip", {"tau": 0.3}),
             ("kldpo-clip", {"tau": 0.05, "clip": 2.0}), ("kl-var", {"rho": 0.1}),
             ("chi2-var", {"rho": 0.2}), ("drdpo", {"beta_prime": 0.4})]


@pytest.mark.parametrize(("name", "prm"), AGG_CASES)
def test_aggregations_match_numpy_surrogates(world, name, prm):
    _, data, theta, ref = world
    value, grad = sim.surrogate_value_and_grad(name, theta, data, BETA, ref, **prm)
    pol = _policy(world)
    agg = tb.aggregate(pol.pair_losses(tb.PairBatch.from_data(data), BETA), name, **prm)
    agg.loss.backward()
    assert agg.value.item() == pytest.approx(value, abs=1e-12)
    assert agg.loss.item() == pytest.approx(value, abs=1e-12)
    np.testing.assert_allclose(pol.theta.grad.numpy(), grad, atol=1e-12)
    if name != "kldpo-clip":
        np.testing.assert_allclose(agg.weights.sum().item(), 1.0, atol=1e-12)


def test_dpo_losses_match_numpy_margins(world):
    _, data, theta, ref = world
    m = sim.margins(theta, data.x, data.y, BETA, ref)
    pol = _policy(world)
    l = pol.pair_losses(tb.PairBatch.from_data(data), BETA)
    np.testing.assert_allclose(l.detach().numpy(), sim.dpo_loss(m), atol=1e-13)


WDPO_MODES = [("double-backward", "forward", 1e-12), ("finite-difference", "forward", 1e-3),
              ("finite-difference", "central", 1e-8)]


@pytest.mark.parametrize(("mode", "scheme", "tol"), WDPO_MODES)
@pytest.mark.parametrize("form", ["squared", "gr"])
def test_wasserstein_matches_closed_form(world, mode, scheme, tol, form):
    # pair view: ||grad_e l||^2 = 2 b^2 s^2, so squared == wdpo-sq(view='pair') and
    # gr(rho) == wdpo-gr(p=2, sqrt(2) rho) of simulator.surrogates (SPEC 3.3, 4).
    _, data, theta, ref = world
    rho = 0.3
    name, prm = ("wdpo-sq", {"rho": rho}) if form == "squared" else \
        ("wdpo-gr", {"rho": np.sqrt(2) * rho})
    value, grad = sim.surrogate_value_and_grad(name, theta, data, BETA, ref, **prm)
    pol, pb = _policy(world), tb.PairBatch.from_data(data)
    res = tb.wasserstein_loss(lambda: pol.embeddings(pb),
                              lambda c, r: pol.pair_losses(pb, BETA, c, r), rho, form=form,
                              mode=mode, params=pol.parameters(), fd_scheme=scheme)
    res.loss.backward()
    assert res.value.item() == pytest.approx(value, abs=1e-12)
    m = sim.margins(theta, data.x, data.y, BETA, ref)
    b = BETA * np.linalg.norm(theta - ref)
    np.testing.assert_allclose(res.grad_sq.numpy(), 2 * b**2 * sim.sigmoid(-m) ** 2, rtol=1e-12)
    err = np.linalg.norm(pol.theta.grad.numpy() - grad) / np.linalg.norm(grad)
    assert err < tol


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(conf).double()
    for p in model.parameters():  # leave the near-uniform initialisation: sizeable gradients
        p.data.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("form", ["squared", "gr"])
def test_finite_difference_matches_double_backward_on_gpt2(form):
    from simulator.torch_backend.pairs import TokenizedPairs
    from simulator.torch_backend.trainer import sequence_logps

    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    recs = [{"prompt": torch.randint(0, 16, (3,), generator=g).tolist(),
             "chosen": torch.randint(0, 16, (4 + i % 3,), generator=g).tolist(),
             "rejected": torch.randint(0, 16, (5,), generator=g).tolist()} for i in range(6)]
    b = TokenizedPairs(recs).collate(range(6))
    ref = torch.randn(2, 6, generator=g, dtype=torch.float64)

    def embed_fn():
        e = model.get_input_embeddings()(b.input_ids)
        return e[:6], e[6:]

    def loss_fn(ec, er):
        lp = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask,
                            torch.cat([ec, er]))
        return tb.dpo_losses(lp[:6], lp[6:], ref[0], ref[1], 0.5)

    def grad(mode, rho):
        model.zero_grad()
        res = tb.wasserstein_loss(embed_fn, loss_fn, rho, form=form, mode=mode,
                                  params=model.parameters())
        res.loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), res.value.item()

    g_dpo, _ = grad("double-backward", 0.0)
    g_db, v_db = grad("double-backward", 0.2)
    g_fd, v_fd = grad("finite-difference", 0.2)
    assert v_db == pytest.approx(v_fd, rel=1e-12)
    # compare the penalty's gradient itself, not only the total (which the DPO part dominates)
    pen_db, pen_fd = g_db - g_dpo, g_fd - g_dpo
    assert pen_db.norm() > 0.1 * g_dpo.norm()
    assert ((pen_fd - pen_db).norm() / pen_db.norm()).item() < 1e-3


@pytest.mark.parametrize(("name", "prm"), [("kldpo-tau", {"tau": 0.5}), ("dpo", {})])
def test_training_trajectory_matches_numpy(world, name, prm):
    _, data, _, ref = world
    kw = dict(optimizer="adam", lr=0.05, batch_size=8, max_steps=25, seed=3, tol=0.0)
    res = sim.train(data, name, BETA, ref, **kw, **prm)
    pol = _policy(world, theta=ref)
    opt = torch.optim.Adam(pol.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    stream = batches(data.weights, 8, 3)
    for _ in range(25):
        idx, _w = next(stream)
        opt.zero_grad()
        tb.aggregate(pol.pair_losses(tb.PairBatch.from_data(data, idx), BETA), name,
                     **prm).loss.backward()
        opt.step()
    np.testing.assert_allclose(pol.theta.detach().numpy(), res.theta, atol=1e-10)
    assert np.linalg.norm(res.theta - ref) > 0.1  # it moved


def _logps(n=4, **over):
    t = {k: torch.zeros(n, dtype=torch.float64) for k in
         ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
          "reference_rejected_logps")}
    t.update(over)
    return t


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        tb.dpo_losses(**_logps(policy_rejected_logps=torch.zeros(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="policy_chosen_logps must be finite"):
        tb.dpo_losses(**_logps(policy_chosen_logps=torch.tensor([0.0, float("nan"), 0, 0])))
    with pytest.raises(ValueError, match="beta"):
        tb.dpo_losses(**_logps(), beta=-1.0)
    l = torch.ones(4)
    with pytest.raises(ValueError, match="tau"):
        tb.aggregate(l, "kldpo-tau")
    with pytest.raises(ValueError, match="method"):
        tb.aggregate(l, "wdpo7")
    with pytest.raises(ValueError, match="rho"):
        tb.aggregate(l, "chi2-var", rho=-1)
    e = torch.ones(4, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="cannot be reached"):
        tb.wasserstein_loss(lambda: (e, torch.ones(4, 3)), lambda a, b: a @ w, 0.1,
                            params=[w])
    with pytest.raises(ValueError, match="mode"):
        tb.wasserstein_loss(lambda: (e,), lambda a: a @ w, 0.1, mode="exact")
    with pytest.raises(ValueError, match="leading dimension"):
        tb.wasserstein_loss(lambda: (e,), lambda a: (a @ w)[:2], 0.1, params=[w])


def _gpt2_pairs():
    from simulator.torch_backend.pairs import TokenizedPairs

    g = torch.Generator().manual_seed(1)
    recs = [{"prompt": torch.randint(0, 16, (3,), generator=g).tolist(),
             "chosen": torch.randint(0, 16, (4 + i % 3,), generator=g).tolist(),
             "rejected": torch.randint(0, 16, (5,), generator=g).tolist()} for i in range(6)]
    return TokenizedPairs(recs).collate(range(6)), torch.randn(2, 6, generator=g,
                                                              dtype=torch.float64)


def test_float32_step_follows_the_log_probabilities_and_central_default_is_accurate():
    # A float32 computation (TRL's fused head rounds at float32 even under a float64 model):
    # the default step is float32's, chosen by the coarser of the embeddings' and the losses'
    # dtypes. Central differences at that step: penalty-gradient error 1.45e-4 against float64
    # double backward (float64's step 1e-4 gives 1.5e-3 here).
    from simulator.torch_backend.trainer import sequence_logps

    b, ref = _gpt2_pairs()

    def penalty_grad(model, mode, dtype, fd_eps=None, emb_dtype=None):
        def embed_fn():
            e = model.get_input_embeddings()(b.input_ids)
            e = e if emb_dtype is None else e.to(emb_dtype)
            return e[:6], e[6:]

        def loss_fn(ec, er):
            lp = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask,
                                torch.cat([ec, er]).to(dtype))
            return tb.dpo_losses(lp[:6], lp[6:], ref[0].to(dtype), ref[1].to(dtype), 0.5)

        out = []
        for rho in (0.0, 0.2):
            model.zero_grad()
            res = tb.wasserstein_loss(embed_fn, loss_fn, rho, mode=mode, fd_scheme="central",
                                      fd_eps=fd_eps, params=model.parameters())
            res.loss.backward()
            out.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
        return out[1] - out[0], res.eps

    exact, _ = penalty_grad(_tiny_gpt2(), "double-backward", torch.float64)
    m32 = _tiny_gpt2().float()
    got, eps = penalty_grad(m32, "finite-difference", torch.float32)
    assert ((got - exact).norm() / exact.norm()).item() < 2e-4
    # float64 embeddings, float32 losses: the step is float32's, not float64's
    _, eps_mixed = penalty_grad(m32, "finite-difference", torch.float32,
                                emb_dtype=torch.float64)
    _, eps_f32 = penalty_grad(m32, "finite-difference", torch.float32,
                              fd_eps=tb.default_fd_eps(torch.float32, "central"),
                              emb_dtype=torch.float64)
    assert tb.default_fd_eps(torch.float32, "central") != tb.default_fd_eps(torch.float64,
                                                                             "central")
    assert eps_mixed == pytest.approx(eps_f32, rel=1e-12)


@pytest.mark.parametrize("name", ["kl-var", "chi2-var"])
def test_variance_weights_ignore_round_off_spread(name):
    # At the first step (policy = reference) every loss is log 2 up to forward-pass round-off;
    # sqrt(Var) has no gradient there and dev / sd is noise: the weights must be DPO's, not
    # O(1) garbage that changes with the thread count (it moved a trained model by 0.03).
    noise = torch.tensor([1.0, -2.0, 0.5, 0.5]) * 1e-16
    l = torch.full((4,), np.log(2.0), dtype=torch.float64) + noise
    agg = tb.aggregate(l, name, rho=0.3)
    torch.testing.assert_close(agg.weights, torch.full((4,), 0.25, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # a real spread keeps its robust weights
    agg = tb.aggregate(l + torch.tensor([0.0, 1e-6, 0.0, 0.0], dtype=torch.float64), name,
                       rho=0.3)
    assert float(agg.weights.max()) > 0.3


@pytest.mark.parametrize(("kw", "name"), [({"tau": None}, "tau"), ({"tau": "x"}, "tau"),
                                          ({"tau": 1.0, "clip": -1.0}, "clip")])
def test_aggregation_parameters_are_named_errors(kw, name):
    """The torch backend shares simulator._validation: None or text is a ValueError naming
    the argument (not a TypeError from float())."""
    method = "kldpo-clip" if "clip" in kw else "kldpo-tau"
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number > 0, got"):
        tb.aggregate(torch.ones(4, dtype=torch.float64), method, **kw)
