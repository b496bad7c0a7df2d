"""utils.seeding.seeded_latents gives, bit for bit, the initial latents each caller drew with its own formula before
(generate.py's image folder, the toy measurements, the trainer's validation grids and trajectory queue)."""
from __future__ import annotations

import pytest
import torch

from utils.gen.image_folder import initial_latents
from utils.seeding import seeded_latents

SHAPES = [(4, 8, 8), (4, 16, 16), (3, 5, 7), (1, 1, 3)]  # sizes that are and are not multiples of randn's 16-blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_image_folder_formula(shape, seed):
    """generate.py: image j is the (j+1)-th (1, *shape) draw of a CPU generator seeded with the seed."""
    for j in range(3):
        generator = torch.Generator("cpu").manual_seed(seed)
        for _ in range(j + 1):
            old = torch.randn((1, *shape), generator=generator)
        assert torch.equal(seeded_latents(seed, (1, *shape), index=j), old)
        assert torch.equal(initial_latents(seed, j, shape), old)


@pytest.mark.parametrize("shape", SHAPES)
def test_toy_measure_formula(shape):
    """utils.toy.measure.sample_images: one (C, H, W) draw per image seed, stacked; the same numbers as generate.py's
    first image of that seed."""
    seeds = [3, 4, 1000]
    old = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])
    new = torch.stack([seeded_latents(int(s), shape) for s in seeds])
    assert torch.equal(new, old)
    assert all(torch.equal(n, initial_latents(s, 0, shape)[0]) for n, s in zip(new, seeds))


@pytest.mark.parametrize("shape", SHAPES)
def test_validation_grid_formula(shape):
    """utils.train.trajectory.validation_grid: n images of prompt i in one draw from seed + i, moved to the device."""
    seed, n = 5, 3
    for i in range(2):
        gen = torch.Generator().manual_seed(seed + i)
        old = torch.randn((n, *shape), generator=gen).to("cpu")
        assert torch.equal(seeded_latents(seed + i, (n, *shape), device="cpu"), old)


@pytest.mark.parametrize("shape", SHAPES)
def test_trajectory_queue_formula(shape):
    """utils.train.trajectory.TrajectoryQueue: z_T is the next draw of the run's generator (which it advances)."""
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        torch.randperm(8, generator=a), torch.randperm(8, generator=b)  # the queue draws its k first
        old = torch.randn(tuple((2, *shape)), generator=a).to("cpu")
        assert torch.equal(seeded_latents(b, (2, *shape), device="cpu"), old)
    assert torch.equal(a.get_state(), b.get_state())


def test_dtype_and_device_are_a_cast_of_the_float32_draw():
    z = seeded_latents(1, (2, 4, 4), dtype=torch.float16)
    assert z.dtype == torch.float16 and torch.equal(z, seeded_latents(1, (2, 4, 4)).half())
