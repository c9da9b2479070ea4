"""1:1 verification (IJB-C style): template features, pair scores and TAR@FAR.

Reference: reference/methods.md §4.1 (IJB-C), §4.2 (TAR@FAR, cross-test on faces).
A template is the media-weighted average of its L2-normalised image features: images are
averaged within each media (video or still), the media vectors are averaged, and the result
is normalised. Flip-test, when wanted, happens at embedding time (pass the sum of the
features of each image and of its mirror image).

Threshold convention: for a target FAR ``f`` the threshold is the **smallest** observed score
``t`` with ``FAR(t) = #{impostor ≥ t} / #impostor ≤ f``. TAR only falls as ``t`` rises, so
this is the largest TAR reachable without exceeding the target; when some threshold hits
``f`` exactly it is the value insightface's IJB-C read-out reports.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from compatkit.errors import IncompatibleSpacesError
from compatkit.eval.protocols.common import PathLike, require_file
from compatkit.eval.retrieval import check_features, check_positive_int

logger = logging.getLogger(__name__)

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Relative slack so that e.g. 0.29 · 100 counts as 29 allowed impostors, not 28.
_FAR_COUNT_SLACK = 1e-9


class OperatingPoint(NamedTuple):
    """One point of the ROC: accept a pair when its score is ≥ ``threshold``."""

    threshold: float
    tar: float
    far: float


class TemplatePairs(NamedTuple):
    """Template pairs to verify (``ijbc_template_pair_label.txt``).

    Shapes:
        first, second: (n,) int64 template ids. label: (n,) bool, True for genuine pairs.
    """

    first: np.ndarray
    second: np.ndarray
    label: np.ndarray


class TemplateMedia(NamedTuple):
    """Template and media of every image (``ijbc_face_tid_mid.txt``), in file order.

    Shapes:
        image_names: (n,) str. template_ids, media_ids: (n,) int64.
    """

    image_names: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray


class TemplateFeatures(NamedTuple):
    """One L2-normalised feature per template.

    Shapes:
        template_ids: (T,) int64, sorted, unique. feats: (T, D) float32.
    """

    template_ids: np.ndarray
    feats: np.ndarray


def far_label(far: float) -> str:
    """Result key of a target FAR, e.g. ``"tar@far=1e-04"``."""
    return "tar@far=" + np.format_float_scientific(far, trim="-", exp_digits=2)


class _SortedScores:
    """Genuine, impostor and all scores sorted once, for many thresholds."""

    def __init__(self, scores: Any, is_genuine: Any) -> None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        g = np.asarray(is_genuine)
        if g.shape != s.shape:
            raise ValueError(
                f"is_genuine has shape {g.shape} but scores has shape {s.shape}; expected one "
                "flag per score"
            )
        if g.dtype != np.bool_:
            if g.size and not np.isin(g, (0, 1)).all():
                raise ValueError(
                    f"is_genuine must hold 0/1 or booleans, got values {np.unique(g)[:5]}"
                )
            g = g.astype(bool)
        if not np.isfinite(s).all():
            raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite value(s)")
        self.genuine = np.sort(s[g])
        self.impostor = np.sort(s[~g])
        if self.genuine.size == 0 or self.impostor.size == 0:
            raise ValueError(
                f"TAR@FAR needs genuine and impostor pairs, got {self.genuine.size} genuine "
                f"and {self.impostor.size} impostor"
            )
        self.all = np.sort(s)

    def point(self, threshold: float) -> OperatingPoint:
        n_gen, n_imp = self.genuine.size, self.impostor.size
        tar = (n_gen - np.searchsorted(self.genuine, threshold, side="left")) / n_gen
        far = (n_imp - np.searchsorted(self.impostor, threshold, side="left")) / n_imp
        return OperatingPoint(float(threshold), float(tar), float(far))

    def point_at_far(self, far: float) -> OperatingPoint:
        n_imp = self.impostor.size
        allowed = math.floor(far * n_imp * (1.0 + _FAR_COUNT_SLACK))
        if allowed >= n_imp:
            return self.point(float(self.all[0]))
        boundary = self.impostor[n_imp - 1 - allowed]  # the (allowed + 1)-th highest impostor
        nxt = np.searchsorted(self.all, boundary, side="right")
        return self.point(float(self.all[nxt]) if nxt < self.all.size else math.inf)


def tar_at_threshold(scores: Any, is_genuine: Any, threshold: float) -> OperatingPoint:
    """TAR and FAR when pairs with score ≥ ``threshold`` are accepted.

    Shapes:
        scores: (n,) float. is_genuine: (n,) bool or 0/1.

    Raises:
        ValueError: shapes differ, non-finite scores, or no genuine / no impostor pair.
    """
    return _SortedScores(scores, is_genuine).point(float(threshold))


def operating_point_at_far(scores: Any, is_genuine: Any, far: float) -> OperatingPoint:
    """The operating point of the smallest observed threshold whose FAR ≤ ``far``.

    If no observed score qualifies (``far`` below ``1/#impostor`` and the highest impostor
    is the highest score), the threshold is ``inf`` and TAR = FAR = 0.

    Raises:
        ValueError: ``far`` outside [0, 1], or bad scores as in :func:`tar_at_threshold`.
    """
    _check_far(far)
    return _SortedScores(scores, is_genuine).point_at_far(far)


def tar_at_far(
    scores: Any, is_genuine: Any, fars: Sequence[float] = DEFAULT_FARS
) -> dict[str, float]:
    """TAR at each target FAR (threshold convention in the module docstring).

    Shapes:
        scores: (n,) float pair scores, higher = more alike. is_genuine: (n,) bool or 0/1.

    Returns:
        ``{far_label(f): TAR}`` in the order of ``fars``, e.g. ``{"tar@far=1e-04": 0.93}``.

    Raises:
        ValueError: a target outside [0, 1], shapes that differ, non-finite scores, or
            no genuine / no impostor pair.
    """
    for f in fars:
        _check_far(f)
    table = _SortedScores(scores, is_genuine)
    out: dict[str, float] = {}
    for f in fars:
        point = table.point_at_far(f)
        out[far_label(f)] = point.tar
        logger.debug("FAR target %g: threshold %.6f, TAR %.4f, FAR %.2e", f, *point)
    return out


def read_template_pairs(path: PathLike) -> TemplatePairs:
    """Read an ``ijbc_template_pair_label.txt``-style file: ``t1 t2 label`` per line.

    Raises:
        DataRootError: the file is missing.
        ValueError: a line without exactly three integers, or a label other than 0/1.
    """
    p = require_file(path, "template pair file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file is reported below
            table = np.loadtxt(p, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as e:
        raise ValueError(f"{p}: expected 't1 t2 label' (three integers) per line; {e}") from e
    if table.shape[0] == 0:
        raise ValueError(f"{p}: no pairs; expected 't1 t2 label' per line")
    if table.shape[1] != 3:
        raise ValueError(
            f"{p}: lines have {table.shape[1]} columns; expected 't1 t2 label' (three integers)"
        )
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(
            f"{p}: line {int(bad[0]) + 1} has label {int(labels[bad[0]])}; expected 0 or 1"
        )
    return TemplatePairs(table[:, 0].copy(), table[:, 1].copy(), labels.astype(bool))


def read_template_media(path: PathLike) -> TemplateMedia:
    """Read an ``ijbc_face_tid_mid.txt``-style file: ``image_name template_id media_id``.

    Raises:
        DataRootError: the file is missing.
        ValueError: a line without three fields, or non-integer ids (file and line named).
    """
    p = require_file(path, "template/media file")
    names: list[str] = []
    tids: list[int] = []
    mids: list[int] = []
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{p}:{line_no}: {line.strip()!r} has {len(fields)} fields; expected "
                    "'image_name template_id media_id'"
                )
            try:
                tids.append(int(fields[1]))
                mids.append(int(fields[2]))
            except ValueError as e:
                raise ValueError(
                    f"{p}:{line_no}: template and media ids must be integers, got "
                    f"{fields[1]!r} {fields[2]!r}"
                ) from e
            names.append(fields[0])
    if not names:
        raise ValueError(f"{p}: no images; expected 'image_name template_id media_id' per line")
    return TemplateMedia(
        np.asarray(names, dtype=str), np.asarray(tids, np.int64), np.asarray(mids, np.int64)
    )


def template_features(image_feats: Any, template_ids: Any, media_ids: Any) -> TemplateFeatures:
    """Media-weighted template features: normalise images, average per media, average the
    media of each template, normalise.

    Shapes:
        image_feats: (n, D) float. template_ids, media_ids: (n,) int.

    Raises:
        ValueError: bad features, id arrays whose length differs from the features, a zero
            image feature, or a template whose average is the zero vector.
    """
    x = check_features(image_feats, "image_feats").astype(np.float64)
    n = x.shape[0]
    tids = _int_ids(template_ids, n, "template_ids")
    mids = _int_ids(media_ids, n, "media_ids")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"image_feats row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is zero")
    x /= norms
    order = np.lexsort((mids, tids))
    t_sorted, m_sorted, x_sorted = tids[order], mids[order], x[order]
    new_media = np.ones(n, dtype=bool)
    new_media[1:] = (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])
    media_starts = np.flatnonzero(new_media)
    media_counts = np.diff(np.append(media_starts, n))
    media_means = np.add.reduceat(x_sorted, media_starts, axis=0) / media_counts[:, None]
    media_tids = t_sorted[media_starts]
    new_template = np.ones(media_tids.size, dtype=bool)
    new_template[1:] = media_tids[1:] != media_tids[:-1]
    template_starts = np.flatnonzero(new_template)
    sums = np.add.reduceat(media_means, template_starts, axis=0)
    sum_norms = np.linalg.norm(sums, axis=1, keepdims=True)
    out_ids = media_tids[template_starts]
    if (sum_norms <= 1e-12).any():
        bad = out_ids[sum_norms[:, 0] <= 1e-12][:3].tolist()
        raise ValueError(f"templates {bad} average to the zero vector; their media cancel out")
    return TemplateFeatures(out_ids, (sums / sum_norms).astype(np.float32))


def verification_scores(
    template_feats_a: TemplateFeatures,
    template_feats_b: TemplateFeatures,
    pairs: TemplatePairs,
    *,
    chunk_size: int = 65536,
) -> np.ndarray:
    """Cosine score of every pair: first template from ``a``, second from ``b``.

    Cross-test (§4.2): ``a`` from the old model, ``b`` from the new one; self-test: the
    same features twice.

    Returns:
        (n_pairs,) float32.

    Raises:
        IncompatibleSpacesError: ``a`` and ``b`` have different dimensions.
        ValueError: a pair names a template that has no feature.
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    fa = _unit_rows(template_feats_a, "template_feats_a")
    fb = _unit_rows(template_feats_b, "template_feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise IncompatibleSpacesError(
            f"template_feats_a has dimension {fa.shape[1]} and template_feats_b "
            f"{fb.shape[1]}; a cross-test needs one shared space (configure a projection)"
        )
    rows_a = _rows_of(template_feats_a.template_ids, pairs.first, "first", "template_feats_a")
    rows_b = _rows_of(template_feats_b.template_ids, pairs.second, "second", "template_feats_b")
    out = np.empty(rows_a.size, dtype=np.float32)
    for start in range(0, rows_a.size, chunk_size):
        sl = slice(start, start + chunk_size)
        out[sl] = np.einsum("ij,ij->i", fa[rows_a[sl]], fb[rows_b[sl]])
    return out


def evaluate_verification(
    first_image_feats: Any,
    second_image_feats: Any,
    media: TemplateMedia,
    pairs: TemplatePairs,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, float]:
    """IJB-C style 1:1 verification: templates from each model's image features, TAR@FAR.

    The first template of every pair uses ``first_image_feats`` and the second uses
    ``second_image_feats``: the old and the new model for a cross-test (MixBCT), the same
    array twice for a self-test.

    Shapes:
        first_image_feats, second_image_feats: (n, D_1), (n, D_2) float, rows in the order
            of ``media``.

    Returns:
        ``{far_label(f): TAR}`` as :func:`tar_at_far`.

    Raises:
        ValueError: row counts that differ from ``media``, and the errors of
            :func:`template_features`, :func:`verification_scores` and :func:`tar_at_far`.
    """
    ta = template_features(first_image_feats, media.template_ids, media.media_ids)
    if second_image_feats is first_image_feats:
        tb = ta
    else:
        tb = template_features(second_image_feats, media.template_ids, media.media_ids)
    scores = verification_scores(ta, tb, pairs)
    return tar_at_far(scores, pairs.label, fars)


def _check_far(far: float) -> None:
    if not (isinstance(far, (int, float, np.floating)) and 0.0 <= float(far) <= 1.0):
        raise ValueError(f"target FAR must be a number in [0, 1], got {far!r}")


def _int_ids(ids: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}; expected ({n},), one id per image")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _unit_rows(t: TemplateFeatures, name: str) -> np.ndarray:
    f = check_features(t.feats, f"{name}.feats")
    ids = np.asarray(t.template_ids)
    if ids.shape != (f.shape[0],):
        raise ValueError(
            f"{name}.template_ids has shape {ids.shape}; expected ({f.shape[0]},), one per row"
        )
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name}.feats row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is zero")
    return f / norms


def _rows_of(ids: np.ndarray, wanted: np.ndarray, side: str, name: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if sorted_ids.size > 1 and (np.diff(sorted_ids) == 0).any():
        raise ValueError(f"{name}.template_ids repeats ids; expected one feature per template")
    if sorted_ids.size == 0:
        pos, missing = np.zeros(0, dtype=np.int64), wanted
    else:
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), sorted_ids.size - 1)
        missing = wanted[sorted_ids[pos] != wanted]
    if missing.size:
        raise ValueError(
            f"{missing.size} pair(s) name {side} templates without a feature in {name}, e.g. "
            f"{np.unique(missing)[:3].tolist()}"
        )
    return order[pos]
