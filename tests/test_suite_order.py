"""`make test` hands tests to two pytest-xdist workers scope by scope, in collection order
(`--no-loadscope-reorder`); conftest.longest_first puts the costliest scopes first, so that a long test does not
start last and run alone. Checked on stand-in items: the order is by scope cost (marks plus fixtures, a shared
fixture counted once per group), groups stay together, and ties keep collection order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import FIXTURE_COST, longest_first


class Item:
    def __init__(self, nodeid: str, cost: float | None = None, group: str | None = None, fixtures=(), module="tests.test_x"):
        self.nodeid = nodeid
        self._marks = {}
        if cost is not None:
            self._marks["cost"] = pytest.mark.cost(cost).mark
        if group is not None:
            self._marks["xdist_group"] = pytest.mark.xdist_group(group).mark
        self._fixtureinfo = SimpleNamespace(name2fixturedefs={f: () for f in fixtures})
        self.module = SimpleNamespace(__name__=module)

    def get_closest_marker(self, name):
        return self._marks.get(name)

    def __repr__(self):
        return self.nodeid


def ids(items):
    return [i.nodeid for i in items]


def test_costliest_scope_first_groups_together_ties_in_collection_order():
    a, b = Item("a"), Item("b")
    long_one = Item("long", cost=800)
    g1, g2 = Item("g1", group="runs", fixtures=["smoke_run"]), Item("g2", group="runs", fixtures=["smoke_run", "ray_run"])
    mid = Item("mid", cost=240)
    c = Item("c")
    out = longest_first([a, g1, b, long_one, g2, mid, c])
    # runs: the two fixtures once each + two tests at 1 s; then the 800 s test, the 240 s test, the rest
    expected_runs = FIXTURE_COST["smoke_run"] + FIXTURE_COST["ray_run"] + 2
    head = ["g1", "g2", "long"] if expected_runs > 800 else ["long", "g1", "g2"]
    assert ids(out) == head + ["mid", "a", "b", "c"]


def test_a_shared_fixture_counts_once_per_group():
    # three tests of one group on the same 450 s fixture: 453, not 1353, so the 800 s test goes first
    grp = [Item(f"s{i}", group="runs", fixtures=["smoke_run"]) for i in range(3)]
    out = longest_first([*grp, Item("long", cost=800)])
    assert ids(out) == ["long", "s0", "s1", "s2"]


def test_image_encoder_run_fixture_costs_only_in_its_module():
    enc = Item("enc", group="test_image_encoder", fixtures=["run"], module="tests.test_image_encoder")
    other = Item("other", group="test_other", fixtures=["run"], module="tests.test_other")
    out = longest_first([other, Item("mid", cost=100), enc])
    assert ids(out) == ["enc", "mid", "other"]
