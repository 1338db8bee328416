"""The synthetic world's pictures: coloured shapes and short words, and the questions asked about them.

A scene is a few shapes (circle, square, triangle) in four colours (red, green, blue, yellow) on a light
grey square canvas of 56, 84 or 112 pixels (2×2, 3×3 or 4×4 LLM tokens after the 28-pixel merge).
Everything a question asks is visible at that size, and every answer is a word or a number from a vocabulary
of a few dozen words, so a ~1M-parameter model can learn the world on a CPU. The wording of each question
type is a single fixed template for the same reason: the model should learn to look, not to parse.

Each question family is a function ``(rng, split) -> QA``: the rendered media, the question, the correct
answer and a *subtly* wrong one (off by one, the other side, another colour) that preference pairs use.
`keye.data.synthetic` turns a `QA` into samples of every kind.

Held-out scenes: a scene belongs to the held-out split when a hash of its content falls in one bucket of
`HELDOUT_BUCKETS` (`in_split`), so no picture of the held-out split is ever drawn for training, even though
the tiny world makes coincidences likely. Families redraw a scene until it falls in the asked split.
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, TypeVar

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
TEXT_COLOR = (20, 20, 20)
IMAGE_SIZES = (56, 84, 112)  # multiples of 28: whole LLM tokens
#: words for the OCR task: three letters, all legible in PIL's default font at 14 px
WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "pen", "map", "bus", "key", "egg", "car")
COUNT_WORDS = ("shapes", "circles", "squares", "triangles")

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 8  # one content hash bucket in 8 is held out

T = TypeVar("T")


@dataclass
class QA:
    """One question about one rendered image or video, with its answer and a subtly wrong answer.

    ``reasoning`` (when a family can explain itself) is the step-by-step text of a ``<think>`` trace that
    ends in ``answer``; ``meta`` says what was asked (family, target) for per-family evaluation.
    """

    family: str
    media: bytes
    media_type: str  # "image" (PNG bytes) or "video" (MP4 bytes)
    question: str
    answer: str
    wrong: str
    reasoning: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def extension(self) -> str:
        return "png" if self.media_type == "image" else "mp4"


def in_split(signature: object, split: str) -> bool:
    """Whether content with this signature (a repr-stable value) belongs to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    held_out = zlib.crc32(repr(signature).encode()) % HELDOUT_BUCKETS == 0
    return held_out == (split == "heldout")


def draw_in_split(rng: random.Random, split: str, make: Callable[[], T], signature: Callable[[T], object]) -> T:
    """Call ``make`` until its result belongs to ``split`` (1 in 8 draws does for held-out)."""
    for _ in range(10_000):
        value = make()
        if in_split(signature(value), split):
            return value
    raise RuntimeError(f"no {split} content found in 10000 draws")  # a bug: the buckets are balanced


# --- scenes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A shape in a scene. ``box`` is pixel edges ``(x1, y1, x2, y2)`` with x2, y2 exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class Scene:
    size: int
    shapes: tuple[Shape, ...]

    def left_to_right(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: (s.center[0], s.center[1]))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, box: tuple[int, int, int, int]) -> None:
    """Draw one filled shape inside its box (exclusive right/bottom edges, as PIL's inclusive ones minus 1)."""
    x1, y1, x2, y2 = box
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        draw_shape(draw, s.shape, s.color, s.box)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # no timestamps or metadata: same pixels, same bytes
    return buffer.getvalue()


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], gap: int) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + gap and b[0] < x2 + gap and y1 < b[3] + gap and b[1] < y2 + gap for b in others)


def random_scene(
    rng: random.Random,
    count: int,
    *,
    size: int | None = None,
    region: tuple[float, float, float, float] | None = None,
    unique_shapes: bool = False,
    unique_colors: bool = False,
) -> Scene:
    """``count`` non-overlapping shapes, each (colour, shape) pair at most once so names are unambiguous.

    ``region`` (fractions of the canvas: x1, y1, x2, y2) confines the *first* shape, e.g. to the left half.
    ``unique_shapes`` / ``unique_colors`` make every shape kind / colour appear at most once.
    """
    size = size or rng.choice(IMAGE_SIZES if count <= 2 else IMAGE_SIZES[1:])  # room for 3+ shapes
    while True:  # restart with a fresh layout when shapes do not fit (rare)
        kinds = _distinct_kinds(rng, count, unique_shapes, unique_colors)
        boxes: list[tuple[int, int, int, int]] = []
        for i in range(count):
            side = rng.randint(size // 6, size // 4)
            fx1, fy1, fx2, fy2 = region if (region and i == 0) else (0.0, 0.0, 1.0, 1.0)
            lo_x, hi_x = int(fx1 * size) + 1, int(fx2 * size) - side - 1
            lo_y, hi_y = int(fy1 * size) + 1, int(fy2 * size) - side - 1
            for _ in range(100):
                x, y = rng.randint(lo_x, max(lo_x, hi_x)), rng.randint(lo_y, max(lo_y, hi_y))
                box = (x, y, x + side, y + side)
                if not _overlaps(box, boxes, 2):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return Scene(size, tuple(Shape(k[0], k[1], b) for k, b in zip(kinds, boxes)))


def _distinct_kinds(rng: random.Random, count: int, unique_shapes: bool, unique_colors: bool) -> list[tuple[str, str]]:
    kinds: list[tuple[str, str]] = []
    while len(kinds) < count:
        kind = (rng.choice(SHAPES), rng.choice(list(COLORS)))
        if kind in kinds or (unique_shapes and any(k[0] == kind[0] for k in kinds)):
            continue
        if unique_colors and any(k[1] == kind[1] for k in kinds):
            continue
        kinds.append(kind)
    return kinds


def list_phrase(items: list[str]) -> str:
    """``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _other(rng: random.Random, options: tuple[str, ...] | list[str], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


# --- grounding format (spec §1.6): integer coordinates normalised to [0, 1000) -------------------------


def box_to_1000(box: tuple[int, int, int, int], size: int) -> list[int]:
    """Pixel edges → ``[x1, y1, x2, y2]`` integers in [0, 1000): scaled by 1000/size, floored, clamped to 999."""
    return [min(999, v * 1000 // size) for v in box]


def format_box(coords: list[int]) -> str:
    return "<|box_start|>[[" + ",".join(str(v) for v in coords) + "]]<|box_end|>"


def object_ref(name: str) -> str:
    return f"<|object_ref_start|>{name}<|object_ref_end|>"


# --- question families --------------------------------------------------------------------------------


def _scene(rng: random.Random, split: str, **kwargs) -> Scene:
    return draw_in_split(rng, split, lambda: random_scene(rng, **kwargs), lambda scene: scene)


def caption_qa(rng: random.Random, split: str) -> QA:
    """"Describe the image." → the shapes from left to right; also the caption of contrastive pairs."""
    scene = _scene(rng, split, count=rng.randint(1, 3))
    names = [f"a {s.name}" for s in scene.left_to_right()]
    wrong_index = rng.randrange(len(names))
    wrong_shape = scene.left_to_right()[wrong_index]
    wrong_names = list(names)
    wrong_names[wrong_index] = f"a {_other(rng, list(COLORS), wrong_shape.color)} {wrong_shape.shape}"
    return QA(
        "caption", png_bytes(render_scene(scene)), "image", "Describe the image.",
        list_phrase(names), list_phrase(wrong_names), meta={"shapes": len(names)},
    )  # fmt: skip


def count_qa(rng: random.Random, split: str) -> QA:
    """"How many red shapes are there?" with a step-by-step trace: list the shapes, keep the matching ones."""
    scene = _scene(rng, split, count=rng.randint(1, 5))
    what = rng.choice(["all", "color", "shape"])
    if what == "all":
        noun, keep = "shapes", list(scene.shapes)
    elif what == "color":
        color = rng.choice(list(COLORS))
        noun, keep = f"{color} shapes", [s for s in scene.shapes if s.color == color]
    else:
        shape = rng.choice(SHAPES)
        noun, keep = f"{shape}s", [s for s in scene.shapes if s.shape == shape]
    n = len(keep)
    seen = list_phrase([f"a {s.name}" for s in scene.left_to_right()])
    if what == "all":
        steps = f"From left to right I see {seen}."
    elif keep:
        chosen = list_phrase([f"the {s.name}" for s in sorted(keep, key=lambda s: s.center)])
        steps = f"From left to right I see {seen}. The {noun} are {chosen}."
    else:
        steps = f"From left to right I see {seen}. None of them is one of the {noun}."
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    return QA(
        "count", png_bytes(render_scene(scene)), "image", f"How many {noun} are there?", str(n), str(wrong),
        reasoning=f"{steps} That makes {n}.", meta={"counted": what},
    )  # fmt: skip


def color_qa(rng: random.Random, split: str) -> QA:
    """"What colour is the circle?" (every shape kind appears at most once in the scene)."""
    scene = _scene(rng, split, count=rng.randint(1, 3), unique_shapes=True)
    target = rng.choice(scene.shapes)
    return QA(
        "color", png_bytes(render_scene(scene)), "image", f"What colour is the {target.shape}?",
        target.color, _other(rng, list(COLORS), target.color), meta={"target": target.name},
    )  # fmt: skip


def shape_qa(rng: random.Random, split: str) -> QA:
    """"What shape is the red one?" (every colour appears at most once in the scene)."""
    scene = _scene(rng, split, count=rng.randint(1, 3), unique_colors=True)
    target = rng.choice(scene.shapes)
    return QA(
        "shape", png_bytes(render_scene(scene)), "image", f"What shape is the {target.color} one?",
        target.shape, _other(rng, SHAPES, target.shape), meta={"target": target.name},
    )  # fmt: skip


_SIDES = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def position_qa(rng: random.Random, split: str) -> QA:
    """"Is the red circle on the left or on the right?" The shape lies wholly in that half of the canvas."""
    side = rng.choice(list(_SIDES))
    scene = _scene(rng, split, count=rng.randint(1, 3), region=_SIDES[side])
    target = scene.shapes[0]
    if side in ("left", "right"):
        question = f"Is the {target.name} on the left or on the right?"
    else:
        question = f"Is the {target.name} at the top or at the bottom?"
    return QA(
        "position", png_bytes(render_scene(scene)), "image", question, side, _OPPOSITE[side],
        meta={"target": target.name},
    )  # fmt: skip


def grounding_qa(rng: random.Random, split: str) -> QA:
    """"Locate <ref>the red circle</ref>." → its box in [0, 1000) coordinates (spec §1.6 format).

    The wrong box is the right one shifted by half a shape, so it still overlaps the object.
    """
    scene = _scene(rng, split, count=rng.randint(1, 4))
    target = rng.choice(scene.shapes)
    x1, y1, x2, y2 = target.box
    dx, dy = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
    half = (x2 - x1) // 2
    shifted = (x1 + dx * half, y1 + dy * half, x2 + dx * half, y2 + dy * half)
    shifted = tuple(min(max(v, 0), scene.size) for v in shifted)
    return QA(
        "grounding", png_bytes(render_scene(scene)), "image",
        f"Locate {object_ref('the ' + target.name)} in the image.",
        format_box(box_to_1000(target.box, scene.size)), format_box(box_to_1000(shifted, scene.size)),
        meta={"target": target.name, "box": box_to_1000(target.box, scene.size)},
    )  # fmt: skip


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class _Text:
    word: str
    size: int
    font_size: int
    x: int
    y: int


def _random_text(rng: random.Random) -> _Text:
    size = rng.choice(IMAGE_SIZES)
    font_size = rng.randint(max(14, size // 5), max(14, size // 3))
    word = rng.choice(WORDS)
    left, top, right, bottom = _font(font_size).getbbox(word)
    x = rng.randint(1 - left, max(1 - left, size - right - 1))
    y = rng.randint(1 - top, max(1 - top, size - bottom - 1))
    return _Text(word, size, font_size, x, y)


def ocr_qa(rng: random.Random, split: str) -> QA:
    """"What word is written in the image?" A three-letter word in PIL's default font (FreeType, 14+ px)."""
    text = draw_in_split(rng, split, lambda: _random_text(rng), lambda t: t)
    image = Image.new("RGB", (text.size, text.size), BACKGROUND)
    ImageDraw.Draw(image).text((text.x, text.y), text.word, font=_font(text.font_size), fill=TEXT_COLOR)
    wrong = list(text.word)
    position = rng.randrange(len(wrong))
    wrong[position] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != wrong[position]])
    return QA(
        "ocr", png_bytes(image), "image", "What word is written in the image?", text.word, "".join(wrong),
        meta={"word": text.word},
    )  # fmt: skip


#: question families about images, by name
IMAGE_FAMILIES: dict[str, Callable[[random.Random, str], QA]] = {
    "caption": caption_qa,
    "count": count_qa,
    "color": color_qa,
    "shape": shape_qa,
    "position": position_qa,
    "grounding": grounding_qa,
    "ocr": ocr_qa,
}
