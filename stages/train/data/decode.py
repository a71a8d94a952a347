"""Image bytes to the batch tensor open_clip's transform would give, faster per worker."""

from __future__ import annotations

import contextlib
import hashlib
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.common.shards import SampleKeys
from stages.train.data.pool import batch_tensor


class ImageDecoder:
    """Decode image bytes and apply open_clip's transform, faster when the transform allows.

    open_clip's transforms end with ToTensor + Normalize; here those two run per batch instead:
    each sample's uint8 image is written straight into the batch's normalized float tensor, which a
    DataLoader worker keeps in shared memory (`BufferPool`), so handing the batch over copies
    nothing (torch.stack + the move into shared memory are two 38 MB copies per 64 x 224 px
    batch, each paying page faults on fresh memory). When the first geometric step resizes
    (RandomResizedCrop, Resize: open_clip's train and val transforms), JPEGs decode in draft mode:
    libjpeg's DCT scaling by 1/2, 1/4 or 1/8, the smallest that keeps both sides at least the
    output size. Images are converted to RGB once, and only when they are not RGB already. Any
    other transform is applied per sample as given.
    """

    def __init__(self, preprocess: Callable, keys: SampleKeys | None = None, draft: bool = True):
        """`draft=False`: full JPEG decodes, so the pixels are exactly the transform's own."""
        self.preprocess = preprocess
        self.keys = keys or SampleKeys()
        steps = list(getattr(preprocess, "transforms", []))
        # timm's transforms (open_clip's aug_cfg use_timm) draw from NumPy's RNG as well
        self.numpy_rng = any(type(t).__module__.startswith("timm") for t in steps) or not steps
        names = [type(t).__name__ for t in steps]
        self.fast = len(steps) >= 2 and names[-1] == "Normalize" and names[-2] in ("ToTensor", "MaybeToTensor")
        self.draft_size = 0
        if self.fast:
            # decode() already gives RGB: the transform's own RGB conversion would only copy
            self.geometric = [s for s in steps[:-2] if not _is_rgb_conversion(s)]
            norm = steps[-1]
            self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
            self.std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1) * 255.0
            self.draft_size = _draft_size(self.geometric) if draft else 0

    def open(self, data: bytes) -> Image.Image:
        """The decoded RGB image; a JPEG in draft mode (never smaller than draft_size) when allowed.
        Raises `Unusable` for bytes that are no image or hold more pixels than the limit."""
        return self.keys.open_image(data, self.draft_size)

    def decode(self, data: bytes, seed: int | None = None) -> Any:
        """One sample: the transformed PIL image (fast path) or the transform's tensor.

        With `seed`, the transform's random draws (crops, flips, jitter) come from that seed alone,
        so a sample is augmented the same whichever worker, rank or resumed run decodes it.
        """
        img = self.open(data)
        with seeded(seed, self.numpy_rng):
            if not self.fast:
                return self.preprocess(img)
            for step in self.geometric:
                img = step(img)
            return img

    def batch_shape(self, images: list[Any]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the tensor `collate` makes of these decoded samples."""
        if not self.fast:
            return (len(images), *images[0].shape), images[0].dtype
        width, height = images[0].size
        return (len(images), 3, height, width), torch.float32

    def collate(self, images: list[Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """The batch as one tensor, written into `out` when given (else a new one, in shared
        memory inside a DataLoader worker)."""
        if out is None:
            out = batch_tensor(*self.batch_shape(images))
        if not self.fast:
            return torch.stack(images, out=out)
        width, height = images[0].size
        with warnings.catch_warnings():  # torch warns that PIL's buffer is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            for row, img in zip(out, images, strict=True):
                if img.size != (width, height):
                    raise ValueError(f"the transform gave images of sizes {(width, height)} and "
                                     f"{img.size}: they cannot form one batch")
                pixels = torch.from_numpy(np.asarray(img))  # H, W, C uint8, no copy
                # one sample at a time, so the in-place normalize works on data still in the cache
                row.copy_(pixels.permute(2, 0, 1))
                row.sub_(self.mean).div_(self.std)
        return out


@contextlib.contextmanager
def seeded(seed: int | None, numpy_too: bool = False) -> Iterator[None]:
    """torch's and Python's global RNGs (what torchvision's and open_clip's transforms draw from;
    NumPy's too for timm's, which use it) seeded with `seed` inside, and given back after.

    torch's default generator is seeded directly: `torch.manual_seed` also visits every device
    backend and costs ~100x more per sample. NumPy's state is the costly one to restore (~80 us),
    hence only for transforms that use it.
    """
    if seed is None:
        yield
        return
    generator = torch.default_generator
    torch_state, py_state = generator.get_state(), random.getstate()
    np_state = np.random.get_state() if numpy_too else None
    generator.manual_seed(seed)
    random.seed(seed)
    if numpy_too:
        np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from what names a sample in a pass (run seed, epoch, shard, key)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip's MaybeConvertMode('RGB') (or the older _convert_to_rgb function)."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"


def _draft_size(steps: list[Any]) -> int:
    """The size JPEG draft mode may decode to: the output size when the first geometric step
    resizes the whole image to it (RandomResizedCrop, Resize), else 0 (no draft: a crop before
    any resize would see a different part of a smaller image)."""
    if not steps or type(steps[0]).__name__ not in ("RandomResizedCrop", "Resize"):
        return 0
    size = getattr(steps[0], "size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
        return int(max(size))
    return 0


