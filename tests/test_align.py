"""Face detection and FFHQ alignment on real photos with dlib's pretrained models."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from engine.align import AlignError, align, likeness

FACES = FIXTURES / "faces"


def test_one_aligned_face_from_obama():
    face = align(Image.open(FACES / "obama.jpg"), 128)
    assert face.image.shape == (128, 128, 3) and face.image.dtype == np.uint8
    assert face.faces_found == 1
    assert face.landmarks.shape == (68, 2) and face.quad.shape == (4, 2)
    # FFHQ places the eyes at fixed places: find them again in the aligned image
    again = align(face.image, 128)
    eyes = (again.landmarks[36:42].mean(0), again.landmarks[42:48].mean(0))
    assert abs(eyes[0][1] - eyes[1][1]) < 4, "eyes are level after alignment"
    assert 0.3 * 128 < eyes[0][0] < 0.45 * 128 and 0.55 * 128 < eyes[1][0] < 0.7 * 128


def test_the_largest_of_two_faces_is_used_and_reported():
    face = align(Image.open(FACES / "two_faces.jpg"), 128)
    assert face.faces_found == 2
    assert any("2 faces found: used the largest" in w for w in face.warnings)
    obama = align(Image.open(FACES / "obama.jpg"), 128)
    assert likeness(face.image, obama.image) < 0.6  # the largest face in two_faces.jpg is Obama's


def test_likeness_tells_people_apart():
    obama = align(Image.open(FACES / "obama.jpg"), 256).image
    biden = align(Image.open(FACES / "biden.jpg"), 256).image
    assert likeness(obama, biden) > 0.6
    assert likeness(obama, obama) < 0.05


def test_exif_orientation_is_applied():
    img = Image.open(FACES / "obama.jpg")
    rotated = img.rotate(90, expand=True)  # stored sideways; EXIF orientation 6 says "turn 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif.tobytes())
    face = align(Image.open(io.BytesIO(buf.getvalue())), 128)
    assert face.faces_found == 1 and not any("turned" in w for w in face.warnings)  # upright from its EXIF


def test_no_face_says_what_kind_of_photo_works():
    gray = np.full((300, 300, 3), 128, np.uint8)
    with pytest.raises(AlignError, match="no face found: send a well-lit photo"):
        align(gray, 64)


def test_tiny_faces_are_refused_and_small_ones_warned():
    img = Image.open(FACES / "obama.jpg")
    small = img.resize((img.width * 2 // 5, img.height * 2 // 5), Image.LANCZOS)  # about 21 px between the eyes
    face = align(small, 64)
    assert any("small face" in w for w in face.warnings)
    with pytest.raises(AlignError, match="too small"):
        align(small, 64, min_eye_distance=40)


@pytest.mark.parametrize("degrees, turn", [(90, "a quarter turn clockwise"), (-90, "a quarter turn anticlockwise"),
                                           (180, "upside down")])
def test_a_turned_photo_without_exif_is_turned_back(degrees, turn):
    """Phones send photos turned, with their EXIF orientation stripped: no upright face is found, so the photo is
    tried turned, and the warning says how. The face found is the upright one (dlib: the same person)."""
    upright = align(Image.open(FACES / "obama.jpg"), 128)
    face = align(Image.open(FACES / "obama.jpg").rotate(degrees, expand=True), 128)
    assert face.warnings[0] == f"the face was found with the photo turned {turn}"
    assert likeness(face.image, upright.image) < 0.3  # the same face, the same way up (another person: above 0.6)


def test_alignment_and_likeness_from_several_threads_at_once():
    """The engine aligns a new photo while it checks a finished face's likeness, each in its own thread; dlib's
    models are shared and not thread-safe (unguarded, this hung and then crashed), so every call is serialised."""
    from concurrent.futures import ThreadPoolExecutor

    photo = Image.open(FIXTURES / "faces" / "obama.jpg")
    face = align(photo, 256).image
    with ThreadPoolExecutor(6) as pool:
        aligned = [pool.submit(align, photo, 256) for _ in range(3)]
        alike = [pool.submit(likeness, face, face) for _ in range(3)]
        assert all(np.array_equal(f.result(timeout=120).image, face) for f in aligned)
        assert all(f.result(timeout=120) == pytest.approx(0.0, abs=1e-6) for f in alike)
