"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states are concatenated (768 + 1280 = 2048 on
SDXL base), the second one's projected pooled embedding, and the size/crop time ids, all given to the U-Net
(added_cond_kwargs); DDIM for training's trajectories. diffusers has no SLD or SEGA for SDXL."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from utils.cli import UserError
from utils.families.base import Cond, Family
from utils.families.sd import SD
from utils.loading import check_model_source, from_pretrained

EMBEDDING_KEYS = ("clip_l", "clip_g")  # SDXL textual-inversion files: text_encoder's rows, text_encoder_2's
REFUSED = {  # model_index.json classes that look like SDXL but are not the text-to-image base model
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner / image-to-image checkpoint",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting checkpoint",
}


@dataclass
class SDXLParts:
    """The parts of an SDXL checkpoint that training needs."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    vae: AutoencoderKL | None
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler


def _pipelines() -> dict[str, type]:
    """StableDiffusionXLPipeline, imported without transformers' torchvision notice (we use no image processor)."""
    old = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionXLPipeline
    finally:
        transformers_logging.set_verbosity(old)
    return {"sd": StableDiffusionXLPipeline}


class SDXL(Family):
    """SDXL base (1.0 and models of its shape)."""

    name = "sdxl"
    parts_class = "SDXLParts"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    # the same diffusers module names (attn2 = cross-attention); the prompt is also read by add_embedding, the MLP over
    # text_encoder_2's pooled embedding (and the time ids) whose output is added to the timestep embedding
    SUBSETS = {**SD.SUBSETS, "text": lambda n: ".attn2." in n or n.startswith("add_embedding.")}
    # kohya (and diffusers' reader of its files) name SDXL's add_embedding by the original sgm U-Net's label_emb
    lora_renames = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    TEXT_EXTRAS = ("text_embeds",)  # the pooled embedding; time_ids are the image's size
    PIPELINES = _pipelines()

    def load(self, name: str, revision: str | None = None, variant: str | None = None) -> SDXLParts:
        """Both tokenizers and text encoders, VAE, U-Net (checked to be a base text-to-image one) and DDIM."""
        check_model_source(name)
        kw = dict(revision=revision)
        unet = self.load_unet(name, variant=variant, **kw)
        parts = dict(
            tokenizer=from_pretrained(CLIPTokenizer, name, subfolder="tokenizer", **kw),
            tokenizer_2=from_pretrained(CLIPTokenizer, name, subfolder="tokenizer_2", **kw),
            text_encoder=from_pretrained(CLIPTextModel, name, subfolder="text_encoder", variant=variant, **kw),
            text_encoder_2=from_pretrained(CLIPTextModelWithProjection, name, subfolder="text_encoder_2",
                                           variant=variant, **kw),
            vae=from_pretrained(AutoencoderKL, name, subfolder="vae", variant=variant, **kw))
        local = Path(name).expanduser().exists()
        config = DDIMScheduler.load_config(name, subfolder="scheduler", revision=revision) if local \
            else from_pretrained(DDIMScheduler, name, subfolder="scheduler", **kw).config
        return SDXLParts(**parts, unet=unet, scheduler=DDIMScheduler.from_config(config))

    def load_unet(self, name: str, **kwargs) -> UNet2DConditionModel:
        """The U-Net of a pipeline folder, hub id or U-Net folder; UserError unless it is an SDXL base U-Net."""
        sub = {} if (Path(name).expanduser() / "config.json").is_file() else {"subfolder": "unet"}
        unet = from_pretrained(UNet2DConditionModel, name, **sub, **kwargs)
        self.check_unet(unet, name)
        return unet

    def check_unet(self, unet: torch.nn.Module, source: str) -> None:
        """One line when the U-Net is not SDXL base's kind (text_time conditioning, 4 latent channels)."""
        config = unet.config
        if config.addition_embed_type != "text_time":
            raise UserError(f"the U-Net of {source} is not an SDXL U-Net (it takes no pooled text embedding and "
                            f"time ids)")
        if config.in_channels != config.out_channels:
            raise UserError(f"the U-Net of {source} takes {config.in_channels} input channels: an inpainting "
                            f"U-Net, not SDXL base's")
        if config.projection_class_embeddings_input_dim is not None and config.addition_time_embed_dim:
            ids = (config.projection_class_embeddings_input_dim - self.pooled_width(unet)) // \
                config.addition_time_embed_dim
            if ids != 6:
                raise UserError(f"the U-Net of {source} takes {ids} time ids, not SDXL base's 6 (an SDXL refiner "
                                f"takes 5, with an aesthetic score)")

    @staticmethod
    def pooled_width(unet: torch.nn.Module) -> int:
        """Width of the pooled text embedding the U-Net's added embedding expects."""
        c = unet.config
        return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim

    def load_text(self, tokenizer_path: str | None, text_encoder_path: str | None) -> dict:
        """--tokenizer_path / --text_encoder_path replace SD 1.x/2.x's single encoder; not for SDXL's two."""
        if tokenizer_path or text_encoder_path:
            raise UserError("--tokenizer_path / --text_encoder_path replace one text encoder; an SDXL model has two "
                            "(use --textual_inversion for new tokens)")
        return {}

    @torch.no_grad()
    def encode(self, parts: SDXLParts, prompts: Sequence[str], device: torch.device,
               size: tuple[int, int] | None = None) -> dict[str, Cond]:
        """Each distinct prompt's condition (caption_cond), computed in one pass."""
        unique = list(dict.fromkeys(prompts))
        cond = self.caption_cond(parts, unique, device, size)
        return {p: Cond(cond.hidden[i:i + 1], {k: v[i:i + 1] for k, v in cond.extra.items()})
                for i, p in enumerate(unique)}

    def caption_cond(self, parts: SDXLParts, captions: Sequence[str], device: torch.device,
                     size: tuple[int, int] | None = None, runs: Sequence[Callable] | None = None) -> Cond:
        """Both encoders' penultimate hidden states concatenated, text_encoder_2's projected pooled embedding, and
        time ids (h, w, 0, 0, h, w) at `size` (default: the model's resolution); runs[i] in place of encoder i."""
        h, w = size or (self.default_resolution(parts),) * 2
        encoders = (parts.text_encoder, parts.text_encoder_2)
        hidden, pooled = [], None
        for tok, enc, run in zip(self.tokenizers(parts), encoders, runs or encoders):
            ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = run(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(device))
            if enc is parts.text_encoder_2:  # the one with the projection
                pooled = out.text_embeds.to(device)
        states = torch.cat(hidden, dim=-1)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=states.dtype, device=device).expand(len(states), -1)
        return Cond(states, {"text_embeds": pooled, "time_ids": time_ids})

    def tokenizers(self, parts) -> list:
        """tokenizer (CLIP-L's) and tokenizer_2 (CLIP-G's)."""
        return [parts.tokenizer, parts.tokenizer_2]

    def free_text(self, parts: SDXLParts) -> None:
        """Drop both text encoders."""
        parts.text_encoder = parts.text_encoder_2 = None

    def text_encoders(self, parts) -> list:
        """The text encoders still loaded (cast together with the U-Net)."""
        return [e for e in (parts.text_encoder, parts.text_encoder_2) if e is not None]

    def unet_kwargs(self, cond: Cond) -> dict:
        """encoder_hidden_states, plus the pooled embedding and time ids as added_cond_kwargs."""
        return {"encoder_hidden_states": cond.hidden, "added_cond_kwargs": dict(cond.extra)}

    def check_text_width(self, parts: dict, text_encoder_path: str | None) -> None:
        """The two encoders' widths add up to the U-Net's cross-attention width."""
        width = parts["text_encoder"].config.hidden_size + parts["text_encoder_2"].config.hidden_size
        if width != parts["unet"].config.cross_attention_dim:
            raise UserError(f"the text encoders give {width}-wide embeddings, but the U-Net's cross-attention takes "
                            f"{parts['unet'].config.cross_attention_dim}")

    def embedding_file(self, placeholder: str, tokens: Sequence[str],
                       learned: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """SDXL's textual-inversion layout: {"clip_l": (N, 768), "clip_g": (N, 1280)} (SDXL base's widths), the
        tokens in the metadata ("tokens": space-separated), for the two load_textual_inversion calls of
        load_embedding."""
        return dict(zip(EMBEDDING_KEYS, learned)), {"tokens": " ".join(tokens)}

    def load_embedding(self, pipe, path: str) -> None:
        """clip_l into text_encoder / tokenizer, clip_g into text_encoder_2 / tokenizer_2, as the tokens its metadata
        names (a file without them: its name, as an (N, D) embedding's p, p_1, ...)."""
        with safe_open(str(path), "pt") as f:
            missing = [k for k in EMBEDDING_KEYS if k not in f.keys()]
            if missing:
                raise UserError(f"it holds no {missing[0]!r} tensor: an SDXL embedding has "
                                f"{' and '.join(EMBEDDING_KEYS)} (attack.py on an SDXL model writes one)")
            tensors, meta = {k: f.get_tensor(k) for k in EMBEDDING_KEYS}, f.metadata() or {}
        tokens = meta["tokens"].split() if meta.get("tokens") else Path(path).stem
        for key, enc, tok in zip(EMBEDDING_KEYS, (pipe.text_encoder, pipe.text_encoder_2),
                                 (pipe.tokenizer, pipe.tokenizer_2)):
            pipe.load_textual_inversion(tensors[key], token=tokens, text_encoder=enc, tokenizer=tok)

    def pipeline(self, mode: str) -> type:
        """StableDiffusionXLPipeline for sd (and neg); SLD and SEGA exist only for SD 1.x/2.x."""
        if mode in ("sld", "sega"):
            raise UserError(f"--pipeline_type {mode} exists only for SD 1.x/2.x: diffusers has no SDXL variant of "
                            f"{'SLD' if mode == 'sld' else 'SEGA'}; use --pipeline_type sd (with --pipeline_config neg "
                            f"for a negative prompt)")
        if mode not in self.PIPELINES:
            raise UserError(f"--pipeline_type {mode} does not exist (choose from {', '.join(self.PIPELINES)})")
        return self.PIPELINES[mode]
