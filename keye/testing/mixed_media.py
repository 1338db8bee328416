"""A JSONL data set of conversations whose sizes differ as real multimodal data does, for balancing checks.

The synthetic world's samples are all about the same size (one small image or a short tiny clip, one short
question). FLOPs balancing only shows on data whose samples differ by orders of magnitude, so this writes
a mix of text-only turns, images from a thumbnail to a page, and videos from a few frames to a few dozen,
with questions and answers from a few words to a few hundred. Deterministic in ``seed``; PNG and MP4 files
beside the JSONL, named by the JSONL's relative paths (the ``jsonl`` source reads them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

#: words from the synthetic world's vocabulary, so the tiny BPE tokenizer keeps them short
WORDS = ("the red square is left of a blue circle how many shapes are there what color is it "
         "count yellow green triangle moves right then up first second answer because").split()


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_mixed_dataset(folder: str | Path, num_samples: int, seed: int = 0, *, video_share: float = 0.3,
                        image_share: float = 0.5) -> Path:
    """Write ``num_samples`` conversations (videos, images, text only, by the shares) and return the JSONL path."""
    from keye.data.synthetic_video import mp4_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for index in range(num_samples):
        draw = rng.random()
        content: list[dict] = []
        if draw < video_share:
            frames, side = rng.randint(4, 32), rng.choice([56, 112])
            colours = np.array([rng.randrange(256) for _ in range(3)])
            clip = [np.broadcast_to(((colours + 5 * t) % 256).astype(np.uint8), (side, side, 3)).copy() for t in range(frames)]
            (folder / f"{index:05d}.mp4").write_bytes(mp4_bytes(clip, fps=4))
            content.append({"type": "video", "video": {"path": f"{index:05d}.mp4"}})
        elif draw < video_share + image_share:
            width, height = rng.randint(28, 900), rng.randint(28, 900)
            Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3))).save(folder / f"{index:05d}.png")
            content.append({"type": "image", "image": {"path": f"{index:05d}.png"}})
        content.append({"type": "text", "text": _words(rng, 2, 20) + "?"})
        lines.append({"kind": "conversation", "key": f"mixed-{index:05d}", "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": _words(rng, 1, 60)},
        ]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
