"""Images/s of generate.py's batched path against a plain one-prompt-at-a-time `pipe(prompt)` loop, same settings.

  python -m benchmarks.bench_generate                       # tiny pipeline built in code (seconds)
  python -m benchmarks.bench_generate --model toy           # assets/toy-sd (python -m utils.toy train)
  python -m benchmarks.bench_generate --model PATH --num_prompts 32 --batch_size 8 --threads 2

Both paths load the pipeline once outside the timing, run the same prompts with the same steps, guidance, size,
scheduler, dtype and thread count, and write one PNG per image; generate.py's time is its own summary (generation
and writing only). A warm-up call of each batch shape comes first, then `--repeats` alternating rounds; the best
round of each path counts. What makes generate.py faster: one U-Net call per step for a whole batch instead of
one per prompt (the same work in fewer, larger kernels: less per-call Python and thread overhead), the prompt and
the empty negative prompt encoded once per batch call, and the VAE decoding the batch at once.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from generate import main as generate_main, parse_args as generate_args  # noqa: E402
from utils.cli import ArgumentParser, HelpFormatter, UserError, run  # noqa: E402
from utils.gen.pipelines import build_pipeline, load_parts  # noqa: E402

WORDS = ["a red circle", "a green square", "a blue triangle", "a yellow circle", "a red square", "a green triangle",
         "a blue circle", "a yellow square"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (built in code), toy (assets/toy-sd) or a pipeline folder")
    p.add_argument("--tiny_sample_size", type=int, default=8,
                   help="latent size of the tiny model (images are twice as large); larger = more compute per call")
    p.add_argument("--num_prompts", type=int, default=24, help="prompts per round")
    p.add_argument("--batch_size", type=int, default=8, help="generate.py's --batch_size")
    p.add_argument("--num_inference_steps", type=int, default=10, help="denoising steps (both paths)")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (both paths)")
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds of each path; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--png_overlap", type=int, default=0, metavar="SIZE",
                   help="instead: time PNG encoding of SIZE px images alone, torch work alone, and both at once with "
                        "the encoding in a thread, as generate.py's writer (0: off)")
    return p.parse_args(argv)


def model_folder(name: str, scratch: Path, tiny_sample_size: int = 8) -> Path:
    """The pipeline folder for --model."""
    if name == "tiny":
        from utils.families.tiny import build_tiny_pipeline

        return build_tiny_pipeline(scratch / "tiny", sample_size=tiny_sample_size)
    path = ROOT / "assets" / "toy-sd" if name == "toy" else Path(name)
    if name == "toy" and not (path / "model_index.json").is_file():
        print(f"{path} is not there yet: timing an untrained model of the same architecture (same speed)")
        return untrained_toy(scratch / "toy")
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder")
    return path


def untrained_toy(folder: Path) -> Path:
    """utils.toy's pipeline architecture with fresh weights, saved to `folder`."""
    from utils.toy.train import build_models, make_scheduler, make_tokenizer

    tokenizer = make_tokenizer(folder / "tokenizer")
    text_encoder, vae, unet = build_models(tokenizer)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def plain_loop(pipe, prompts: list[str], out: Path, args: argparse.Namespace) -> float:
    """Seconds for `pipe(prompt)` once per prompt, each image saved as PNG."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        image = pipe(prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                     generator=torch.Generator("cpu").manual_seed(i)).images[0]
        image.save(out / f"{i:05d}.png")
    return time.perf_counter() - start


def batched(model: Path, prompt_file: Path, out: Path, args: argparse.Namespace) -> float:
    """Seconds of generate.py's own generation loop (its summary), into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    summary = generate_main(generate_args([
        "--pretrained_model_name_or_path", str(model), "--prompt_path", str(prompt_file), "--image_dir", str(out),
        "--batch_size", str(args.batch_size), "--num_inference_steps", str(args.num_inference_steps),
        "--guidance_scale", str(args.guidance_scale), "--device", "cpu"]))
    return summary["seconds"]


def png_overlap(size: int, n: int = 20) -> dict[str, float]:
    """Seconds for n PNG encodes, for torch matmuls of about the same length, and for both with the encodes in a thread."""
    import io
    import threading

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]  # smooth colour fields plus noise: compresses about like a generated photo
    base = np.stack([np.sin(x / 40) * 60 + 128, np.cos(y / 30) * 60 + 128, (x + y) * 128 / size], -1)
    noise = np.random.default_rng(0).normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))

    def encode() -> None:
        for _ in range(n):
            image.save(io.BytesIO(), format="PNG")

    m = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))

    def compute(count: int) -> None:
        for _ in range(count):
            m @ m

    t = time.perf_counter()
    encode()
    alone = time.perf_counter() - t
    t = time.perf_counter()
    compute(10)
    count = max(1, round(10 * alone / (time.perf_counter() - t)))  # as long as the encodes
    t = time.perf_counter()
    compute(count)
    work = time.perf_counter() - t
    writer = threading.Thread(target=encode)
    t = time.perf_counter()
    writer.start()
    compute(count)
    writer.join()
    both = time.perf_counter() - t
    print(f"{n} PNGs of {size} px: {1000 * alone / n:.1f} ms each; encodes {alone:.2f} s, torch work {work:.2f} s, "
          f"both with the encodes in a thread {both:.2f} s (one after the other: {alone + work:.2f} s)")
    return {"png_ms": 1000 * alone / n, "encode_s": alone, "work_s": work, "overlapped_s": both}


def main(args: argparse.Namespace) -> dict[str, float]:
    """Time both paths and print a table with the ratio."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.png_overlap:
        return png_overlap(args.png_overlap)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = model_folder(args.model, scratch, args.tiny_sample_size)
        prompts = [WORDS[i % len(WORDS)] for i in range(args.num_prompts)]
        prompt_file = scratch / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        pipe = build_pipeline(StableDiffusionPipeline, load_parts(str(model), None, torch.float32), torch.device("cpu"))
        pipe(prompts[:1], num_inference_steps=1)  # warm-up of both batch shapes
        pipe(prompts[:args.batch_size], num_inference_steps=1)
        loop_s, batch_s = [], []
        for r in range(args.repeats):
            loop_s.append(plain_loop(pipe, prompts, scratch / "loop", args))
            batch_s.append(batched(model, prompt_file, scratch / "batched", args))
    n = args.num_prompts
    loop, batch = n / min(loop_s), n / min(batch_s)
    print(f"\nmodel {args.model}, {n} prompts, {args.num_inference_steps} steps, guidance {args.guidance_scale}, "
          f"{pipe.unet.config.sample_size * pipe.vae_scale_factor}px, {torch.get_num_threads()} threads, fp32 CPU, "
          f"best of {args.repeats}")
    print("| path                                   | images/s | s / image |")
    print("|----------------------------------------|---------:|----------:|")
    print(f"| plain loop, pipe(prompt) per prompt    | {loop:8.2f} | {1 / loop:9.3f} |")
    print(f"| generate.py, --batch_size {args.batch_size:<12} | {batch:8.2f} | {1 / batch:9.3f} |")
    print(f"ratio (generate.py / plain loop): {batch / loop:.2f}x")
    return {"loop_images_per_s": loop, "generate_images_per_s": batch, "ratio": batch / loop}


if __name__ == "__main__":
    run(main, parse_args)
