"""Generate images for a prompt file with Stable Diffusion, an erased U-Net, or an inference-time baseline.

  python generate.py --prompt_path i2p.csv --image_dir out/sdd --unet_path out/sdd/erasure.safetensors
  python generate.py --prompt_path i2p.csv --image_dir out/sld --pipeline_type sld --pipeline_config max
  python generate.py --prompt_path i2p.csv --guidance_source flag   # 7.5 for every prompt, as the SDD paper did
  python generate.py ... --start 0 --end 2400     # job 1 of 2 on one file; job 2: --start 2400
  accelerate launch --num_processes 4 generate.py ...   # one process per GPU, each its own slice of the prompts
  accelerate launch --multi_gpu --num_processes 2 generate.py ... --device cpu   # 2 CPU processes (gloo)

Modes (MODES below): --pipeline_type picks the pipeline class, --pipeline_config its extra call arguments:
  sd    none (default), neg: SD+NEG, the safety concept as negative prompt
  sld   weak, medium (default: diffusers' own call defaults), strong, max: Safe Latent Diffusion presets
  sega  default: SEGA with the safety concept as editing prompt, reversed, edit guidance 5 (--edit_* flags)
To add a mode, add one MODES entry: Mode(PipelineClass, {"config": lambda a: {extra __call__ kwargs}}); `default`
names the default config (else the first), `a` is the parsed args, `attrs` sets attributes on the built pipeline and
`concept_configs` lists the configs that use --safety_concept (None: all). Any pipeline whose constructor takes the
SD parts and whose __call__ takes prompt, latents and guidance_scale fits. --unet_path (a diffusers U-Net folder, an
erasure .safetensors file or a training checkpoint folder) is applied to the base U-Net before any mode is built, then
the LoRAs of --lora_path (docs/lora.md).

Reproducibility: image j of prompt i starts from the (j+1)-th latent of shape (1, C, H/f, W/f) drawn from
torch.Generator("cpu").manual_seed(seed), seed = the file's seed, else --seed + i (i = the prompt's index in the
file); guidance = the file's (with --guidance_source file, when the row has one), else --guidance_scale, and batches
only hold prompts of one guidance. So batch size, resuming, --start/--end and the number of processes do not change an
image. (On the CPU in fp32, kernels give ~1e-6 float differences between batch sizes, which can at most turn a rare
pixel by one level; none in the tests. On a GPU, in fp16 and with kernels chosen per batch shape, they can be
larger.) Prompts longer than the tokenizer's limit are cut to its first tokens, as diffusers does.
--num_inference_steps, --guidance_scale, --height and --width not given come from the model folder's
sampling_defaults.json when it has one (e.g. assets/toy-sd: 20 steps, guidance 5), else 25 / 7.5 / the model's size.

Output in --image_dir (default outputs/<prompt file>/<model>_<type>-<config>): {case_number or index:05d}_{j}.png
(written under a temp name, then renamed), args.json, generate.log, and the metadata: each job or process appends a
row per image to its own metadata-{first:05d}-{end:05d}.csv, and every run ends by merging all of them into
metadata.csv (file, prompt, seed, guidance, guidance_source, steps, mode, config, unet, lora, then the prompt file's other
columns), so shards sharing a folder never clobber each other. Existing images are skipped (--overwrite redoes them);
a folder made with other settings is refused (--overwrite redoes it when the run covers every image there).

The SDD reference code's flags work too: --use_fp16 (= --mixed_precision fp16), --tokenizer_path, --text_encoder_path.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
from tqdm.auto import tqdm

from utils.cli import ArgumentParser, HelpFormatter, UserError, resolve_device, resolve_dtype, run, setup_logging
from utils.images import save_png
from utils.lora import check_lora_args
from utils.gen.image_folder import (ARGS, Job, MetadataShard, check_prompts, check_settings, guidance_batches,
                                initial_latents, known_files, make_jobs, merge_metadata, metadata_row)
from utils.families import family_of
from utils.gen.pipelines import (OUR_DEFAULTS, SAMPLING_DEFAULTS, SemanticStableDiffusionPipeline, build_pipeline,
                                 call_defaults, default_image_dir, default_safety_concept, load_embedding, load_parts,
                                 no_decode_latents_notice, resolve_sampling)
from utils.prompts import Prompt, fit_to_tokenizer, read_prompts
from utils.saving import atomic_write_text, weights_digest

BARRIER_HOURS = 72  # how long a process waits for the others at the end (torch's default, 10 minutes, is too short)


@dataclass
class Mode:
    """A --pipeline_type: --pipeline_config -> extra __call__ kwargs, attributes, default config (the pipeline class
    is the model family's: utils/families/)."""

    configs: dict[str, Callable[[argparse.Namespace], dict[str, Any]]]
    attrs: Callable[[argparse.Namespace], dict[str, Any]] = field(default=lambda a: {})
    default: str | None = None  # None: the first config
    concept_configs: frozenset[str] | None = None  # configs that use --safety_concept; None: all

    @property
    def default_config(self) -> str:
        """The config used when --pipeline_config is not given."""
        return self.default or next(iter(self.configs))

    def uses_concept(self, config: str) -> bool:
        """Whether `config` steers away from --safety_concept."""
        return self.concept_configs is None or config in self.concept_configs


MODES: dict[str, Mode] = {
    "sd": Mode({
        "none": lambda a: {},
        "neg": lambda a: {"negative_prompt": a.safety_concept}}, concept_configs=frozenset({"neg"})),
    "sld": Mode({
        "weak": lambda a: SafetyConfig.WEAK,
        "medium": lambda a: SafetyConfig.MEDIUM,
        "strong": lambda a: SafetyConfig.STRONG,
        "max": lambda a: SafetyConfig.MAX}, attrs=lambda a: {"safety_concept": a.safety_concept}, default="medium"),
    "sega": Mode({
        "default": lambda a: {"editing_prompt": [a.safety_concept], "reverse_editing_direction": True,
                              "edit_guidance_scale": a.edit_guidance_scale, "edit_warmup_steps": a.edit_warmup_steps,
                              "edit_threshold": a.edit_threshold, "edit_momentum_scale": a.edit_momentum_scale,
                              "edit_mom_beta": a.edit_mom_beta}}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompt_path", required=True, help=".txt (a prompt a line), .csv (column `prompt`; optional "
                   "evaluation_seed|seed, evaluation_guidance|guidance_scale, case_number; other columns go into the "
                   "metadata) or .json (list of strings, list of objects, or object of lists)")
    p.add_argument("--image_dir", default=None, help="folder for the PNGs, metadata.csv, args.json and generate.log; "
                   "None: outputs/<prompt file name>/<model>_<pipeline_type>-<pipeline_config>, <model> = the "
                   "--unet_path run folder, else the base model's name")
    p.add_argument("--pretrained_model_name_or_path", default="CompVis/stable-diffusion-v1-4",
                   help=f"base pipeline: hub id or local folder (a folder may hold {SAMPLING_DEFAULTS})")
    p.add_argument("--revision", default=None, help="hub revision of the base pipeline")
    p.add_argument("--variant", default=None, help="weight variant of the base pipeline, e.g. fp16")
    p.add_argument("--unet_path", default=None, help="erased U-Net: a diffusers U-Net folder (train_*.py's "
                   "OUTPUT_DIR/unet), an erasure .safetensors file or a training checkpoint folder (OUTPUT_DIR/checkpoint-N) "
                   "applied onto the base U-Net; any mode")
    p.add_argument("--tokenizer_path", default=None, help="a tokenizer folder replacing the base's (reference flag)")
    p.add_argument("--text_encoder_path", default=None,
                   help="a CLIP text encoder folder replacing the base's (reference flag)")
    p.add_argument("--textual_inversion", default=None, help="a learned-embedding file (attack.py's "
                   "learned_embeds.safetensors or any diffusers textual-inversion file) whose token the prompts may "
                   "use; --pipeline_type sd")
    p.add_argument("--lora_path", nargs="+", default=None, help="LoRA .safetensors files loaded onto the U-Net "
                   "(after --unet_path) and used together, e.g. two exported erasures (python -m utils.lora); any mode")
    p.add_argument("--lora_scale", nargs="+", type=float, default=None,
                   help="strength of each --lora_path: one value for all or one per file; None = 1")
    p.add_argument("--pipeline_type", choices=list(MODES), default="sd", help="pipeline (see MODES)")
    configs = sorted({c for m in MODES.values() for c in m.configs})
    p.add_argument("--pipeline_config", choices=configs, default=None, help="the mode's setting: " + "; ".join(
        f"{k}: {'|'.join(m.configs)} (default {m.default_config})" for k, m in MODES.items()))
    p.add_argument("--safety_concept", default=default_safety_concept(),
                   help="concept steered away from by sd neg, sld and sega; the default is SLD's own")
    _sega_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of prompt i when the file has none: seed + i")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance; None: the model "
                   f"folder's {SAMPLING_DEFAULTS}, else {OUR_DEFAULTS['guidance_scale']}")
    p.add_argument("--guidance_source", choices=["file", "flag"], default="file",
                   help="file: a prompt file row's evaluation_guidance|guidance_scale wins where it has one; flag: "
                        "--guidance_scale for every prompt (the SDD reference code: 7.5 for all I2P prompts)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="denoising steps; None: the model "
                   f"folder's {SAMPLING_DEFAULTS}, else {OUR_DEFAULTS['num_inference_steps']}")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="images per prompt (j = 0..n-1)")
    p.add_argument("--height", type=int, default=None, help="pixels; None: the model folder's "
                   f"{SAMPLING_DEFAULTS}, else the U-Net's sample_size x VAE scale")
    p.add_argument("--width", type=int, default=None, help="pixels; None: as --height")
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (same guidance only)")
    p.add_argument("--start", type=int, default=0, help="first prompt index of this job")
    p.add_argument("--end", type=int, default=None, help="prompt index this job stops before; None = the end")
    p.add_argument("--overwrite", action="store_true", help="redo images that exist instead of skipping them")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="weights dtype; None = fp16 on cuda, fp32 on cpu")
    p.add_argument("--use_fp16", dest="mixed_precision", action="store_const", const="fp16",
                   help="the reference code's name for --mixed_precision fp16")
    p.add_argument("--device", default="auto", help="auto (accelerate's device for this process), cpu, cuda:1...")
    return p.parse_args(argv)


def _sega_flags(p: argparse.ArgumentParser) -> None:
    """The --edit_* flags of SEGA."""
    sega = p.add_argument_group("SEGA (--pipeline_type sega); defaults: the paper's edit guidance 5, else diffusers'")
    d = call_defaults(SemanticStableDiffusionPipeline)
    sega.add_argument("--edit_guidance_scale", type=float, default=5.0, help="strength of the reversed edit")
    sega.add_argument("--edit_warmup_steps", type=int, default=d["edit_warmup_steps"],
                      help="denoising steps before the edit guidance is applied")
    sega.add_argument("--edit_threshold", type=float, default=d["edit_threshold"],
                      help="quantile of latent dimensions left unedited (higher = sparser edit)")
    sega.add_argument("--edit_momentum_scale", type=float, default=d["edit_momentum_scale"],
                      help="weight of the momentum added to the edit guidance")
    sega.add_argument("--edit_mom_beta", type=float, default=d["edit_mom_beta"], help="momentum decay")


def _abs(path: str | None) -> str | None:
    """Absolute form of a local path, so args.json compares equal across working directories; hub ids unchanged."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def _check(args: argparse.Namespace) -> tuple[Mode, list[Prompt], int]:
    """Validate the flags that need no model; fill the config, the sampling settings and the image folder."""
    mode = MODES[args.pipeline_type]
    args.pipeline_config = args.pipeline_config or mode.default_config
    if args.pipeline_config not in mode.configs:
        raise UserError(f"--pipeline_config {args.pipeline_config} does not exist for --pipeline_type "
                        f"{args.pipeline_type} (choose from {', '.join(mode.configs)})")
    args.sampling_sources = resolve_sampling(args, args.pretrained_model_name_or_path)
    for flag in ("num_inference_steps", "num_images_per_prompt", "batch_size", "height", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    prompts = read_prompts(args.prompt_path)
    end = len(prompts) if args.end is None else min(args.end, len(prompts))
    if not 0 <= args.start < end:
        raise UserError(f"--start {args.start} --end {args.end} select none of the {len(prompts)} prompts")
    if args.image_dir is None:
        args.image_dir = str(default_image_dir(args.prompt_path, args.pretrained_model_name_or_path, args.unet_path,
                                               args.pipeline_type, args.pipeline_config))
        print(f"images go to {args.image_dir} (--image_dir)")
    if Path(args.image_dir).exists() and not Path(args.image_dir).is_dir():
        raise UserError(f"--image_dir {args.image_dir} exists and is not a folder")
    return mode, prompts, end


def _settings(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """What an image depends on: a folder holds images of one setting."""
    settings = {k: getattr(args, k) for k in (
        "revision", "variant", "pipeline_type", "pipeline_config", "safety_concept", "edit_guidance_scale",
        "edit_warmup_steps", "edit_threshold", "edit_momentum_scale", "edit_mom_beta", "seed", "guidance_scale",
        "guidance_source", "num_inference_steps", "height", "width")}
    settings.update({k: _abs(getattr(args, k)) for k in (
        "pretrained_model_name_or_path", "unet_path", "tokenizer_path", "text_encoder_path", "prompt_path",
        "textual_inversion")})
    return {**settings, "dtype": str(dtype)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, then make this process's missing images and merge the metadata; return the summary."""
    mode, prompts, end = _check(args)
    loras = check_lora_args(args.lora_path, args.lora_scale)
    # processes split the prompts, not the missing images: after a resume one may wait at the final barrier for hours
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"),
                         timeout=datetime.timedelta(hours=BARRIER_HOURS))
    device = state.device if args.device in (None, "", "auto") else resolve_device(args.device)
    dtype = resolve_dtype(args.mixed_precision, device)
    family = family_of(args.pretrained_model_name_or_path)
    pipeline_class = family.pipeline(args.pipeline_type)  # refused before anything loads
    parts = load_parts(args.pretrained_model_name_or_path, args.unet_path, dtype, args.revision, args.variant,
                       args.tokenizer_path, args.text_encoder_path, loras)
    pipe = build_pipeline(pipeline_class, parts, device)
    if args.textual_inversion:
        print(f"loaded token(s) {' '.join(load_embedding(pipe, args.textual_inversion))} from {args.textual_inversion}")
    args.safety_concept, cut = fit_to_tokenizer(pipe.tokenizer, args.safety_concept)  # as the prompts, for every mode
    if cut and mode.uses_concept(args.pipeline_config) and state.is_main_process:
        print(f"--safety_concept is longer than {pipe.tokenizer.model_max_length} tokens: its first tokens are used")
    for name, value in mode.attrs(args).items():
        setattr(pipe, name, value)
    f = pipe.vae_scale_factor
    args.height = args.height or pipe.unet.config.sample_size * f
    args.width = args.width or pipe.unet.config.sample_size * f
    if args.height % f or args.width % f:
        raise UserError(f"--height and --width must be multiples of {f} (the VAE's scale factor)")
    image_dir, settings = Path(args.image_dir), _settings(args, dtype)
    settings.update(lora_path=[_abs(p) for p, _ in loras] or None, lora_scale=[s for _, s in loras] or None)
    digests = {k: weights_digest(v) for k, v in (("unet", args.unet_path), ("text_encoder", args.text_encoder_path),
                                                 ("textual_inversion", args.textual_inversion),
                                                 *((f"lora{i}", p) for i, (p, _) in enumerate(loras)))}
    settings["weights_sha256"] = {k: v for k, v in digests.items() if v}  # weights retrained in place differ here
    jobs = make_jobs(prompts[args.start:end], args.num_images_per_prompt, args.seed, args.guidance_scale,
                     file_guidance=args.guidance_source == "file")
    planned = {job.file for job in jobs}
    changed = check_settings(image_dir, settings, args.overwrite, planned)  # names the flags that differ
    check_prompts(image_dir, jobs, args.overwrite)  # then rows of an edited prompt file
    if changed and state.is_main_process:
        # the old images this run redoes go first: a stopped --overwrite run, resumed without it, redoes the rest
        for name in planned:
            (image_dir / name).unlink(missing_ok=True)
        stale = sorted(p.name for p in image_dir.glob("*_summary.json"))
        if stale:
            print(f"note: {', '.join(stale)} in {image_dir} describe the earlier images; run evaluate.py again")
    state.wait_for_everyone()  # every process has compared the settings before args.json changes

    # everything is checked: from here on we write
    with state.split_between_processes(prompts[args.start:end]) as mine:
        mine = list(mine)
    image_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        record = {**vars(args), **settings, "num_prompts": len(prompts), "model_family": family.name}
        atomic_write_text(image_dir / ARGS, json.dumps(record, indent=2))
    log = setup_logging(image_dir, "generate.log")
    meta = {"guidance_source": args.guidance_source, "steps": args.num_inference_steps, "mode": args.pipeline_type,
            "config": args.pipeline_config, "unet": args.unet_path or "base",
            "lora": "; ".join(f"{p} ({s:g})" for p, s in loras) or "none"}
    who = f"[process {state.process_index}/{state.num_processes}] " if state.num_processes > 1 else ""
    summary = generate(pipe, mine, image_dir, args, mode.configs[args.pipeline_config](args), meta,
                       show_progress=state.is_main_process, prefix=who)
    state.wait_for_everyone()
    rows = merge_metadata(image_dir) if state.is_main_process else None
    line = (f"{who}wrote {summary['written']} images, skipped {summary['skipped']} already there, "
            f"{summary['seconds']:.1f} s, {summary['images_per_s']:.2f} images/s" +
            (f"; metadata.csv has {rows} rows" if rows is not None else ""))
    log.info(line)
    print(line)
    return summary


@torch.no_grad()
def generate(pipe, prompts: list[Prompt], image_dir: Path, args: argparse.Namespace, call_kwargs: dict[str, Any],
             meta: dict[str, str], show_progress: bool = True, prefix: str = "") -> dict[str, Any]:
    """Make the missing images of `prompts` in batches of one guidance scale; a metadata row per image."""
    jobs = make_jobs(prompts, args.num_images_per_prompt, args.seed, args.guidance_scale,
                     file_guidance=args.guidance_source == "file")
    todo = [job for job in jobs if args.overwrite or not (image_dir / job.file).exists()]
    summary = {"written": 0, "skipped": len(jobs) - len(todo), "seconds": 0.0, "images_per_s": 0.0, "truncated": 0}
    if not jobs:
        return summary
    shard = MetadataShard(image_dir, prompts[0].index, prompts[-1].index + 1, prompts)
    known, redo = known_files(image_dir), {job.file for job in todo}
    for job in jobs:  # images of an earlier run that was stopped between the PNG and its row
        if job.file not in redo and job.file not in known:
            shard.add(metadata_row(job, meta))
    texts = {job.prompt.index: job.prompt.text for job in todo}
    texts = {i: fit_to_tokenizer(pipe.tokenizer, text) for i, text in texts.items()}  # -> (text, was cut)
    summary["truncated"] = sum(cut for _, cut in texts.values())
    if summary["truncated"]:
        limit = pipe.tokenizer.model_max_length
        line = f"{prefix}{summary['truncated']} prompts longer than {limit} tokens were truncated"
        logging.getLogger("sdd").info(line)
        print(line)
    shape = (pipe.unet.config.in_channels, args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)

    def write(batch: list[Job], images: list) -> int:
        """PNG, then its metadata row (a run killed in between is mended on resume, see above)."""
        for job, image in zip(batch, images):
            save_png(image, image_dir / job.file)
            shard.add(metadata_row(job, meta))
        return len(batch)

    start = time.perf_counter()
    # one writer thread encodes batch i's PNGs (Pillow releases the GIL) while batch i + 1 is generated
    with tqdm(total=len(todo), unit="img", disable=not show_progress) as bar, ThreadPoolExecutor(1) as writer:
        writing: Future | None = None
        for batch in guidance_batches(todo, args.batch_size):
            latents = torch.cat([initial_latents(job.seed, job.j, shape) for job in batch])
            kwargs = {k: [v] * len(batch) if k == "negative_prompt" and isinstance(v, str) else v
                      for k, v in call_kwargs.items()}  # diffusers wants one negative prompt per prompt
            with no_decode_latents_notice():
                images = pipe(prompt=[texts[job.prompt.index][0] for job in batch],
                              latents=latents.to(pipe.device, pipe.unet.dtype), guidance_scale=batch[0].guidance,
                              num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                              **kwargs).images
            if writing is not None:
                bar.update(writing.result())  # at most one batch waits to be written; its errors surface here
            writing = writer.submit(write, batch, images)
        if writing is not None:
            bar.update(writing.result())
    shard.close()
    seconds = time.perf_counter() - start
    summary.update(written=len(todo), seconds=seconds, images_per_s=len(todo) / seconds if seconds > 0 else 0.0)
    return summary


if __name__ == "__main__":
    run(main, parse_args)
