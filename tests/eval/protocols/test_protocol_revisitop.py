"""Revisited Oxford/Paris protocol: gnd pickle, trapezoid AP, E/M/H, mP@k (§7 cases 3–5)."""

from __future__ import annotations

import datetime
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from compatkit.errors import DataRootError
from compatkit.eval.protocols import (
    RevisitopGroundTruth,
    crop_queries,
    evaluate_revisitop,
    kaggle_average_precision,
    load_revisitop,
    ranked_positions,
    revisitop_precision_at_k,
    revisitop_scores,
    trapezoid_ap,
)

AP_02 = (1 + (1 / 2 + 2 / 3) / 2) / 2  # positives at 0 and 2 of 2 → 0.791667


def gnd_dict(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "imlist": [f"db{i}" for i in range(6)],
        "qimlist": ["qa", "qb", "qc"],
        "gnd": [
            {"easy": [0], "hard": [2], "junk": [1], "bbx": [2.0, 1.0, 7.6, 5.0]},
            {"easy": [], "hard": [3, 4], "junk": [5], "bbx": [0, 0, 3, 3]},
            {"easy": [5], "hard": [], "junk": [], "bbx": [-5, -5, 50, 50]},
        ],
    }
    cfg.update(overrides)
    return cfg


def write_pickle(path: Path, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture
def gt(tmp_path: Path) -> RevisitopGroundTruth:
    return load_revisitop(write_pickle(tmp_path / "gnd_roxford5k.pkl", gnd_dict()))


# Hand-made full rankings of the 6 database images, one row per query.
RANKS = np.array([[1, 0, 3, 2, 4, 5], [3, 5, 0, 4, 1, 2], [0, 5, 1, 2, 3, 4]])


# ---- AP and precision ---------------------------------------------------------------------


def test_case3_trapezoid_ap_and_junk_shift() -> None:
    assert trapezoid_ap([0, 2], 2) == pytest.approx(0.791667, abs=1e-6)
    assert trapezoid_ap([0, 2], 2) == pytest.approx(AP_02)
    pos = ranked_positions(np.array([10, 11, 12]), ok=np.array([10, 12]), junk=np.array([11]))
    assert pos.tolist() == [0, 1]
    assert trapezoid_ap(pos, 2) == pytest.approx(1.0)


def test_case4_trapezoid_differs_from_kaggle() -> None:
    assert trapezoid_ap([1], 1) == pytest.approx(0.25)
    assert kaggle_average_precision(["x", "p"], {"p"}) == pytest.approx(0.5)


def test_trapezoid_missing_positives_and_errors() -> None:
    assert trapezoid_ap([0], 2) == pytest.approx(0.5)  # the unseen positive adds nothing
    assert trapezoid_ap([], 3) == 0.0
    with pytest.raises(ValueError, match="n_positives"):
        trapezoid_ap([0, 1], 1)
    with pytest.raises(ValueError, match="n_positives"):
        trapezoid_ap([], 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        trapezoid_ap([2, 1], 2)


def test_ranked_positions_ignores_padding() -> None:
    pos = ranked_positions(np.array([4, 9, 2, -1, -1]), ok=np.array([2]), junk=np.array([9]))
    assert pos.tolist() == [1]


def test_precision_at_k_uses_last_positive_cutoff() -> None:
    # 1-based positions 1 and 3
    assert revisitop_precision_at_k([0, 2], 1) == 1.0
    assert revisitop_precision_at_k([0, 2], 5) == pytest.approx(2 / 3)  # kq = min(3, 5)
    assert revisitop_precision_at_k([4, 7], 5) == pytest.approx(1 / 5)
    assert revisitop_precision_at_k([], 5) == 0.0
    with pytest.raises(ValueError, match="k must be a positive integer"):
        revisitop_precision_at_k([0], 0)


# ---- ground truth -------------------------------------------------------------------------


def test_load_structure(gt: RevisitopGroundTruth) -> None:
    assert gt.name == "roxford5k"
    assert gt.num_queries == 3 and gt.num_database == 6
    assert gt.qimlist.tolist() == ["qa", "qb", "qc"]
    assert gt.hard.row(1).tolist() == [3, 4] and gt.easy.row(1).tolist() == []
    np.testing.assert_allclose(gt.bbx[0], [2.0, 1.0, 7.6, 5.0])


def test_case5_protocol_sets(gt: RevisitopGroundTruth) -> None:
    def rows(r: Any) -> list[list[int]]:
        return [r.row(i).tolist() for i in range(len(r))]

    easy = gt.protocol_sets("easy")
    assert rows(easy.ok) == [[0], [], [5]]
    assert rows(easy.junk) == [[1, 2], [3, 4, 5], []]
    medium = gt.protocol_sets("medium")
    assert rows(medium.ok) == [[0, 2], [3, 4], [5]]
    assert rows(medium.junk) == [[1], [5], []]
    hard = gt.protocol_sets("hard")
    assert rows(hard.ok) == [[2], [3, 4], []]
    assert rows(hard.junk) == [[0, 1], [5], [5]]
    with pytest.raises(ValueError, match="unknown revisitop protocol 'extreme'"):
        gt.protocol_sets("extreme")  # type: ignore[arg-type]


def test_item_in_ok_and_junk_counts_as_ok(tmp_path: Path) -> None:
    cfg = gnd_dict(gnd=[{"easy": [0], "hard": [], "junk": [0, 1]}] * 3)
    sets = load_revisitop(write_pickle(tmp_path / "gnd_x.pkl", cfg)).protocol_sets("medium")
    assert sets.ok.row(0).tolist() == [0] and sets.junk.row(0).tolist() == [1]


def test_scores_by_hand(gt: RevisitopGroundTruth) -> None:
    easy = revisitop_scores(RANKS, gt, protocol="easy", ks=(1, 5))
    # qa: junk {1,2} removed → 0 first: AP 1; qb: no easy positive → excluded;
    # qc: 5 at position 1 → 0.25, P@1 = 0, P@5 = 1/2 (kq = 2)
    assert easy.num_queries == 2
    assert easy.map == pytest.approx((1 + 0.25) / 2)
    assert easy.mp_at_k == pytest.approx({1: 0.5, 5: 0.75})
    assert np.isnan(easy.ap[1])

    medium = revisitop_scores(RANKS, gt, protocol="medium", ks=(1, 5))
    # qa: [0,3,2,4,5] → positions [0,2]; qb: [3,0,4,1,2] → [0,2]; qc: 0.25
    assert medium.num_queries == 3
    np.testing.assert_allclose(medium.ap, [AP_02, AP_02, 0.25])
    assert medium.map == pytest.approx((2 * AP_02 + 0.25) / 3)
    assert medium.map == pytest.approx(22 / 36)
    assert medium.mp_at_k == pytest.approx({1: 2 / 3, 5: (2 / 3 + 2 / 3 + 1 / 2) / 3})

    hard = revisitop_scores(RANKS, gt, protocol="hard", ks=(1, 5))
    # qa: junk {0,1} removed → [3,2,4,5] → position [1]: 0.25; qc excluded
    assert hard.num_queries == 2
    assert hard.map == pytest.approx(25 / 48)
    assert hard.mp_at_k == pytest.approx({1: 0.5, 5: (0.5 + 2 / 3) / 2})


def test_scores_errors(gt: RevisitopGroundTruth) -> None:
    with pytest.raises(ValueError, match=r"shape \(3, n\)"):
        revisitop_scores(RANKS[:2], gt)
    with pytest.raises(
        ValueError, match=r"indices in \[1, 6\]; expected database indices in \[0, 6\)"
    ):
        revisitop_scores(RANKS + 1, gt)
    with pytest.raises(TypeError, match="integer database indices"):
        revisitop_scores(RANKS.astype(float), gt)
    with pytest.raises(ValueError, match="each of ks"):
        revisitop_scores(RANKS, gt, ks=(0,))
    only_hard = gnd_dict(gnd=[{"easy": [], "hard": [1], "junk": []}] * 3)
    # a protocol under which no query has positives is an error, not a silent NaN
    with pytest.raises(ValueError, match="no query has positives under the 'easy'"):
        revisitop_scores(RANKS, _from_dict(only_hard), protocol="easy")


def _from_dict(cfg: dict[str, Any]) -> RevisitopGroundTruth:
    with tempfile.TemporaryDirectory() as d:
        return load_revisitop(write_pickle(Path(d) / "gnd_t.pkl", cfg))


# ---- end to end ---------------------------------------------------------------------------


def features_for(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Database = one-hot rows; query i scores database j by 6 − (rank of j), so cosine
    ranking reproduces ``ranks``."""
    n = ranks.shape[1]
    db = np.eye(n, dtype=np.float32)
    q = np.zeros((ranks.shape[0], n), dtype=np.float32)
    for i, row in enumerate(ranks):
        q[i, row] = np.arange(n, 0, -1)
    return q, db


def test_evaluate_revisitop_by_hand(gt: RevisitopGroundTruth) -> None:
    q, db = features_for(RANKS)
    out = evaluate_revisitop(q, db, gt, ks=(1, 5))
    assert list(out) == [
        f"{p}/{m}"
        for p in ("easy", "medium", "hard")
        for m in ("map", "mp@1", "mp@5", "num_queries")
    ]
    assert out["easy/map"] == pytest.approx(0.625)
    assert out["medium/map"] == pytest.approx(22 / 36)
    assert out["medium/mp@5"] == pytest.approx(11 / 18)
    assert out["hard/map"] == pytest.approx(25 / 48)
    assert out["hard/mp@1"] == pytest.approx(0.5)
    assert out["hard/num_queries"] == 2.0
    only_medium = evaluate_revisitop(q, db, gt, protocols=("medium",))
    assert set(only_medium) == {
        "medium/map",
        "medium/mp@1",
        "medium/mp@5",
        "medium/mp@10",
        "medium/num_queries",
    }


def test_evaluate_revisitop_errors(gt: RevisitopGroundTruth) -> None:
    q, db = features_for(RANKS)
    with pytest.raises(ValueError, match="query_feats has 2 rows but roxford5k has 3"):
        evaluate_revisitop(q[:2], db, gt)
    with pytest.raises(ValueError, match="db_feats has 5 rows"):
        evaluate_revisitop(q[:, :5], db[:5, :5], gt)
    with pytest.raises(ValueError, match="unknown revisitop protocol"):
        evaluate_revisitop(q, db, gt, protocols=("medium", "Hard"))  # type: ignore[arg-type]


# ---- loader errors and formats ------------------------------------------------------------


def test_numpy_arrays_in_pickle(tmp_path: Path) -> None:
    cfg = gnd_dict()
    cfg["gnd"] = [{k: np.asarray(v) for k, v in entry.items()} for entry in cfg["gnd"]]
    cfg["gnd"][1]["easy"] = np.zeros(0, dtype=np.int64)
    for protocol in (2, 4, 5):
        gt = load_revisitop(write_pickle(tmp_path / f"gnd_p{protocol}.pkl", cfg, protocol))
        assert gt.protocol_sets("medium").ok.row(0).tolist() == [0, 2]


def test_folder_with_one_gnd(tmp_path: Path) -> None:
    write_pickle(tmp_path / "gnd_rparis6k.pkl", gnd_dict())
    assert load_revisitop(tmp_path).name == "rparis6k"
    write_pickle(tmp_path / "gnd_roxford5k.pkl", gnd_dict())
    with pytest.raises(DataRootError, match="holds 2 gnd_"):
        load_revisitop(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="ground-truth pickle not found"):
        load_revisitop(tmp_path / "gnd_roxford5k.pkl")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"imlist": [], "qimlist": []}, r"missing key\(s\) \['gnd'\]"),
        (["not", "a", "dict"], "expected a dict"),
        (gnd_dict(qimlist=["qa"]), "gnd has 3 entries but qimlist has 1"),
        (gnd_dict(gnd=[{"easy": [0], "hard": []}] * 3), r"gnd\[0\] lacks 'junk'"),
        (gnd_dict(gnd=[{"easy": [6], "hard": [], "junk": []}] * 3), r"indices in \[6, 6\]"),
        (gnd_dict(gnd=[{"easy": [0.5], "hard": [], "junk": []}] * 3), "integer database"),
        (gnd_dict(gnd=[{"easy": [0], "hard": [], "junk": [], "bbx": [1, 2]}] * 3), "4 finite"),
        (gnd_dict(gnd=[{"easy": [0], "hard": [], "junk": [], "bbx": [5, 0, 1, 3]}] * 3), "x2 <="),
        (gnd_dict(gnd=["x", "y", "z"]), r"gnd\[0\] is a str"),
        ({"imlist": [], "qimlist": [], "gnd": [], "when": datetime.date(2020, 1, 1)}, "refusing"),
    ],
)
def test_malformed_pickle(tmp_path: Path, cfg: Any, match: str) -> None:
    path = write_pickle(tmp_path / "gnd_bad.pkl", cfg)
    with pytest.raises(ValueError, match=match) as info:
        load_revisitop(path)
    assert "gnd_bad.pkl" in str(info.value)


def test_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "gnd_text.pkl"
    path.write_text("imlist,qimlist\n")
    with pytest.raises(ValueError, match="cannot read as a revisitop ground-truth pickle"):
        load_revisitop(path)


# ---- query crop ---------------------------------------------------------------------------


def test_crop_arrays_and_pil(gt: RevisitopGroundTruth) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (10, 12, 3), dtype=np.uint8) for _ in range(3)]
    images[1] = images[1][..., 0]  # a grey (H, W) image
    crops = crop_queries(images, gt)
    # bbx [2, 1, 7.6, 5] → x 2..8, y 1..5 (7.6 rounds to 8, as PIL does)
    np.testing.assert_array_equal(crops[0], images[0][1:5, 2:8])
    np.testing.assert_array_equal(crops[1], images[1][0:3, 0:3])
    np.testing.assert_array_equal(crops[2], images[2])  # box larger than the image: clipped
    pil = [Image.fromarray(im) for im in images]
    pil_crops = crop_queries(pil, gt)
    assert pil_crops[0].size == (6, 4)
    np.testing.assert_array_equal(np.asarray(pil_crops[0]), crops[0])
    np.testing.assert_array_equal(np.asarray(pil_crops[2]), images[2])


def test_crop_errors(gt: RevisitopGroundTruth) -> None:
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="got 2 images for 3 queries"):
        crop_queries([img, img], gt)
    with pytest.raises(TypeError, match="image 1 is a list"):
        crop_queries([img, [[0]], img], gt)
    no_box = _from_dict(gnd_dict(gnd=[{"easy": [0], "hard": [], "junk": []}] * 3))
    with pytest.raises(ValueError, match=r"query 0 .* has no bbx"):
        crop_queries([img] * 3, no_box)
    tiny = np.zeros((1, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"query 0 \(qa\).*empty inside its 1x1 image"):
        crop_queries([tiny, img, img], gt)
