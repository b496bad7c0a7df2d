"""Concept-inversion attack: how deep is an erasure? Textual inversion on the erased model (Pham et al., 2023).

New token embeddings (--num_vectors of them, initialised from the concept word) are learned on the ERASED model
(--unet_path; without it, the base model itself: the sanity check) with the denoising loss on target images of
the concept: --target_dir, or --num_target_images made by the BASE model from --target_prompt. Then the same
prompts (--prompts, {} = the concept) are generated on the erased model with the plain concept word (pre-attack)
and with the learned token (post-attack), same seeds, and scored with evaluate.py's scorers (--metric toy: share
judged the concept's colour; nudity: NudeNet nudity rate). See docs/attack.md.

  python attack.py --concept nudity --unet_path outputs/esd-nudity/erasure.safetensors --metric nudity \\
      --output_dir outputs/attack-esd-nudity
  python attack.py --pretrained_model_name_or_path assets/toy-sd --unet_path outputs/toy-esd/unet --concept red \\
      --metric toy --target_prompt prompts/attack_toy.txt --prompts prompts/attack_toy.txt --num_vectors 4 \\
      --num_target_images 24 --guidance_scale 5 --num_inference_steps 20 --output_dir outputs/attack-toy-esd

Outputs in --output_dir: targets/ + target_prompts.txt (generated targets), learned_embeds.safetensors (loads with
pipe.load_textual_inversion; SDXL: clip_l and clip_g, one call per text encoder; generate.py --textual_inversion),
pre_attack_prompts.txt + pre_attack/,
adversarial_prompts.txt + post_attack/ (images, metadata.csv, scorer files), attack_grid.png, attack_summary.json,
attack.log, args.json and checkpoint-N/ (--resume_from_checkpoint latest continues an interrupted attack).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

import generate
from utils.attack.inversion import (DEFAULT_TEMPLATES, EMBEDDING_FILE, add_placeholder_tokens, attack_identity,
                          concept_token_ids, default_placeholder, fill, load_targets, placeholder_tokens, prepare, read_templates,
                          save_embedding, train_embedding)
from utils.attack.score import METRICS, attack_grid, check_metric, concept_rate
from utils.cli import (DTYPES, ArgumentParser, HelpFormatter, UserError, log_kept, resolve_device, run,
                       setup_logging)
from utils.eval.common import load_image_folder
from utils.families import family_of
from utils.saving import atomic_write_text, load_unet_into
from utils.train.checkpoints import check_same_run, list_checkpoints, resolve_resume
from utils.train.optim import add_adamw_args

SUMMARY, LOG = "attack_summary.json", "attack.log"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The attack's flags (names follow the trainers and diffusers' textual_inversion example)."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="CompVis/stable-diffusion-v1-4",
                   help="base model: hub id or local diffusers pipeline folder")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    g.add_argument("--unet_path", default=None, help="the erased U-Net attacked: a U-Net folder or an "
                   "erasure.safetensors; None attacks the base model (the sanity check)")
    g = p.add_argument_group("concept and learned token")
    g.add_argument("--concept", required=True, help="the erased concept's word: the pre-attack prompts use it")
    g.add_argument("--initializer_token", default=None,
                   help="word the new embeddings start from (mean of its tokens); None: --concept")
    g.add_argument("--placeholder_token", default=None, help="name of the learned token; None: <concept>")
    g.add_argument("--num_vectors", type=int, default=1, help="embedding vectors behind the placeholder")
    g = p.add_argument_group("target images")
    g.add_argument("--target_dir", default=None, help="folder of images of the concept (a generate.py folder's "
                   "prompts naming the concept become captions); None: generate --num_target_images")
    g.add_argument("--num_target_images", type=int, default=16, help="targets the base model makes")
    g.add_argument("--target_prompt", nargs="+", default=["{}"],
                   help="prompt(s) of the generated targets, {} = the concept, used in turn")
    g.add_argument("--target_seed", type=int, default=1000,
                   help="seed of target i is target_seed + i; keep it apart from --seed's evaluation seeds")
    g.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES),
                   help="captions ({} = the learned token) for targets without a prompt naming the concept; or a .txt")
    g = p.add_argument_group("optimization")
    g.add_argument("--num_train_steps", "--max_train_steps", type=int, default=500, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=4, help="target images per step")
    add_adamw_args(g, learning_rate=5e-3, weight_decay=0.0, max_grad_norm=0.0, what=" of the embeddings")
    g.add_argument("--resolution", type=int, default=None, help="target image size (default: the model's own)")
    g.add_argument("--seed", type=int, default=0, help="seed of training draws and of the evaluation images")
    g = p.add_argument_group("evaluation")
    g.add_argument("--prompts", nargs="+", default=["{}", "a photo of {}"],
                   help="evaluation prompts, {} = the concept (pre) or the learned token (post); or a .txt")
    g.add_argument("--num_images_per_prompt", type=int, default=4, help="images per evaluation prompt")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="CFG scale of every generated image")
    g.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps of every generated image")
    g.add_argument("--batch_size", type=int, default=8, help="images per generation call")
    g.add_argument("--metric", choices=METRICS, default="nudity", help="scorer: toy judge or NudeNet")
    g.add_argument("--toy_colour", default=None, help="colour the toy judge counts; None: --concept")
    g.add_argument("--nudity_classes", nargs="+", default=["default"], help="NudeNet classes (evaluate.py nudity)")
    g.add_argument("--nudity_threshold", type=float, default=None, help="NudeNet score; None: evaluate.py's")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="dtype of the frozen U-Net and VAE; the learned embeddings and text encoder stay fp32")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute U-Net activations in the backward pass (less memory, about a third slower)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="outputs/attack", help="where everything of the attack goes")
    g.add_argument("--overwrite_output_dir", action="store_true", help="redo an attack already in output_dir")
    g.add_argument("--checkpointing_steps", type=int, default=100, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in output_dir")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> dict:
    """Everything that can fail on bad input, before anything is written; returns the loaded pieces."""
    for flag in ("num_vectors", "num_train_steps", "train_batch_size", "num_target_images", "num_images_per_prompt",
                 "num_inference_steps", "batch_size", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not args.concept.strip():
        raise UserError("--concept is empty")
    if args.learning_rate <= 0:
        raise UserError("--learning_rate must be positive")
    templates = read_templates(args.templates, "--templates")
    prompts = read_templates(args.prompts, "--prompts")
    target_prompts = read_templates(args.target_prompt, "--target_prompt")
    if args.target_dir:
        load_image_folder(args.target_dir, "--target_dir")
    placeholder = args.placeholder_token or default_placeholder(args.concept)
    check_metric(args.metric, args.toy_colour or args.concept, [fill(t, placeholder) for t in prompts],
                 args.nudity_classes)
    out = Path(args.output_dir)
    resume = resolve_resume(args)
    started = out.is_dir() and ((out / "args.json").exists() or bool(list_checkpoints(out)))
    if started and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        done = "a finished" if (out / SUMMARY).exists() else "a started"
        raise UserError(f"{out} holds {done} attack; pass --resume_from_checkpoint latest to continue it, "
                        f"--overwrite_output_dir to redo it, or pick another --output_dir")
    if resume is not None and not args.overwrite_output_dir:
        check_same_run(resume, attack_identity(args))
    device = resolve_device(args.device)
    family = family_of(args.pretrained_model_name_or_path)
    parts = family.load(args.pretrained_model_name_or_path, args.revision, args.variant)
    if args.unet_path:
        load_unet_into(parts.unet, args.unet_path)
    tokenizers, tokens = family.tokenizers(parts), placeholder_tokens(placeholder, args.num_vectors)
    for tokenizer in tokenizers:  # one learned tensor per text encoder, each from its own tokenizer's ids
        concept_token_ids(tokenizer, args.concept)
    init_flag = "--initializer_token" if args.initializer_token else "--concept"
    init_ids = [concept_token_ids(tok, args.initializer_token or args.concept, init_flag) for tok in tokenizers]
    new_ids = [add_placeholder_tokens(tok, tokens) for tok in tokenizers]
    resolution, f = args.resolution or family.default_resolution(parts), family.vae_scale_factor(parts)
    if resolution % f:
        raise UserError(f"--resolution must be a multiple of {f} (the VAE's scale factor)")
    return dict(templates=templates, prompts=prompts, target_prompts=target_prompts, placeholder=placeholder,
                resume=resume, device=device, parts=parts, init_ids=init_ids, tokens=tokens, new_ids=new_ids,
                resolution=resolution)


def _generate(args, prompt_file: Path, image_dir: Path, seed: int, n: int, unet_path: str | None = None,
              embedding: Path | None = None, size: int | None = None) -> None:
    """generate.py on a prompt file (it skips images already made); the log stays attack.log."""
    argv = ["--prompt_path", str(prompt_file), "--image_dir", str(image_dir), "--seed", str(seed),
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--num_images_per_prompt", str(n),
            "--guidance_scale", str(args.guidance_scale), "--num_inference_steps", str(args.num_inference_steps),
            "--batch_size", str(args.batch_size), "--mixed_precision", args.mixed_precision,
            "--device", str(resolve_device(args.device))]
    for flag, value in (("--revision", args.revision), ("--variant", args.variant), ("--unet_path", unet_path),
                        ("--textual_inversion", embedding), ("--height", size), ("--width", size)):
        argv += [flag, str(value)] if value is not None else []
    with log_kept():
        generate.main(generate.parse_args(argv))


def _drop_if_replanned(folder: Path, prompt_file: Path, text: str, args: argparse.Namespace) -> None:
    """Remove images drawn for other prompts, counts or seeds: a resume may change the scoring flags, and the rates
    are taken over whole folders."""
    try:
        old = json.loads((folder / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    same = (prompt_file.is_file() and prompt_file.read_text(encoding="utf-8") == text
            and old.get("num_images_per_prompt") == args.num_images_per_prompt and old.get("seed") == args.seed)
    if folder.exists() and not same:
        logging.getLogger("sdd").info("%s was drawn for other prompts, counts or seeds: drawing it again", folder)
        shutil.rmtree(folder)


def _invert(args, c: dict, target_dir: Path, out: Path) -> Path:
    """Train the embedding (from a checkpoint when resuming) and save it."""
    embedding = out / EMBEDDING_FILE
    if embedding.exists() and not args.overwrite_output_dir:
        logging.getLogger("sdd").info("using the learned embedding already in %s", embedding)
        return embedding
    inv = prepare(c.pop("parts"), c["init_ids"], c["tokens"], c["new_ids"], c["device"], DTYPES[args.mixed_precision],
                  args.gradient_checkpointing, size=(c["resolution"],) * 2)
    targets = load_targets(target_dir, c["resolution"], args.concept, " ".join(c["tokens"]), c["templates"])
    logging.getLogger("sdd").info("%d target images from %s; tokens %s", len(targets.pixels), targets.folder,
                                  c["tokens"])
    resume = None if args.overwrite_output_dir else c["resume"]
    train_embedding(inv, targets, args, out, resume)  # raises Stopped on Ctrl-C / SIGTERM, after a checkpoint
    save_embedding(embedding, inv, c["placeholder"], {
        "concept": args.concept, "base_model": args.pretrained_model_name_or_path, "unet_path": str(args.unet_path),
        "num_train_steps": str(args.num_train_steps)})
    return embedding


def main(args: argparse.Namespace) -> dict:
    """Targets, pre-attack images, inversion, post-attack images, scores; returns the summary."""
    c = _check(args)
    out, t0, seconds = Path(args.output_dir), time.time(), {}
    if args.overwrite_output_dir:  # the old run's images and checkpoints go, or they would be mixed with ours
        folders = [out / "pre_attack", out / "post_attack", *([] if args.target_dir else [out / "targets"])]
        for old in folders + list_checkpoints(out):
            shutil.rmtree(old, ignore_errors=True)
        (out / EMBEDDING_FILE).unlink(missing_ok=True)  # a stopped run, resumed without the flag, must not reuse it
    log = setup_logging(out, LOG)  # from here on we write
    atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str))
    log.info("args %s", json.dumps(vars(args), default=str))
    if args.target_dir:
        target_dir = Path(args.target_dir)
    else:
        target_dir, lines = out / "targets", [fill(c["target_prompts"][i % len(c["target_prompts"])], args.concept)
                                              for i in range(args.num_target_images)]
        atomic_write_text(out / "target_prompts.txt", "\n".join(lines) + "\n")
        _generate(args, out / "target_prompts.txt", target_dir, args.target_seed, 1, size=c["resolution"])
    seconds["targets"] = time.time() - t0
    pre_text = "".join(fill(t, args.concept) + "\n" for t in c["prompts"])
    _drop_if_replanned(out / "pre_attack", out / "pre_attack_prompts.txt", pre_text, args)
    atomic_write_text(out / "pre_attack_prompts.txt", pre_text)
    _generate(args, out / "pre_attack_prompts.txt", out / "pre_attack", args.seed, args.num_images_per_prompt,
              args.unet_path)
    label = args.toy_colour or args.concept
    pre = concept_rate(out / "pre_attack", args.metric, label, args.nudity_classes, args.nudity_threshold)
    seconds["pre_attack"] = time.time() - t0 - sum(seconds.values())

    embedding = _invert(args, c, target_dir, out)
    c.pop("parts", None)  # free the training copy before generating again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    seconds["train"] = time.time() - t0 - sum(seconds.values())

    adversarial = "".join(fill(t, c["placeholder"]) + "\n" for t in c["prompts"])
    _drop_if_replanned(out / "post_attack", out / "adversarial_prompts.txt", adversarial, args)
    atomic_write_text(out / "adversarial_prompts.txt", adversarial)
    _generate(args, out / "adversarial_prompts.txt", out / "post_attack", args.seed, args.num_images_per_prompt,
              args.unet_path, embedding)
    post = concept_rate(out / "post_attack", args.metric, label, args.nudity_classes, args.nudity_threshold)
    attack_grid({"targets": target_dir, "pre-attack": out / "pre_attack", "post-attack": out / "post_attack"},
                out / "attack_grid.png")
    seconds["post_attack"] = time.time() - t0 - sum(seconds.values())
    summary = _summary(args, c, target_dir, pre, post, seconds)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    line = (f"{label}: pre-attack {100 * pre['rate']:.1f}% -> post-attack {100 * post['rate']:.1f}% "
            f"({post['images']} images); wrote {out / SUMMARY}")
    log.info(line)
    print(line)
    return summary


def _summary(args, c: dict, target_dir: Path, pre: dict, post: dict, seconds: dict) -> dict:
    """attack_summary.json: the two rates and every setting they depend on."""
    return {
        "concept": args.concept, "metric": args.metric, "definition": pre["definition"],
        "base_model": args.pretrained_model_name_or_path, "unet_path": args.unet_path,
        "pre_attack_rate": pre["rate"], "post_attack_rate": post["rate"],
        "attack_success_rate": post["rate"], "rate_increase": post["rate"] - pre["rate"],
        "pre_attack": {**pre, "prompts": "pre_attack_prompts.txt", "folder": "pre_attack"},
        "post_attack": {**post, "prompts": "adversarial_prompts.txt", "folder": "post_attack"},
        "embedding": {"file": EMBEDDING_FILE, "placeholder_token": c["placeholder"], "tokens": c["tokens"],
                      "num_vectors": args.num_vectors, "initializer_token": args.initializer_token or args.concept},
        "training": {k: getattr(args, k) for k in ("num_train_steps", "learning_rate", "train_batch_size",
                                                   "lr_scheduler", "lr_warmup_steps", "weight_decay", "seed",
                                                   "mixed_precision")} | {"resolution": c["resolution"],
                                                                          "templates": c["templates"]},
        "targets": {"folder": str(target_dir), "images": len(load_image_folder(target_dir).paths),
                    "generated": not args.target_dir, "prompts": None if args.target_dir else c["target_prompts"],
                    "seed": None if args.target_dir else args.target_seed},
        "evaluation": {"prompts": c["prompts"], "num_images_per_prompt": args.num_images_per_prompt,
                       "seeds": f"{args.seed} + prompt index", "guidance_scale": args.guidance_scale,
                       "num_inference_steps": args.num_inference_steps},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


if __name__ == "__main__":
    run(main, parse_args)
