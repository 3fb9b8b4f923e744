"""Output bytes of ``dppa merge`` and ``dppa-mergekit-yaml`` (fast path) for every method equal
those recorded from the reference commit in tests/data/golden_outputs.json (how to regenerate:
tests/engine_golden.py)."""

from __future__ import annotations

import pytest

import engine_golden as G

pytest.importorskip("mergekit", reason="the fast path reads mergekit's architecture definitions")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return G.shared_family(tmp_path_factory, "golden")


def test_inputs_are_the_recorded_ones(family):
    """The generator is integer-exact: a mismatch here means it changed, not the merge."""
    _, base, fts = family
    assert G.input_digests(base, fts) == G.load_golden()["inputs"]


@pytest.mark.parametrize("case", list(G.CASES))
def test_dppa_merge_bytes_unchanged(family, case):
    root, base, fts = family
    cfg = G.write_config(str(root / f"{case}.yml"), case, base, fts)
    assert G.run_dppa_merge(cfg, str(root / f"merge-{case}")) == G.load_golden()["dppa_merge"][case]


@pytest.mark.parametrize("case", list(G.CASES))
def test_mergekit_yaml_bytes_unchanged(family, case):
    root, base, fts = family
    cfg = G.write_config(str(root / f"{case}-mk.yml"), case, base, fts)
    assert G.run_mergekit_fast(cfg, str(root / f"mk-{case}")) == G.load_golden()["mergekit_yaml"][case]
