"""1:1 verification protocol: TAR@FAR (§7 case 7), IJB-C files, template averaging."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from compatkit.errors import DataRootError, IncompatibleSpacesError
from compatkit.eval.protocols import (
    DEFAULT_FARS,
    TemplateFeatures,
    TemplateMedia,
    TemplatePairs,
    evaluate_verification,
    far_label,
    operating_point_at_far,
    read_template_media,
    read_template_pairs,
    tar_at_far,
    tar_at_threshold,
    template_features,
    verification_scores,
)

GENUINE = [0.9, 0.8, 0.7, 0.4]
IMPOSTOR = [0.85, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]
SCORES = np.array(GENUINE + IMPOSTOR)
IS_GENUINE = np.array([True] * 4 + [False] * 10)


# ---- TAR@FAR ------------------------------------------------------------------------------


def test_case7_fixed_thresholds() -> None:
    at_085 = tar_at_threshold(SCORES, IS_GENUINE, 0.85)
    assert (at_085.far, at_085.tar) == pytest.approx((0.1, 0.25))
    at_086 = tar_at_threshold(SCORES, IS_GENUINE, 0.86)
    assert (at_086.far, at_086.tar) == pytest.approx((0.0, 0.25))


def test_case7_smallest_threshold_within_target() -> None:
    # FAR ≤ 0.1 allows one impostor (0.85); the smallest score above the second (0.6) is 0.7
    p = operating_point_at_far(SCORES, IS_GENUINE, 0.1)
    assert p == pytest.approx((0.7, 0.75, 0.1))
    # FAR ≤ 0.05 allows none: the smallest score above 0.85 is 0.9
    assert operating_point_at_far(SCORES, IS_GENUINE, 0.05) == pytest.approx((0.9, 0.25, 0.0))
    # 0.3 · 10 = 3.0000000000000004 in floating point: three impostors allowed → t = 0.4
    assert operating_point_at_far(SCORES, IS_GENUINE, 0.3) == pytest.approx((0.4, 1.0, 0.3))
    assert operating_point_at_far(SCORES, IS_GENUINE, 1.0).tar == 1.0


def test_threshold_above_every_score() -> None:
    p = operating_point_at_far([0.1, 0.5], [1, 0], 0.0)
    assert p.threshold == math.inf and p.tar == 0.0 and p.far == 0.0


def test_far_count_is_robust_to_rounding() -> None:
    # 0.29 · 100 = 28.999999999999996; 29 impostors at or above the threshold are allowed
    rng = np.random.default_rng(0)
    imp = rng.permutation(100) / 100.0
    scores = np.concatenate([[0.705, 0.995], imp])
    labels = np.array([1, 1] + [0] * 100)
    p = operating_point_at_far(scores, labels, 0.29)
    assert p.far == pytest.approx(0.29) and p.threshold == pytest.approx(0.705)


def test_tar_at_far_keys_and_values() -> None:
    out = tar_at_far(SCORES, IS_GENUINE, fars=(0.05, 0.1, 0.3))
    assert out == pytest.approx(
        {"tar@far=5e-02": 0.25, "tar@far=1e-01": 0.75, "tar@far=3e-01": 1.0}
    )
    assert list(out) == ["tar@far=5e-02", "tar@far=1e-01", "tar@far=3e-01"]
    assert list(tar_at_far(SCORES, IS_GENUINE)) == [far_label(f) for f in DEFAULT_FARS]
    assert far_label(1e-4) == "tar@far=1e-04" and far_label(1.5e-3) == "tar@far=1.5e-03"


def brute_force(scores: np.ndarray, genuine: np.ndarray, far: float) -> float:
    imp = scores[~genuine]
    ok = [t for t in np.unique(scores) if (imp >= t).mean() <= far + 1e-12]
    if not ok:
        return 0.0
    return float((scores[genuine] >= min(ok)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_tar_at_far_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    genuine = rng.random(60) < 0.3
    scores = np.round(rng.normal(genuine * 1.0, 1.0), 1)  # coarse: many ties
    fars = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5)
    out = tar_at_far(scores, genuine, fars)
    for f in fars:
        assert out[far_label(f)] == pytest.approx(brute_force(scores, genuine, f)), f


def test_tar_at_far_errors() -> None:
    with pytest.raises(ValueError, match="0 impostor"):
        tar_at_far([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match=r"is_genuine has shape \(3,\)"):
        tar_at_threshold([0.1, 0.2], [1, 0, 1], 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        tar_at_threshold([0.1, np.nan], [1, 0], 0.5)
    with pytest.raises(ValueError, match="0/1 or booleans"):
        tar_at_threshold([0.1, 0.2], [1, 2], 0.5)
    with pytest.raises(ValueError, match=r"target FAR must be a number in \[0, 1\], got 1.5"):
        tar_at_far(SCORES, IS_GENUINE, fars=(1.5,))


# ---- IJB-C files --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_pairs(tmp_path: Path) -> None:
    pairs = read_template_pairs(write(tmp_path / "pairs.txt", "1 11065 1\n1 11066 0\n\n3 5 1\n"))
    assert pairs.first.tolist() == [1, 1, 3]
    assert pairs.second.tolist() == [11065, 11066, 5]
    assert pairs.label.tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1 2 1\n3 4\n", "number of columns changed"),
        ("1 2 1\n3 x 0\n", "could not convert string 'x'"),
        ("1 2 1 7\n", "lines have 4 columns"),
        ("1 2 1\n3 4 2\n", "line 2 has label 2; expected 0 or 1"),
        ("", "no pairs"),
    ],
)
def test_malformed_pairs(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        read_template_pairs(write(tmp_path / "ijbc_template_pair_label.txt", text))
    assert "ijbc_template_pair_label.txt" in str(info.value)


def test_read_media(tmp_path: Path) -> None:
    media = read_template_media(write(tmp_path / "tid_mid.txt", "1.jpg 1 69544\n2.jpg 1 69544\n"))
    assert media.image_names.tolist() == ["1.jpg", "2.jpg"]
    assert media.template_ids.tolist() == [1, 1] and media.media_ids.tolist() == [69544] * 2
    with pytest.raises(ValueError, match=r"tid_mid.txt:2: .* has 2 fields"):
        read_template_media(write(tmp_path / "tid_mid.txt", "1.jpg 1 5\n2.jpg 1\n"))
    with pytest.raises(ValueError, match=r"tid_mid.txt:1: template and media ids must be integers"):
        read_template_media(write(tmp_path / "tid_mid.txt", "1.jpg one 5\n"))
    with pytest.raises(ValueError, match="no images"):
        read_template_media(write(tmp_path / "tid_mid.txt", "\n"))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="template pair file not found"):
        read_template_pairs(tmp_path / "pairs.txt")
    with pytest.raises(DataRootError, match="template/media file not found"):
        read_template_media(tmp_path / "tid_mid.txt")


# ---- templates and scores -----------------------------------------------------------------

# template 1: media 10 holds (2,0) and (0,3) → normalised mean (.5,.5); media 11 holds (0,5)
# → (0,1); media-weighted template ∝ (.25,.75) ∝ (1,3)/√10 (image-weighted would be (1,2)/√5).
# template 2: one image (3,4) → (.6,.8). Rows are shuffled on purpose.
IMAGE_FEATS = np.array([[0.0, 5.0], [3.0, 4.0], [2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
TIDS = np.array([1, 2, 1, 1])
MIDS = np.array([11, 20, 10, 10])
T1 = np.array([1.0, 3.0]) / math.sqrt(10)
T2 = np.array([0.6, 0.8])


def test_template_features_media_weighted() -> None:
    t = template_features(IMAGE_FEATS, TIDS, MIDS)
    assert t.template_ids.tolist() == [1, 2]
    assert t.feats.dtype == np.float32
    np.testing.assert_allclose(t.feats, [T1, T2], atol=1e-6)


def test_media_id_shared_across_templates_stays_separate() -> None:
    t = template_features(np.array([[1.0, 0.0], [0.0, 1.0]]), [1, 2], [7, 7])
    np.testing.assert_allclose(t.feats, [[1, 0], [0, 1]])


def test_template_feature_errors() -> None:
    with pytest.raises(ValueError, match=r"template_ids has shape \(3,\); expected \(4,\)"):
        template_features(IMAGE_FEATS, TIDS[:3], MIDS)
    with pytest.raises(TypeError, match="media_ids must hold integer ids"):
        template_features(IMAGE_FEATS, TIDS, MIDS.astype(float))
    with pytest.raises(ValueError, match="image_feats row 1 is zero"):
        template_features(np.array([[1.0, 0], [0, 0]]), [1, 1], [1, 2])
    with pytest.raises(ValueError, match=r"templates \[4\] average to the zero vector"):
        template_features(np.array([[1.0, 0], [-1.0, 0]]), [4, 4], [1, 2])


def test_verification_scores_self_and_cross() -> None:
    a = template_features(IMAGE_FEATS, TIDS, MIDS)
    pairs = TemplatePairs(np.array([1, 2, 1]), np.array([2, 1, 1]), np.array([1, 0, 1], bool))
    np.testing.assert_allclose(verification_scores(a, a, pairs), [3 / math.sqrt(10)] * 2 + [1])
    # model B = model A rotated by 90°: (x, y) → (−y, x); the first template comes from A,
    # the second from B, so the order inside a pair matters
    rot = np.array([[0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    b = template_features(IMAGE_FEATS @ rot, TIDS, MIDS)
    got = verification_scores(a, b, pairs, chunk_size=2)
    np.testing.assert_allclose(got, [T1 @ [-0.8, 0.6], T2 @ [-T1[1], T1[0]], 0.0], atol=1e-6)
    assert got[0] == pytest.approx(1 / math.sqrt(10), abs=1e-6)
    assert got[1] == pytest.approx(-1 / math.sqrt(10), abs=1e-6)


def test_verification_score_errors() -> None:
    a = template_features(IMAGE_FEATS, TIDS, MIDS)
    wide = TemplateFeatures(np.array([1, 2]), np.ones((2, 3), np.float32))
    pairs = TemplatePairs(np.array([1]), np.array([2]), np.array([True]))
    with pytest.raises(IncompatibleSpacesError, match="dimension 2 and template_feats_b 3"):
        verification_scores(a, wide, pairs)
    missing = TemplatePairs(np.array([1, 9]), np.array([2, 2]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"1 pair\(s\) name first templates .* e.g. \[9\]"):
        verification_scores(a, a, missing)
    twice = TemplateFeatures(np.array([1, 1]), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="repeats ids"):
        verification_scores(twice, a, pairs)


def test_evaluate_verification_by_hand(tmp_path: Path) -> None:
    # one image per template except template 1, which has a second media pointing the same way
    media = read_template_media(
        write(
            tmp_path / "ijbc_face_tid_mid.txt",
            "a.jpg 1 1\nb.jpg 2 2\nc.jpg 3 3\nd.jpg 4 4\ne.jpg 5 5\nf.jpg 1 6\n",
        )
    )
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8], [5, 0]], dtype=np.float32)
    # genuine: (1,2)=.8, (3,2)=.6, (3,5)=.8; impostor: (1,3)=0, (1,4)=−1, (2,4)=−.8, (1,5)=.6
    pairs = read_template_pairs(
        write(
            tmp_path / "ijbc_template_pair_label.txt",
            "1 2 1\n3 2 1\n3 5 1\n1 3 0\n1 4 0\n2 4 0\n1 5 0\n",
        )
    )
    # FAR ≤ 0.1: no impostor allowed → t = 0.8, TAR 2/3; FAR ≤ 0.25: one → t = 0.6, TAR 1
    expected = {"tar@far=1e-01": 2 / 3, "tar@far=2.5e-01": 1.0}
    assert evaluate_verification(feats, feats, media, pairs, fars=(0.1, 0.25)) == pytest.approx(
        expected
    )
    # a second model that only rescales each image gives the same templates
    scaled = feats * np.arange(1, 7, dtype=np.float32)[:, None]
    assert evaluate_verification(feats, scaled, media, pairs, fars=(0.1, 0.25)) == pytest.approx(
        expected
    )
    with pytest.raises(IncompatibleSpacesError):
        evaluate_verification(feats, np.ones((6, 3), np.float32), media, pairs)
    with pytest.raises(ValueError, match=r"template_ids has shape \(6,\); expected \(5,\)"):
        evaluate_verification(feats[:5], feats[:5], media, pairs)


def test_media_namedtuple_alignment() -> None:
    media = TemplateMedia(np.array(["x", "y"]), np.array([1, 2]), np.array([1, 2]))
    pairs = TemplatePairs(np.array([1]), np.array([2]), np.array([False]))
    with pytest.raises(ValueError, match="0 genuine"):
        evaluate_verification(np.eye(2, dtype=np.float32), np.eye(2), media, pairs)
