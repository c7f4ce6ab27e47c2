"""Face detection and FFHQ-style alignment with dlib's pretrained HOG detector and 68-point landmarks.

`align(image, resolution)` returns the face cropped, rotated and scaled the way the FFHQ training images were
(eyes and mouth at fixed places), so that StyleGAN can reproduce it. The models come from the PyPI packages
`dlib-bin` and `face-recognition-models` and work offline.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from storage.errors import StylebotError

DETECT_MAX_SIDE = 1600          # photos are scaled down to this for detection; landmarks use the full image
MIN_EYE_DISTANCE = 20.0         # px between eye centres below which a face is refused
WARN_EYE_DISTANCE = 64.0        # px below which the likeness suffers: processed, with a warning
MIN_PHOTO_SIDE = 64             # px: a shorter side cannot hold a face the detector finds (about 40 px wide)
MAX_PHOTO_ASPECT = 10           # long side / short side: thinner images are banners, not photos of a face


# dlib's detector, shape predictor and face encoder are not safe to call from two threads at once (the engine aligns
# a new photo while it checks a finished face's likeness): seen hanging, then crashing. Every call goes through this.
_DLIB = threading.Lock()


class AlignError(StylebotError):
    """The photo has no usable face; the message says what kind of photo works."""


@dataclass
class AlignedFace:
    image: np.ndarray                   # uint8 [R, R, 3], the aligned face
    quad: np.ndarray                    # [4, 2] crop corners in the original photo (x, y), clockwise from top-left
    landmarks: np.ndarray               # [68, 2] in the original photo
    eye_distance: float                 # px between the eye centres in the original photo
    faces_found: int = 1                # faces detected; the largest was used
    warnings: list[str] = field(default_factory=list)


def model_path(filename: str) -> Path:
    """A .dat file shipped by face-recognition-models (found without importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise AlignError("face models are missing: pip install face-recognition-models")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / filename


@lru_cache(maxsize=1)
def _dlib_models():
    import dlib

    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(model_path("shape_predictor_68_face_landmarks.dat"))))


@lru_cache(maxsize=1)
def _face_encoder():
    import dlib

    return dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat")))


def load_photo(image: Image.Image | np.ndarray) -> np.ndarray:
    """EXIF-oriented uint8 RGB array from a PIL image (or pass an array through)."""
    if isinstance(image, np.ndarray):
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image  # grey
        return np.ascontiguousarray(image[..., :3].astype(np.uint8))
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def size_problem(width: int, height: int) -> str | None:
    """A one-line reason why an image of this size cannot hold a face we can find, or None."""
    if min(width, height) < MIN_PHOTO_SIDE:
        return (f"that photo is {width}x{height} pixels, too small to hold a face; "
                f"send one at least {MIN_PHOTO_SIDE} pixels on each side")
    if max(width, height) > MAX_PHOTO_ASPECT * min(width, height):
        return (f"that photo is {width}x{height} pixels, too thin to hold a face; "
                f"send one whose long side is at most {MAX_PHOTO_ASPECT} times its short side")
    return None


def detect_landmarks(photo: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """68-point landmarks [68, 2] of every face, largest first, and the faces' box areas."""
    import dlib

    detector, predictor = _dlib_models()
    h, w = photo.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = photo if scale == 1.0 else np.asarray(Image.fromarray(photo).resize((round(w * scale), round(h * scale)),
                                                                                Image.LANCZOS))
    faces = []
    with _DLIB:
        rects = detector(small, 1)  # upsample once: finds faces down to about 40 px
        for r in rects:
            box = dlib.rectangle(int(r.left() / scale), int(r.top() / scale),
                                 int(r.right() / scale), int(r.bottom() / scale))
            shape = predictor(photo, box)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append((box.width() * box.height(), pts))
    faces.sort(key=lambda f: -f[0])
    return [f[1] for f in faces], [float(f[0]) for f in faces]


def ffhq_quad(lm: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop: an oriented square from the eyes and mouth; returns its corners [4, 2] and side length."""
    eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def warp_quad(photo: np.ndarray, quad: np.ndarray, qsize: float, resolution: int) -> np.ndarray:
    """Shrink, crop, reflect-pad with blur, then map `quad` onto a `resolution` square (the FFHQ recipe)."""
    img = Image.fromarray(photo)
    quad = quad.copy()
    shrink = int(math.floor(qsize / resolution * 0.5))
    if shrink > 1:
        img = img.resize((round(img.width / shrink), round(img.height / shrink)), Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    border = max(int(round(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0),
            min(hi[0] + border, img.width), min(hi[1] + border, img.height))
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad -= crop[:2]

    lo, hi = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    pad = [max(-lo[0] + border, 0), max(-lo[1] + border, 0), max(hi[0] - img.width + border, 0),
           max(hi[1] - img.height + border, 0)]
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(round(qsize * 0.3)))
        a = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        yy, xx = np.ogrid[:h, :w]
        # 0 inside the photo, rising to 1 at the far edge of the padding
        mask = np.maximum(1.0 - np.minimum(xx / max(pad[0], 1), (w - 1 - xx) / max(pad[2], 1)),
                          1.0 - np.minimum(yy / max(pad[1], 1), (h - 1 - yy) / max(pad[3], 1)))[..., None]
        mask = np.clip(mask, 0.0, 1.0).astype(np.float32)
        blurred = np.float32(Image.fromarray(np.uint8(np.clip(a, 0, 255))).filter(
            ImageFilter.GaussianBlur(max(qsize * 0.02, 0.5))))
        a += (blurred - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * mask
        img = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad += pad[:2]

    transform_size = max(resolution, 256) * 2
    img = img.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    return np.asarray(img.resize((resolution, resolution), Image.LANCZOS))


# the turns tried, in order, when a photo shows no upright face: quarter turns as np.rot90 makes them, and their names
TURNS = ((1, "a quarter turn anticlockwise"), (3, "a quarter turn clockwise"), (2, "upside down"))


def align(image: Image.Image | np.ndarray, resolution: int, *, min_eye_distance: float = MIN_EYE_DISTANCE,
          warn_eye_distance: float = WARN_EYE_DISTANCE) -> AlignedFace:
    """Find the largest face in a photo and return it FFHQ-aligned at `resolution` px. A photo without an upright
    face is tried turned by a quarter, three quarters and half a turn (the landmarks and quad are then in the turned
    photo), and the warning says which turn found it."""
    photo = load_photo(image)
    problem = size_problem(photo.shape[1], photo.shape[0])
    if problem:
        raise AlignError(problem)
    faces, _ = detect_landmarks(photo)
    warnings = []
    for quarters, turn in TURNS if not faces else ():  # a phone's photo whose EXIF orientation was stripped
        turned = np.ascontiguousarray(np.rot90(photo, quarters))  # dlib reads the pixels in memory order
        faces, _ = detect_landmarks(turned)
        if faces:
            photo = turned
            warnings.append(f"the face was found with the photo turned {turn}")
            break
    if not faces:
        raise AlignError("no face found: send a well-lit photo with one face looking at the camera, "
                         "not too small or turned away")
    lm = faces[0]
    eye_distance = float(np.hypot(*(lm[42:48].mean(axis=0) - lm[36:42].mean(axis=0))))
    if eye_distance < min_eye_distance:
        raise AlignError(f"the face is too small ({eye_distance:.0f} px between the eyes, at least "
                         f"{min_eye_distance:.0f} needed): send a closer or sharper photo")
    if len(faces) > 1:
        warnings.append(f"{len(faces)} faces found: used the largest")
    if eye_distance < warn_eye_distance:
        warnings.append(f"small face ({eye_distance:.0f} px between the eyes): a sharper photo gives a closer likeness")
    quad, qsize = ffhq_quad(lm)
    aligned = warp_quad(photo, quad, qsize, resolution)
    return AlignedFace(aligned, quad, lm, eye_distance, len(faces), warnings)


def face_descriptor(aligned: np.ndarray) -> np.ndarray | None:
    """dlib's 128-D face descriptor of an aligned face, or None when no face is found in it."""
    size = max(aligned.shape[0], 256)  # dlib's detector needs faces of about 80 px: upscale small renders
    img = (aligned if aligned.shape[0] == size
           else np.asarray(Image.fromarray(aligned).resize((size, size), Image.LANCZOS)))
    faces, _ = detect_landmarks(img)
    if not faces:
        return None
    import dlib

    _, predictor = _dlib_models()
    lm = faces[0]
    box = dlib.rectangle(int(lm[:, 0].min()), int(lm[:, 1].min()), int(lm[:, 0].max()), int(lm[:, 1].max()))
    with _DLIB:
        shape = predictor(img, box)
        return np.array(_face_encoder().compute_face_descriptor(img, shape))


def likeness(a: np.ndarray, b: np.ndarray) -> float | None:
    """Distance between the faces in two aligned images (dlib: same person below 0.6), None if either has no face."""
    da, db = face_descriptor(a), face_descriptor(b)
    return None if da is None or db is None else float(np.linalg.norm(da - db))
