"""The demo dataset: coloured shapes drawn with PIL, captioned in varied words.

Twelve classes (4 shapes × 3 colours) that differ in ways a small CLIP sees at 64 px; position,
size, rotation, background shade and caption wording vary so the model must learn shape and
colour, not pixels. Everything follows from the seed.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230)}
CLASSNAMES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
CAPTIONS = ("a photo of a {size}{c}", "a {size}{c} {where}", "a drawing of a {c}", "{c}",
            "an image showing a {size}{c} {where}", "a {c} on a plain background",
            "a picture of one {size}{c}", "there is a {c} {where}")
EVAL_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c}.", "an image showing a {c}.")


@dataclass
class DemoSample:
    key: str
    label: int
    classname: str
    caption: str
    png: bytes


def _where(cx: float, cy: float) -> str:
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else "centre"
    return "in the centre" if (row, col) == ("middle", "centre") else f"in the {row} {col}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    w = r / 3  # cross: a plus sign, twelve corners
    pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
           (-r, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw(shape: str, colour: str, size: int, rng: random.Random) -> tuple[Image.Image, str, str]:
    """One image; returns it with its size word and position phrase for the caption."""
    shade = rng.randint(205, 250)
    image = Image.new("RGB", (size, size), (shade, shade, rng.randint(max(shade - 15, 0), shade)))
    scale = rng.uniform(0.18, 0.36)
    r = scale * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    jitter = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    canvas = ImageDraw.Draw(image)
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    else:
        canvas.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=jitter)
    size_word = "small " if scale < 0.24 else "large " if scale > 0.31 else ""
    return image, size_word, _where(cx / size, cy / size)


def sample(index: int, seed: int, size: int, prefix: str = "") -> DemoSample:
    """Sample `index` of the dataset with this seed: the same bytes every time."""
    rng = random.Random(f"{seed}:{prefix}:{index}")
    label = rng.randrange(len(CLASSNAMES))
    colour, shape = CLASSNAMES[label].split(" ")
    image, size_word, where = draw(shape, colour, size, rng)
    caption = rng.choice(CAPTIONS).format(c=CLASSNAMES[label], size=size_word, where=where)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return DemoSample(key=f"{prefix}{index:06d}", label=label, classname=CLASSNAMES[label],
                      caption=caption, png=buf.getvalue())
