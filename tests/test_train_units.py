"""Unit tests of the training core: the subset registry, weight views, trajectories, the loss, concept schedules and
flags (whole runs: test_train.py, test_train_runs.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import train_esd
import train_sdd
from utils.train.concepts import concept_schedule
from utils.families import FAMILIES, FINETUNING_METHODS, Cond
from utils.train.trajectory import TrajectoryQueue, partial_trajectory, trajectory_points
from utils.families.tiny import tiny_unet
from utils.train.loop import Batch, Setup, output_mse
from utils.train.views import ema_update, snapshot

SD = FAMILIES["sd"]


def test_registry_picks_the_documented_layers():
    unet = tiny_unet()
    names = [n for n, _ in unet.named_parameters()]
    sub = {m: set(SD.subset(unet, m)) for m in FINETUNING_METHODS}
    assert sub["xattn"] == {n for n in names if ".attn2." in n}
    assert sub["xattn-strict"] == {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert sub["selfattn"] == {n for n in names if ".attn1." in n}
    assert sub["full"] == set(names)
    assert sub["notime"] == {n for n in names if not n.startswith(("time_embedding", "conv_out"))}
    assert sub["noxattn"] == sub["notime"] - sub["xattn"]
    SD.subset(unet, "xattn")
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == sub["xattn"]


def test_ema_math_touches_only_the_subset():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    subset = {"1.weight": module[1].weight}
    frozen_before = module[0].weight.detach().clone()
    teacher = snapshot(subset)
    t0 = teacher["1.weight"].clone()
    with torch.no_grad():
        module[1].weight.add_(1.0)
    ema_update(teacher, subset, 0.9)
    assert torch.allclose(teacher["1.weight"], 0.9 * t0 + 0.1 * module[1].weight)
    assert torch.equal(module[0].weight, frozen_before)
    assert teacher.keys() == subset.keys() and teacher["1.weight"].data_ptr() != module[1].weight.data_ptr()


def test_teacher_view_equals_a_full_copy_without_holding_one(tiny_pipeline):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    args = train_sdd.parse_args(["--removing_concepts", "x", "--ema_decay", "0.5"])
    subset = SD.subset(unet, "xattn")
    sdd = train_sdd.SDD(Setup(SD, unet, subset, args, ["x"]))
    with torch.no_grad():
        for p in subset.values():
            p.add_(0.1)
    sdd.after_step()
    # the teacher holds only the trained tensors ...
    held = sum(t.numel() for t in sdd.teacher.values())
    assert held == sum(p.numel() for p in subset.values()) < 0.2 * sum(p.numel() for p in unet.parameters())
    # ... and running the shared module with them equals a deep copy loaded with the EMA weights
    ref = copy.deepcopy(unet)
    ref.load_state_dict({**unet.state_dict(), **sdd.teacher})
    z, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        a = SD.predict(unet, sdd.teacher, z, torch.tensor(500), Cond(emb))
        b = ref(z, torch.tensor(500), encoder_hidden_states=emb).sample
        c = unet(z, torch.tensor(500), encoder_hidden_states=emb).sample
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_partial_sampling_timestep_and_number_of_steps(k):
    n = 6
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(n)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    z_T = torch.randn(2, 4, 8, 8)
    z, t = partial_trajectory(SD, unet, None, sched, z_T, Cond(torch.randn(1, 16, 32)), Cond(torch.randn(1, 16, 32)), 3.0, k)
    assert int(t) == int(sched.timesteps[k]) and len(calls) == k  # k = 0: pure noise, no step (no off-by-one)
    assert torch.equal(z, z_T) == (k == 0) and z.shape == z_T.shape
    with pytest.raises(ValueError):
        partial_trajectory(SD, unet, None, sched, z_T, Cond(torch.randn(1, 16, 32)), Cond(torch.randn(1, 16, 32)), 3.0, n)


def test_trajectory_points_equal_separate_partial_trajectories():
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(5)
    z_T, c, u = torch.randn(2, 4, 8, 8), Cond(torch.randn(1, 16, 32)), Cond(torch.randn(1, 16, 32))
    zs, ts = trajectory_points(SD, unet, None, sched, z_T, c, u, 3.0, [0, 2, 4])
    assert zs.shape == (6, 4, 8, 8) and ts.tolist() == [int(sched.timesteps[k]) for k in (0, 0, 2, 2, 4, 4)]
    for i, k in enumerate([0, 2, 4]):
        z, t = partial_trajectory(SD, unet, None, sched, z_T, c, u, 3.0, k)
        assert torch.allclose(zs[2 * i:2 * i + 2], z, atol=1e-6) and int(t) == int(ts[2 * i])


def test_trajectory_queue_serves_r_micro_steps_from_one_trajectory():
    torch.manual_seed(0)
    unet, sched = tiny_unet().eval(), DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    embeds, u = {"x": Cond(torch.randn(1, 16, 32))}, Cond(torch.randn(1, 16, 32))
    queue, gen = TrajectoryQueue(8, samples=2, reuse=3), torch.Generator().manual_seed(0)
    items = [queue.next(SD, unet, None, sched, (2, 4, 16, 16), torch.device("cpu"), embeds, "x", u, 3.0, gen)
             for _ in range(3)]
    ks = [int(sched.timesteps.tolist().index(int(t))) for it in items for t in it["t"][::2]]
    assert len(set(ks)) == 6 and len(calls) == max(ks)  # 6 distinct k, one pass of the teacher to the largest
    assert all(it["k"] == max(ks[2 * i:2 * i + 2]) and it["z"].shape == (4, 4, 16, 16) for i, it in enumerate(items))
    gen = torch.Generator().manual_seed(0)  # replay the queue's draws: the k permutation, then z_T
    torch.randperm(8, generator=gen)
    z_T = torch.randn((2, 4, 16, 16), generator=gen)
    z, _ = partial_trajectory(SD, unet, None, sched, z_T, embeds["x"], u, 3.0, ks[3])
    assert torch.allclose(items[1]["z"][2:], z, atol=1e-6)  # the same points a fresh trajectory would give
    queue.next(SD, unet, None, sched, (2, 4, 16, 16), torch.device("cpu"), embeds, "x", u, 3.0, gen)
    assert len(calls) > max(ks)  # the queue ran dry: a new trajectory
    with pytest.raises(ValueError, match="samples \\* reuse"):
        TrajectoryQueue(8, samples=3, reuse=3)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_loss_space_epsilon_is_the_squared_error_of_noise_estimates(kind):
    """Two outputs at the same z_t, converted to eps by hand: the weighted output MSE equals their eps MSE."""
    sched = DDIMScheduler(prediction_type=kind, rescale_betas_zero_snr=kind == "v_prediction")
    torch.manual_seed(0)
    z, out1, out2 = torch.randn(3, 2, 4, 8, 8).unbind(0)
    t = torch.tensor([10, 700])
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    to_eps = {"epsilon": lambda o: o, "v_prediction": lambda o: a.sqrt() * o + (1 - a).sqrt() * z,
              "sample": lambda o: (z - a.sqrt() * o) / (1 - a).sqrt()}[kind]
    table = SD.epsilon_weights(sched)  # one weight per timestep, indexed by t as the trainer does
    weight = None if table is None else table[t].reshape(-1, 1, 1, 1)
    assert (weight is None) == (kind == "epsilon")
    batch = Batch(z, t, 0, None, None, None, "c", weight)
    want = torch.mean((to_eps(out1) - to_eps(out2)) ** 2)
    assert output_mse(out1, out2, batch).item() == pytest.approx(want.item(), rel=1e-5)
    if kind == "v_prediction":  # zero terminal SNR: at t = T every prompt's eps is z_T, nothing to learn
        assert table[999].item() == 0.0


def test_concept_schedules():
    c = ["a", "b", "c"]
    assert concept_schedule(c, "iterative", 7, 0) == ["a", "b", "c", "a", "b", "c", "a"]
    assert concept_schedule(c, "composite", 2, 0) == ["a, b, c"] * 2
    assert concept_schedule(c, "sequential", 6, 0) == ["a", "a", "b", "b", "c", "c"]
    assert concept_schedule(c, "sequential", 7, 0) == ["a", "a", "a", "b", "b", "c", "c"]
    assert concept_schedule(c, "sequential", 6, 0, [1, 3, 2]) == ["a", "b", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match="sequential"):
        concept_schedule(c, "iterative", 6, 0, [1, 3, 2])
    r = concept_schedule(c, "random", 60, 1)
    assert r == concept_schedule(c, "random", 60, 1) and set(r) == set(c) and r != concept_schedule(c, "random", 60, 2)


def test_esd_gives_each_concept_its_own_eta():
    """At the start the student is the original, so e_s = e_c and the loss is (1 + eta)^2 mean((e_c - e_0)^2):
    with etas 2 and 0.5 the two concepts' losses on the same z_t differ by (3 / 1.5)^2 = 4."""
    torch.manual_seed(0)
    unet = tiny_unet()
    args = train_esd.parse_args(["--removing_concepts", "a", "b", "--negative_guidance", "2", "0.5"])
    esd = train_esd.ESD(Setup(SD, unet, SD.subset(unet, "xattn"), args, ["a", "b"]))
    z, t, c_0, c = torch.randn(2, 4, 8, 8), torch.tensor(500), Cond(torch.randn(1, 5, 32)), Cond(torch.randn(1, 5, 32))
    with torch.no_grad():
        loss = {k: esd.loss(unet, Batch(z, t, 0, c_0, c, c, k)).item() for k in ("a", "b", "joined")}
    assert loss["a"] == pytest.approx(4 * loss["b"], rel=1e-4)
    assert loss["joined"] == pytest.approx(loss["a"], rel=1e-6)  # a prompt that is no one concept: the first eta
    single = train_esd.ESD(Setup(SD, unet, SD.subset(unet, "xattn"),
                                 train_esd.parse_args(["--removing_concepts", "a", "b", "--negative_guidance", "0.5"]),
                                 ["a", "b"]))
    with torch.no_grad():
        assert single.loss(unet, Batch(z, t, 0, c_0, c, c, "a")).item() == pytest.approx(loss["b"], rel=1e-6)


def test_sampling_prompt_and_removal_target_choices(capsys):
    from utils.train.concepts import step_prompts
    c = ["nudity", "red circle"]
    assert step_prompts("nudity", c) == ("nudity", "nudity, red circle")            # paper: sample c_p, remove c_s
    assert step_prompts("nudity", c, "all", "current") == ("nudity, red circle", "nudity")  # reference code
    args = train_sdd.parse_args(["--removing_concepts", "x"])
    assert (args.sampling_concept, args.removal_target) == ("current", "all")
    with pytest.raises(SystemExit):
        train_sdd.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag, paper, reference in (("--sampling_concept", "current", "all"), ("--removal_target", "all", "current")):
        helptext = " ".join(text.split(f"\n  {flag} {{")[1].split("\n  --")[0].split())
        assert f"'{paper}' = " in helptext.split("(paper, Alg. 1)")[0] and "(reference code)" in helptext
        assert f"'{reference}' = " in helptext.split("(paper, Alg. 1)")[1]
        assert f"(default: {paper})" in helptext


def test_timestep_jitter_draws_from_t_to_t_plus_stride_inside_the_schedule():
    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    sched.set_timesteps(10)  # stride 100; timesteps 901, 801, ..., 1
    t = sched.timesteps.repeat_interleave(2000)
    jt = SD.jitter(t, sched, torch.Generator().manual_seed(0))
    off = jt - t
    assert off.min() == 0 and (jt < 1000).all()
    for ts in sched.timesteps.tolist():
        o = off[t == ts]
        top = min(100, 1000 - ts)  # the top bucket [901, 1000) is cut at T - 1
        assert int(o.min()) == 0 and int(o.max()) == top - 1
        assert abs(float(o.float().mean()) - (top - 1) / 2) < 0.1 * top  # uniform, not piled on an end


def test_step_in_backward_updates_each_tensor_once_and_holds_no_gradient():
    from utils.train.optim import step_in_backward
    torch.manual_seed(0)
    a, x = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(3, 4)
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    step_in_backward(opt_b, b.parameters())
    for _ in range(2):
        a(x).square().sum().backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        b(x).square().sum().backward()
        assert all(p.grad is None for p in b.parameters())
    assert all(torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(s["step"] == 2 for s in opt_b.state.values())
