"""StyleCLIP's global directions (Patashnik et al. 2021, section 6; `global_torch/StyleCLIP.py` and
`global_torch/manipulate.py` in orpatashnik/StyleCLIP): a text edit as one step in style space S, no optimisation.

1. Text side (their `GetDt`): each text is put in the 79 ImageNet prompt templates (`IMAGENET_TEMPLATES`), CLIP's
   text features are normalised, averaged over the templates and normalised again; delta t = target - neutral,
   normalised.
2. Channel relevance (their `GetBoundary`): r = fs3 . delta t, one number per style channel that fs3 measured
   (fs3: [channels, clip_dim], the normalised mean CLIP image-feature change when that channel moves). Channels
   with |r| < beta (the disentanglement threshold) are set to 0, the rest divided by max |r|.
3. Per layer (their `SplitS(..., if_std=True)`): fs3's rows go onto S's conv layers in order, each channel scaled by
   its standard deviation over S (`S_mean_std`); toRGB layers and the convs past fs3's rows (for FFHQ 1024 the
   convs above 128 px) get 0.
4. The edit (their `MSCode`): s' = s + alpha * delta s, layer by layer.

Where we differ on purpose: when beta is above every |r| no channel is selected and the direction is 0 (theirs
divides 0 by 0 and renders NaN); an fs3 whose rows end inside a layer, or go past the convs, is refused (theirs
fails to broadcast, or drops the extra rows silently). Proven against their functions by
tests/test_global_directions.py (fixture made by scripts/make_global_directions_parity.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from storage.errors import StylebotError

# The prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al. 2021, openai/CLIP's
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), as StyleCLIP's global_torch/StyleCLIP.py lists them: 80 less
# 'a photo of many {}.', which StyleCLIP leaves out. Order as theirs (the average does not depend on it).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(IMAGENET_TEMPLATES) == 79


class DirectionError(StylebotError):
    """A direction's inputs do not fit the generator (fs3 rows, S_mean_std layers)."""


def text_features(clip, text: str) -> torch.Tensor:
    """`text` in every template -> CLIP text features, each normalised, averaged, normalised: [clip_dim] float32.
    `clip` is an `engine.edit.ClipScorer` (its `encode_text` returns unit features)."""
    per_template = clip.encode_text([t.format(text) for t in IMAGENET_TEMPLATES])       # [79, D], unit rows
    return F.normalize(per_template.mean(dim=0), dim=0)


def text_direction(clip, target: str, neutral: str) -> torch.Tensor:
    """delta t: the unit vector from `neutral`'s averaged text features to `target`'s, [clip_dim] float32."""
    dt = text_features(clip, target) - text_features(clip, neutral)
    return dt / torch.linalg.vector_norm(dt)


def channel_relevance(fs3: torch.Tensor, dt: torch.Tensor, beta: float) -> torch.Tensor:
    """r = fs3 . dt [channels]; |r| < beta -> 0; the rest divided by max |r| (so in [-1, 1]); all 0 when none is
    left."""
    if fs3.ndim != 2 or dt.shape != (fs3.shape[1],):
        raise DirectionError(f"fs3 {tuple(fs3.shape)} and delta t {tuple(dt.shape)} do not fit: fs3 is "
                             "[channels, clip_dim] for the CLIP model that made delta t")
    r = fs3.float() @ dt.float()
    r = torch.where(r.abs() < beta, torch.zeros_like(r), r)
    peak = r.abs().max()
    return r / peak if peak > 0 else r


def split_per_layer(r: torch.Tensor, channels: Mapping[str, int], std: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """r [fs3 rows] onto S's layers -> delta s per unit alpha, {layer: [channels]}, each channel times its std.

    `channels`: every styled layer and its width in S's order (`G.synthesis.style_channels(torgb=True)`); r's
    entries fill the conv layers in order, from the first; toRGB layers and the convs past r's end are 0.
    `std`: each layer's per-channel standard deviation over S (S_mean_std's second half), by layer name."""
    out, start = {}, 0
    for name, width in channels.items():
        if "RGB" in name or start >= len(r):
            out[name] = torch.zeros(width, dtype=torch.float32)
            continue
        if start + width > len(r):
            raise DirectionError(f"fs3 has {len(r)} rows: they end inside layer {name} ({start} + {width}); its "
                                 "rows must cover whole conv layers, in S's order")
        if name not in std or tuple(std[name].shape) != (width,):
            raise DirectionError(f"S_mean_std has no std of {width} channels for layer {name}")
        out[name] = r[start:start + width] * std[name].float()
        start += width
    if start != len(r):
        raise DirectionError(f"fs3 has {len(r)} rows, more than the {start} channels of the generator's convs")
    return out


def global_direction(fs3: torch.Tensor, dt: torch.Tensor, std: Mapping[str, torch.Tensor],
                     channels: Mapping[str, int], beta: float) -> dict[str, torch.Tensor]:
    """StyleCLIP's boundary for delta t at threshold beta: delta s per unit alpha, {layer: [channels]}."""
    return split_per_layer(channel_relevance(fs3, dt, beta), channels, std)


def apply_direction(styles: Mapping[str, torch.Tensor], ds: Mapping[str, torch.Tensor], alpha: float
                    ) -> dict[str, torch.Tensor]:
    """s' = s + alpha * delta s for every layer; `styles` {layer: [N, channels]} as `G.synthesis.styles(ws)` gives,
    the result renders with `G.synthesis(styles=...)`."""
    if list(styles) != list(ds):
        raise DirectionError("the direction's layers are not the styles' layers")
    return {name: s + alpha * ds[name].to(s.device, s.dtype) for name, s in styles.items()}
