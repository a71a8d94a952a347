"""Zero-shot classifier weights, built once per evaluation with the classes split over the ranks.

Each rank encodes its share of the classes with open_clip's `build_zero_shot_classifier` (every
template encoded, normalised, averaged, normalised: CLIP_benchmark's zero_shot_classifier), then
the shares are gathered, so N ranks do 1/N of the text encoding each instead of all of it.
Imports torch lazily: `import stages.common` stays torch-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence


def template_fn(template: str) -> Callable[[str], str]:
    # CLIP_benchmark templates name the class {c}; str.format would also trip on other braces.
    return lambda classname: template.replace("{c}", classname)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
               amp: Callable = contextlib.nullcontext) -> torch.Tensor:  # noqa: F821
    """[embed_dim, classes] fp32 on the CPU, identical on every rank."""
    import open_clip
    import torch
    import torch.distributed as dist

    rank, world = _world()
    share = -(-len(classnames) // world)
    mine = list(classnames[rank * share:(rank + 1) * share])
    weights = None
    if mine:
        with torch.no_grad(), amp():
            weights = open_clip.build_zero_shot_classifier(
                model, tokenizer, mine, [template_fn(t) for t in templates],
                num_classes_per_batch=10, device=device, use_tqdm=False).float().cpu()
    if world == 1:
        return weights
    parts: list = [None] * world
    dist.all_gather_object(parts, weights)
    return torch.cat([p for p in parts if p is not None], dim=1)
