"""From picture files to decoder inputs (report §2.1 and §2.2), exactly as transformers' Gemma3Processor.

    load_image → Pan & Scan views → pixels → VisionModel → soft tokens (encode_image)
    prompt text with <start_of_image> placeholders → ids, embeds, groups (build_prompt)

Each placeholder becomes `\\n\\n<start_of_image>` + mm_tokens soft tokens + `<end_of_image>\\n\\n`;
the soft tokens' embeddings are replaced by the image features, and `groups` gives every soft
token its view's index so the decoder lets a view's tokens attend to each other both ways.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..formats.tokenizer import encode_chat
from .prompt import MultimodalPrompt, encode_prompt

BOI, EOI = "<start_of_image>", "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"
IMAGE_SOFT_TOKEN_ID = 262144  # HF's id, one past the 262,144-piece text vocabulary
# Gemma 3's SigLIP preprocessing (preprocessor_config.json): x / 255, then (x - 0.5) / 0.5.
RESCALE, MEAN, STD = 1 / 255, 0.5, 0.5
# Decompression-bomb guard: Pillow's own default MAX_IMAGE_PIXELS, enforced as an error before
# decoding (Pillow only warns up to twice that).
MAX_PIXELS = 89_478_485
# Smaller images are almost surely mistakes (tracking pixels, spacers), not pictures to describe.
MIN_SIDE = 8


class ImageError(ValueError):
    """An image file that cannot be used; the one-line message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """A decoded RGB image. Animated files (GIF, WebP, APNG) give their first frame, which is
    what transformers reads from them; CMYK, palette, grey and 16-bit images are converted."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _decode(f, str(path))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None


def decode_image(data: bytes, name: str = "image", formats: Sequence[str] | None = None) -> Image.Image:
    """`load_image` for bytes in memory (an uploaded image); `formats` limits the accepted
    Pillow formats (e.g. the one a data URL declares)."""
    import io

    return _decode(io.BytesIO(data), name, formats)


def _decode(f, name: str, formats: Sequence[str] | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the size limit below is enforced as an error instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f)  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image has more than {MAX_PIXELS} pixels (decompression-bomb limit)") from None
    except Exception as e:  # Pillow's header parsers raise OSError, struct.error, EOFError, ... on corrupt data
        raise ImageError(f"{name}: corrupt image header ({_reason(e)})") from None
    with img:
        if formats is not None and img.format not in formats:
            raise ImageError(f"{name}: the data is {img.format}, not the declared {'/'.join(formats)}")
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w}×{h} image has more than {MAX_PIXELS} pixels (decompression-bomb limit)")
        if min(w, h) < MIN_SIDE:
            raise ImageError(f"{name}: {w}×{h} image is too small (at least {MIN_SIDE}×{MIN_SIDE} pixels)")
        try:
            return to_rgb(img)  # decodes: a truncated or corrupt file fails here
        except Exception as e:  # as above: any failure inside Pillow's decoders is a corrupt image
            raise ImageError(f"{name}: corrupt or truncated image ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white, not dropped."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class PanAndScan:
    """Pan & Scan with transformers' Gemma3Processor defaults."""

    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2  # aspect ratio (long / short side) from which an image is cropped

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) crops along the long side, in reading order; [] when the
        image is too square or the crops would be narrower than min_crop_size. Same arithmetic
        as transformers' Gemma3ImageProcessor.pan_and_scan, float rounding included."""
        landscape = width >= height  # a square image takes the landscape branch, as there
        long, short = (width, height) if landscape else (height, width)
        if long / short < self.min_ratio:
            return []
        n = int(math.floor(long / short + 0.5))  # crops closest to the aspect ratio, half rounds up
        n = min(int(math.floor(long / self.min_crop_size)), n)
        n = min(self.max_crops, max(2, n))
        cols, rows = (n, 1) if landscape else (1, n)
        crop_w, crop_h = int(math.ceil(width / cols)), int(math.ceil(height / rows))
        if min(crop_w, crop_h) < self.min_crop_size:
            return []
        # The last crop is cut at the border (numpy slicing there; PIL would pad with black).
        return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
                for y in range(0, rows * crop_h, crop_h) for x in range(0, cols * crop_w, crop_w)]


def views(img: Image.Image, pan_and_scan: PanAndScan | None) -> list[Image.Image]:
    """The full image first, then its Pan & Scan crops."""
    boxes = pan_and_scan.boxes(*img.size) if pan_and_scan else []
    return [img] + [img.crop(box) for box in boxes]


def pixels(img: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] float32 with transformers' arithmetic: Pillow bilinear resize of the uint8
    image, x * (1/255) in float64 rounded to float32, then (x - 0.5) / 0.5 in float32."""
    arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    x = (arr.astype(np.float64) * RESCALE).astype(np.float32)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def encode_image(vision, img: Image.Image, pan_and_scan: PanAndScan | None = PanAndScan()) -> torch.Tensor:
    """Soft tokens [1 + crops, mm_tokens, d_model]: the full image, then each crop."""
    size = vision.config.image_size
    with torch.inference_mode():
        # One view at a time: SigLIP's attention over all patches is the memory peak.
        return torch.cat([vision(pixels(view, size)[None].to(vision.device, vision.dtype))
                          for view in views(img, pan_and_scan)])


def image_sequence(mm_tokens: int, boi: str = BOI, eoi: str = EOI) -> str:
    return f"\n\n{boi}{IMAGE_SOFT_TOKEN * mm_tokens}{eoi}\n\n"


def expand_prompt(text: str, crops: Sequence[int], mm_tokens: int, placeholder: str = BOI, boi: str = BOI,
                  eoi: str = EOI) -> str:
    """Gemma3Processor's text: the i-th placeholder becomes image i's token layout. An image
    with Pan & Scan crops is announced in words, then each crop follows, space-separated."""
    parts = text.split(placeholder)
    if len(parts) - 1 != len(crops):
        raise ValueError(f"the prompt has {len(parts) - 1} {placeholder} placeholders for {len(crops)} images")
    seq = image_sequence(mm_tokens, boi, eoi)
    out = [parts[0]]
    for n, rest in zip(crops, parts[1:]):
        if n:
            out.append(f"Here is the original image {seq} and here are some crops to help you see better "
                       + " ".join([seq] * n))
        else:
            out.append(seq)
        out.append(rest)
    return "".join(out)


def with_placeholders(text: str, n_images: int) -> str:
    """A text without placeholders gets one per image in front, as llama.cpp's mtmd-cli does."""
    return text if BOI in text else BOI * n_images + text


def build_prompt(model, tokenizer, text: str, features: Sequence[torch.Tensor]) -> MultimodalPrompt:
    """`text` with one BOI placeholder per entry of `features` (encode_image's output)."""
    mm_tokens = features[0].shape[1] if features else 0
    # Tokenized without the soft tokens, which are then inserted as ids: <start_of_image> and
    # <end_of_image> are special tokens, so the text between them never merges across them and
    # this equals tokenizing the processor's full string with <image_soft_token> as a special token.
    layout = expand_prompt(text, [f.shape[0] - 1 for f in features], mm_tokens=0)
    boi = tokenizer.token_to_id(BOI)
    ids = []
    for t in encode_prompt(tokenizer, layout):
        ids.append(t)
        if t == boi:
            ids += [IMAGE_SOFT_TOKEN_ID] * mm_tokens
    return embed_prompt(model, ids, features)


def embed_prompt(model, ids: list[int], features: Sequence[torch.Tensor]) -> MultimodalPrompt:
    """Embeddings of `ids` with the image features in place of the soft tokens, in order."""
    for f in features:
        if f.shape[-1] != model.config.hidden_size:
            raise ValueError(f"the vision encoder projects to {f.shape[-1]} dims but the text model has "
                             f"d_model {model.config.hidden_size} (mmproj file of another model size?)")
    x = torch.tensor([ids], device=model.device)
    soft = x == IMAGE_SOFT_TOKEN_ID
    n_soft = sum(f.shape[0] * f.shape[1] for f in features)
    if int(soft.sum()) != n_soft:
        raise ValueError(f"the prompt has {int(soft.sum())} image soft tokens for {n_soft} image features")
    starts = soft & ~torch.nn.functional.pad(soft, (1, 0))[:, :-1]  # first soft token of each view
    groups = torch.where(soft, starts.cumsum(1) - 1, -1)
    with torch.inference_mode():
        # The soft token id may lie outside the embedding table (GGUF text models keep 262,144 rows):
        # embed a stand-in (pad, as transformers does) and overwrite those rows with image features.
        embeds = model.embed(x.masked_fill(soft, 0))
        if features:
            embeds[soft] = torch.cat(list(features)).reshape(-1, embeds.shape[-1]).to(embeds)
    return MultimodalPrompt(ids, embeds, groups)


# ------------------------------------------------------------------ chat API messages with images

# Private-use characters stand for an image (and, inside the expanded layout, for its two special
# tokens) in message text: the server's image_url parts become IMAGE_MARK, so the user's own text,
# even one typing "<start_of_image>", stays plain text. `without_marks` keeps user text free of them.
IMAGE_MARK, _BOI_MARK, _EOI_MARK = "\ue000", "\ue001", "\ue002"
_MARKS = re.compile("[\ue000-\ue002]")


def without_marks(text: str) -> str:
    return _MARKS.sub("\ufffd", text)


def encode_chat_with_images(tokenizer, messages: list[dict], crops: Sequence[int], mm_tokens: int) -> list[int]:
    """`encode_chat` for messages holding IMAGE_MARK where image i goes (with crops[i] Pan & Scan
    crops): the ids transformers' processor gives for the template with <start_of_image> there."""

    boi, eoi = tokenizer.token_to_id(BOI), tokenizer.token_to_id(EOI)
    pending = list(crops)

    def encode(text: str) -> list[int]:
        n = text.count(IMAGE_MARK)
        mine, pending[:] = pending[:n], pending[n:]
        layout = expand_prompt(text, mine, 0, placeholder=IMAGE_MARK, boi=_BOI_MARK, eoi=_EOI_MARK)
        ids = []  # text between the special tokens encoded plain, as a special-token split does
        for piece in re.split(f"([{_BOI_MARK}{_EOI_MARK}])", layout):
            if piece == _BOI_MARK:
                ids += [boi] + [IMAGE_SOFT_TOKEN_ID] * mm_tokens
            elif piece == _EOI_MARK:
                ids.append(eoi)
            elif piece:
                ids += tokenizer.encode(piece, add_bos=False)
        return ids

    return encode_chat(tokenizer, messages, encode=encode)


def prepare(model, vision, tokenizer, text: str, images: Sequence[str | Path | Image.Image],
            pan_and_scan: PanAndScan | None = PanAndScan()) -> MultimodalPrompt:
    """Image files (or PIL images) and a prompt with one <start_of_image> per image → prompt."""
    loaded = [load_image(im) if isinstance(im, (str, Path)) else to_rgb(im) for im in images]
    return build_prompt(model, tokenizer, text, [encode_image(vision, im, pan_and_scan) for im in loaded])
