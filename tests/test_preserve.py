"""SDD's --uncond_from (which weights compute the target e(z_t, c_0)) and the preservation term both trainers share
(--preserve_prompts, --preserve_weight, --preserve_batch; utils/train/preserve.py): what each changes, and that a
resumed run refuses a change of either."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import train_esd
import train_sdd
from train_util import esd_args, sd_args
from utils.cli import UserError
from utils.families import FAMILIES, Cond
from utils.train.loop import Batch, Setup, output_mse
from utils.train.preserve import Preservation

SD = FAMILIES["sd"]
PRESERVE = ["a green square", "a cat", "dog"]
pytestmark = pytest.mark.usefixtures("one_thread")


def sdd_with(unet, subset, uncond_from, decay="1"):
    """An SDD over the shared U-Net, as the trainer builds it, with its own Setup."""
    args = train_sdd.parse_args(["--removing_concepts", "x", "--ema_decay", decay, "--uncond_from", uncond_from])
    setup = Setup(SD, unet, subset, args, ["x"])
    return train_sdd.SDD(setup), setup


def a_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    z, c_0, c_s = (torch.randn(*shape, generator=g) for shape in ((2, 4, 8, 8), (1, 16, 32), (1, 16, 32)))
    return Batch(z, torch.tensor(500), 3, Cond(c_0), Cond(c_s), Cond(c_s), "x")


def test_uncond_from_changes_only_the_weights_of_the_target(tiny_pipeline):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    subset = SD.subset(unet, "xattn")
    b = a_batch()
    methods = {m: sdd_with(unet, subset, m) for m in ("student", "teacher", "original")}
    assert methods["student"][0].uncond is None and methods["teacher"][0].uncond is methods["teacher"][0].teacher
    # step 0: the student, its EMA and its starting values are the same weights, so the same loss
    with torch.no_grad():
        start = {m: sdd.loss(unet, b) for m, (sdd, _) in methods.items()}
    assert start["student"] == start["teacher"] == start["original"]
    with torch.no_grad():  # an optimizer step moved the student
        for p in subset.values():
            p.add_(0.05 * torch.randn_like(p))
    for sdd, _ in methods.values():
        sdd.after_step()  # m = 1: the teacher stays at the start
    with torch.no_grad():
        e_s = SD.predict(unet, None, b.z, b.t, b.c_s.expand(2))
        want = {"student": output_mse(e_s, SD.predict(unet, None, b.z, b.t, b.c_0.expand(2)), b),
                "original": output_mse(e_s, SD.predict(unet, methods["original"][1].original(), b.z, b.t,
                                                       b.c_0.expand(2)), b)}
        got = {m: sdd.loss(unet, b) for m, (sdd, _) in methods.items()}
    assert torch.equal(got["student"], want["student"]) and torch.equal(got["original"], want["original"])
    assert torch.equal(got["teacher"], got["original"])  # with m = 1 the teacher is the original
    assert not torch.allclose(got["student"], got["original"])
    # with m < 1 the teacher lies between: its target is neither the student's nor the original's
    sdd, _ = sdd_with(unet, subset, "teacher", decay="0.5")
    with torch.no_grad():
        for p in subset.values():
            p.add_(0.05)
        sdd.after_step()
        mid = sdd.loss(unet, b)
    assert not torch.allclose(mid, got["original"]) and not torch.allclose(mid, methods["student"][0].loss(unet, b))
    # the frozen copy is made only when asked
    assert methods["student"][1]._original is None and methods["teacher"][1]._original is None


def test_preservation_is_zero_at_the_start_and_its_gradient_pulls_back_to_the_original(tiny_pipeline):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    subset = SD.subset(unet, "xattn")
    setup = Setup(SD, unet, subset, esd_args(tiny_pipeline, "o"), ["x"])
    embeds = {p: Cond(torch.randn(1, 16, 32)) for p in PRESERVE}
    term = Preservation(SD, PRESERVE, embeds, setup.original(), 2.0, None)
    b = a_batch()
    assert term.loss(unet, b, 0).item() == 0.0 and term.step_prompts(5) == [0, 1, 2]
    assert Preservation(SD, PRESERVE, embeds, {}, 2.0, 2).step_prompts(1) == [2, 0]  # cycling, 2 a step
    with torch.no_grad():
        for p in subset.values():
            p.add_(0.05 * torch.randn_like(p))
    dist = sum(((p - setup.original()[n]) ** 2).sum() for n, p in subset.items())
    loss = term.loss(unet, b, 0)
    assert loss > 0
    loss.backward()
    with torch.no_grad():  # a small gradient step on the term alone moves the student toward the original
        for p in subset.values():
            p.sub_(1e-2 * p.grad)
        after = term.loss(unet, b, 0)
    assert after < loss and sum(((p - setup.original()[n]) ** 2).sum() for n, p in subset.items()) < dist


def preserve_distance(base, out):
    """Mean squared distance of OUT/unet's outputs from the base U-Net's on the preserve prompts."""
    parts = SD.load(str(base))
    embeds = SD.encode(parts, PRESERVE, torch.device("cpu"))
    a, b = (UNet2DConditionModel.from_pretrained(p / "unet") for p in (base, out))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 4, 8, 8, generator=g)
    total = 0.0
    with torch.no_grad():
        for t in (200, 500, 800):
            for p in PRESERVE:
                c = embeds[p].hidden.expand(4, -1, -1)
                total += torch.mean((a(z, t, encoder_hidden_states=c).sample
                                     - b(z, t, encoder_hidden_states=c).sample) ** 2).item()
    return total


def test_a_run_with_the_term_ends_closer_to_the_original_on_the_preserve_prompts(tiny_pipeline, tmp_path):
    fast = ["--num_train_steps", "6", "--learning_rate", "1e-3", "--threads", "1"]
    train_esd.main(esd_args(tiny_pipeline, tmp_path / "off", *fast))
    # weight 0 is off: the same run, bit for bit
    train_esd.main(esd_args(tiny_pipeline, tmp_path / "zero", *fast, "--preserve_prompts", *PRESERVE,
                            "--preserve_weight", "0"))
    train_esd.main(esd_args(tiny_pipeline, tmp_path / "on", *fast, "--preserve_prompts", *PRESERVE,
                            "--preserve_weight", "100"))
    off, on = (UNet2DConditionModel.from_pretrained(tmp_path / n / "unet").state_dict() for n in ("off", "on"))
    zero = UNet2DConditionModel.from_pretrained(tmp_path / "zero" / "unet").state_dict()
    assert all(torch.equal(off[k], zero[k]) for k in off) and any(not torch.equal(off[k], on[k]) for k in off)
    assert preserve_distance(tiny_pipeline, tmp_path / "on") < preserve_distance(tiny_pipeline, tmp_path / "off")
    log = (tmp_path / "on" / "train.log").read_text()
    assert "step 1 loss" in log and " preserve 0\n" in log.split("step 2 loss")[0]


@pytest.mark.parametrize("change, flag", [
    (["--uncond_from", "teacher"], "--uncond_from"),
    (["--preserve_prompts", "LIST2", "--preserve_weight", "1"], "--preserve_prompts"),
    (["--preserve_prompts", "LIST", "--preserve_weight", "2"], "--preserve_weight"),
    (["--preserve_prompts", "LIST", "--preserve_weight", "1", "--preserve_batch", "1"], "--preserve_batch"),
])
def test_resume_refuses_another_uncond_from_or_preserve_list_or_weight(tiny_pipeline, tmp_path, change, flag):
    listing = tmp_path / "keep.txt"
    listing.write_text("a cat\ndog\n", encoding="utf-8")
    first = ["--uncond_from", "original", "--preserve_prompts", str(listing), "--preserve_weight", "1"]
    out = tmp_path / "o"
    train_sdd.main(sd_args(tiny_pipeline, out, *first, "--num_train_steps", "1", "--checkpointing_steps", "1"))
    (out / "unet").rename(out / "unet-done")
    (out / "erasure.safetensors").unlink()
    if "LIST2" in change:  # the same file's name, other prompts in it: the prompts as read are the run's identity
        listing.write_text("a cat\n", encoding="utf-8")
    change = [str(listing) if c.startswith("LIST") else c for c in change]
    again = first + ["--num_train_steps", "2", "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1"]
    args = sd_args(tiny_pipeline, out, *again, *change)
    with pytest.raises(UserError) as err:
        train_sdd.main(args)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {out / 'checkpoint-1'} belongs to a run with other flags: "
                                              f"{flag} ")


def test_preserve_flags_are_checked_before_anything_is_written(tiny_pipeline, tmp_path):
    for extra, says in ((["--preserve_weight", "1"], "need --preserve_prompts"),
                        (["--preserve_prompts", "dog"], "needs --preserve_weight"),
                        (["--preserve_prompts", "dog", "--preserve_weight", "-1"], "must be >= 0"),
                        (["--preserve_prompts", "dog", "--preserve_weight", "1", "--preserve_batch", "0"], ">= 1")):
        with pytest.raises(UserError, match=says):
            train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", *extra))
    assert not (tmp_path / "o").exists()
