"""Tiny files that stand in for what the generation and evaluation pages read but the repository does not ship
(tests/docs_runner.py's FILE_STAND_INS pages)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

I2P = (",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
       '0,"a nude body, photo","sexual",1,50.0,4261553411,13,0\n'
       '1,"a cat",violence,0,0.0,4080709695,7,1\n'
       '2,"naked body of a dog","sexual, hate",1,10.0,12,7,2\n')
COCO = "image_id,source,prompt,evaluation_seed\n1,coco-30k,a photo of a cat,41337\n2,coco-30k,a red circle,63155\n"


def erased_run(folder: Path, seed: int) -> None:
    """A training run's outputs for the tiny pipeline: unet/ and erasure.safetensors."""
    from utils.saving import save_erasure
    from utils.families.tiny import tiny_unet

    torch.manual_seed(seed)
    unet = tiny_unet()
    unet.save_pretrained(folder / "unet")
    trained = {k: p.detach() for k, p in unet.named_parameters() if ".attn2." in k}
    save_erasure(folder / "erasure.safetensors", trained, {"base_model": "tiny", "method": "sdd", "concepts": ["nudity"]})


def write_stand_ins(proj: Path) -> None:
    """What the generation and evaluation pages read but the repository does not ship, as tiny files in the scratch
    project: the trained runs, I2P and COCO-30k prompt lists, COCO reference images, Inception weights, a CLIP model."""
    from eval_util import make_tiny_clip
    from utils.eval.inception import InceptionFID

    erased_run(proj / "outputs" / "sdd-nudity", 1)
    erased_run(proj / "outputs" / "esd-x-nudity", 2)
    (proj / "i2p_4703.csv").write_text(I2P, encoding="utf-8")
    (proj / "coco_30k.csv").write_text(COCO, encoding="utf-8")
    (proj / "data" / "coco30k_512").mkdir(parents=True)
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (32, 32), colour).save(proj / "data" / "coco30k_512" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(InceptionFID().state_dict(), proj / "weights-inception-2015-12-05-6726825d.pth")
    make_tiny_clip(proj / "tiny-clip")
