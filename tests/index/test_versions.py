"""Routes between versions: same, declared compatible, query transformed; anything else fails."""

from __future__ import annotations

import pytest

from compatkit.errors import IncompatibleSpacesError
from compatkit.index.versions import Relation, VersionInfo, can_search, check_name, find_route

VERSIONS = {name: VersionInfo(name, dim, True) for name, dim in
            [("vA", 4), ("vB", 4), ("vC", 6), ("vD", 4)]}


def test_same_version_needs_no_relation():
    assert find_route("vA", "vA", [], VERSIONS).via == "same"


def test_compatibility_is_directed():
    rels = [Relation("compatible", old="vA", new="vB")]
    route = find_route("vB", "vA", rels, VERSIONS)
    assert (route.via, route.relation) == ("compatible", rels[0])
    assert not can_search("vA", "vB", rels, VERSIONS)  # old queries cannot read new vectors


def test_transformation_maps_the_query():
    rels = [Relation("transform", old="vA", new="vC", artifact="/t")]
    assert find_route("vA", "vC", rels, VERSIONS).via == "transform"
    assert not can_search("vC", "vA", rels, VERSIONS)


def test_transformation_with_side_information_cannot_map_a_query():
    rels = [Relation("transform", old="vA", new="vC", artifact="/t", side_version="s")]
    assert not can_search("vA", "vC", rels, VERSIONS)


def test_no_relation_names_both_versions():
    with pytest.raises(IncompatibleSpacesError) as err:
        find_route("vD", "vA", [Relation("compatible", old="vA", new="vB")], VERSIONS)
    assert str(err.value) == (
        "a query of version 'vD' cannot search vectors of version 'vA': no declared relation "
        "connects them (declare 'vD' compatible with 'vA', or register a transformation "
        "'vD' -> 'vA')")


def test_declared_compatibility_with_other_dimension_fails():
    with pytest.raises(IncompatibleSpacesError, match=r"dimensions differ \(6 vs 4\)"):
        find_route("vC", "vA", [Relation("compatible", old="vA", new="vC")], VERSIONS)


@pytest.mark.parametrize("bad", ["", " vA", "a/b", "x" * 129, 3])
def test_bad_names(bad):
    with pytest.raises(ValueError, match="version name must be 1-128 characters"):
        check_name(bad, "version")
