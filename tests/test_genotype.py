"""Genotype derivation (SPEC §3), the published genotypes, JSON and validation."""
import json
import math
import re

import numpy as np
import pytest
import torch

from fastdarts.errors import FastDartsError
from fastdarts.genotype import (DARTS, DARTS_V1, DARTS_V2, GENOTYPES, Genotype, derive_genotype, get_genotype,
                                num_edges)
from fastdarts.ops import DARTS_OPS, PRIMITIVES

# none, max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5
OPS = list(DARTS_OPS)


def alpha(steps: int, ops=OPS, **entries: float) -> torch.Tensor:
    """Zero α with some entries set: ``e3_skip_connect=1.0`` sets edge 3, op skip_connect."""
    a = torch.zeros(num_edges(steps), len(ops))
    for key, value in entries.items():
        edge, op = key.split("_", 1)
        a[int(edge[1:]), ops.index(op)] = value
    return a


def reference_parse(weights: np.ndarray, op_names, steps: int) -> list:
    """SPEC §3 restated with numpy, independently of the package: per node, rank the incoming
    edges by their strongest non-`none` weight (a stable sort: the earlier edge wins ties), keep
    two, each with its strongest non-`none` op (argmax: the earlier op wins ties)."""
    keep = [k for k, name in enumerate(op_names) if name != "none"]
    gene, start = [], 0
    for node in range(steps):
        rows = np.asarray(weights[start:start + node + 2])[:, keep]
        ranked = np.argsort(-rows.max(axis=1), kind="stable")[:2]
        gene += [(op_names[keep[int(np.argmax(rows[j]))]], int(j)) for j in ranked]
        start += node + 2
    return gene


# ---------------------------------------------------------------- derivation

def test_hand_computed_cell():
    # Every untouched row is uniform (each op 1/8); a row with one raised entry a has that op at
    # e^a / (e^a + 7), larger than 1/8 and growing with a. So per node the raised rows win, the
    # larger a first, each with its raised op:
    #   node 0 (edges 0,1):      e0 sep_conv_3x3=2.0 > e1 skip_connect=1.0
    #   node 1 (edges 2,3,4):    e4 dil_conv_3x3=3.0 > e3 sep_conv_5x5=1.0 > e2 max_pool_3x3=0.5 (dropped)
    #   node 2 (edges 5..8):     e8 avg_pool_3x3=2.0 > e5 skip_connect=1.5
    #   node 3 (edges 9..13):    e10 sep_conv_3x3=2.5 > e13 dil_conv_5x5=1.0
    a = alpha(4, e0_sep_conv_3x3=2.0, e1_skip_connect=1.0,
              e2_max_pool_3x3=0.5, e3_sep_conv_5x5=1.0, e4_dil_conv_3x3=3.0,
              e5_skip_connect=1.5, e8_avg_pool_3x3=2.0,
              e10_sep_conv_3x3=2.5, e13_dil_conv_5x5=1.0)
    g = derive_genotype(a, torch.zeros(14, 8), OPS)
    assert g.normal == (("sep_conv_3x3", 0), ("skip_connect", 1),
                        ("dil_conv_3x3", 2), ("sep_conv_5x5", 1),
                        ("avg_pool_3x3", 3), ("skip_connect", 0),
                        ("sep_conv_3x3", 1), ("dil_conv_5x5", 4))
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce_concat == (2, 3, 4, 5)
    # A uniform α: every edge and op ties, so the earliest two edges and the first non-none op.
    assert g.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4


def test_none_never_decides_edge_or_op():
    # node 0: e0 has `none` far ahead of max_pool_3x3; the kept op must still be max_pool_3x3
    #         (weight e / (e^5 + e + 6) = 0.017, second to e1's sep_conv_3x3 at e / (e + 7) = 0.28).
    # node 1: e2 has the largest weight of all, but on `none`: it must lose to e3 and e4.
    a = alpha(2, e0_none=5.0, e0_max_pool_3x3=1.0, e1_sep_conv_3x3=1.0,
              e2_none=10.0, e3_sep_conv_3x3=0.5, e4_skip_connect=0.3)
    g = derive_genotype(a, a, OPS, steps=2, multiplier=2)
    assert g.normal == (("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 2))
    assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_strength_is_the_softmax_weight_with_none_in_the_denominator():
    # e2: sep_conv_3x3 α=2 but `none` α=3 -> e^2 / (e^3 + e^2 + 6) = 0.221
    # e3: skip_connect α=1                -> e^1 / (e^1 + 7)       = 0.280, so e3 beats e2
    # e4: uniform                         -> 1/8, dropped
    assert math.exp(2) / (math.exp(3) + math.exp(2) + 6) < math.e / (math.e + 7)
    a = alpha(2, e2_none=3.0, e2_sep_conv_3x3=2.0, e3_skip_connect=1.0)
    g = derive_genotype(a, a, OPS, steps=2, multiplier=2)
    assert g.normal[2:] == (("skip_connect", 1), ("sep_conv_3x3", 0))


def test_ties_keep_the_earlier_edge_and_the_earlier_op():
    # node 1: e3 and e4 tie exactly and beat e2 -> e3 (input 1) first, then e4 (input 2).
    # e3 ties sep_conv_3x3 with dil_conv_3x3 -> sep_conv_3x3 (earlier in op_names).
    a = alpha(2, e3_sep_conv_3x3=1.0, e3_dil_conv_3x3=1.0, e4_sep_conv_3x3=1.0, e4_dil_conv_3x3=1.0)
    g = derive_genotype(a, a, OPS, steps=2, multiplier=2)
    assert g.normal[2:] == (("sep_conv_3x3", 1), ("sep_conv_3x3", 2))
    # The same α with the two tied ops listed the other way round picks the other op.
    swapped = list(OPS)
    i, j = swapped.index("sep_conv_3x3"), swapped.index("dil_conv_3x3")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    g = derive_genotype(a, a, swapped, steps=2, multiplier=2)
    assert g.normal[2:] == (("dil_conv_3x3", 1), ("dil_conv_3x3", 2))
    # A three-way tie between edges keeps the first two, in edge order.
    g = derive_genotype(torch.ones(5, 8), torch.ones(5, 8), OPS, steps=2, multiplier=2)
    assert [src for _, src in g.normal] == [0, 1, 0, 1]


def test_edges_are_emitted_strongest_first():
    a = alpha(1, e0_skip_connect=1.0, e1_skip_connect=2.0)
    assert derive_genotype(a, a, OPS, steps=1, multiplier=1).normal == (("skip_connect", 1), ("skip_connect", 0))


def test_op_set_without_none_counts_every_op():
    ops = ["max_pool_3x3", "skip_connect", "sep_conv_3x3"]
    # Without `none` in the list, the first op is an ordinary candidate and may win.
    a = alpha(2, ops, e0_max_pool_3x3=4.0, e1_sep_conv_3x3=1.0, e2_max_pool_3x3=3.0, e4_skip_connect=2.0)
    g = derive_genotype(a, a, ops, steps=2, multiplier=2)
    assert g.normal == (("max_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2))


@pytest.mark.parametrize("steps,multiplier,concat", [(2, 2, (2, 3)), (4, 2, (4, 5)), (3, 3, (2, 3, 4)), (1, 1, (2,))])
def test_steps_and_multiplier(steps, multiplier, concat):
    torch.manual_seed(0)
    a = torch.randn(num_edges(steps), len(OPS))
    g = derive_genotype(a, a, OPS, steps=steps, multiplier=multiplier)
    assert g.steps == steps and len(g.normal) == 2 * steps
    assert g.normal_concat == concat and g.reduce_concat == concat


@pytest.mark.parametrize("ops", [DARTS_OPS, PRIMITIVES, ("skip_connect", "sep_conv_3x3"), ("none", "conv_3x3")])
def test_matches_an_independent_statement_of_the_rule(ops):
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        a_n = torch.randn(14, len(ops), generator=gen)
        a_r = torch.randn(14, len(ops), generator=gen) * 3
        g = derive_genotype(a_n, a_r, ops)
        assert list(g.normal) == reference_parse(torch.softmax(a_n, -1).numpy(), list(ops), 4)
        assert list(g.reduce) == reference_parse(torch.softmax(a_r, -1).numpy(), list(ops), 4)


def test_accepts_grad_tensors_and_numpy_alike():
    torch.manual_seed(2)
    a = torch.randn(14, 8, requires_grad=True)
    b = torch.randn(14, 8)
    assert derive_genotype(a, b, OPS) == derive_genotype(a.detach().numpy(), b.numpy(), OPS)
    assert derive_genotype(a.double(), b.double(), "darts") == derive_genotype(a, b, OPS)


def test_bad_alpha_is_reported():
    with pytest.raises(FastDartsError, match=r"alpha_normal has shape \(13, 8\), expected \(14, 8\)"):
        derive_genotype(torch.zeros(13, 8), torch.zeros(14, 8), OPS)
    with pytest.raises(FastDartsError, match=r"alpha_reduce has shape \(14, 7\), expected \(14, 8\)"):
        derive_genotype(torch.zeros(14, 8), torch.zeros(14, 7), OPS)
    with pytest.raises(FastDartsError, match=r"expected \(5, 8\).*steps=2"):
        derive_genotype(torch.zeros(14, 8), torch.zeros(14, 8), OPS, steps=2, multiplier=2)
    with pytest.raises(FastDartsError, match="NaN"):
        derive_genotype(torch.full((14, 8), float("nan")), torch.zeros(14, 8), OPS)
    with pytest.raises(FastDartsError, match="torch tensor or numpy array"):
        derive_genotype([[0.0] * 8] * 14, torch.zeros(14, 8), OPS)
    with pytest.raises(FastDartsError, match="multiplier"):
        derive_genotype(torch.zeros(14, 8), torch.zeros(14, 8), OPS, multiplier=5)
    with pytest.raises(FastDartsError, match="only 'none'"):
        derive_genotype(torch.zeros(14, 1), torch.zeros(14, 1), ["none"])
    with pytest.raises(FastDartsError, match="unknown op 'conv_9x9'"):
        derive_genotype(torch.zeros(14, 2), torch.zeros(14, 2), ["none", "conv_9x9"])


# ---------------------------------------------------------------- published genotypes

def test_published_genotypes():
    assert DARTS_V1.normal == (("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                               ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2))
    assert DARTS_V1.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                               ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0))
    assert DARTS_V2.normal == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                               ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2))
    assert DARTS_V2.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                               ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1))
    for g in (DARTS_V1, DARTS_V2):
        assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5) and g.steps == 4
    assert DARTS is DARTS_V2
    assert GENOTYPES == {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


# ---------------------------------------------------------------- JSON

def test_json_round_trip(tmp_path):
    torch.manual_seed(3)
    derived = derive_genotype(torch.randn(5, 8), torch.randn(5, 8), OPS, steps=2, multiplier=2)
    for g in (DARTS_V1, DARTS_V2, derived):
        assert Genotype.from_json(g.to_json()) == g
        assert Genotype.from_dict(json.loads(g.to_json())) == g
        assert Genotype.from_dict(g.to_dict()) == g
        g.save(tmp_path / "sub" / "g.json")
        assert Genotype.load(tmp_path / "sub" / "g.json") == g
    d = DARTS_V2.to_dict()
    assert d["normal"][0] == ["sep_conv_3x3", 0] and d["reduce_concat"] == [2, 3, 4, 5]
    assert set(d) == {"normal", "normal_concat", "reduce", "reduce_concat"}


def test_lists_and_tuples_construct_equal_hashable_genotypes():
    as_lists = Genotype(**DARTS_V2.to_dict())
    assert as_lists == DARTS_V2 and hash(as_lists) == hash(DARTS_V2)
    assert isinstance(as_lists.normal, tuple) and isinstance(as_lists.normal[0], tuple)
    assert as_lists != DARTS_V1


def test_get_genotype(tmp_path):
    assert get_genotype("DARTS_V1") is DARTS_V1
    assert get_genotype("DARTS") == DARTS_V2
    path = tmp_path / "mine.json"
    DARTS_V1.save(path)
    assert get_genotype(str(path)) == DARTS_V1
    assert get_genotype(path) == DARTS_V1
    with pytest.raises(FastDartsError, match="unknown genotype 'DARTS_V3'.*DARTS_V1, DARTS_V2, DARTS"):
        get_genotype("DARTS_V3")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FastDartsError, match=re.escape(str(bad)) + ".*not valid JSON"):
        get_genotype(str(bad))
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"normal": DARTS_V1.to_dict()["normal"]}))
    with pytest.raises(FastDartsError, match=re.escape(str(incomplete)) + ".*missing key.*normal_concat"):
        get_genotype(str(incomplete))
    with pytest.raises(FastDartsError, match="not valid JSON"):
        Genotype.from_json("[1, 2")


# ---------------------------------------------------------------- validation

def with_(**changes):
    d = DARTS_V2.to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("d,pattern", [
    ({k: v for k, v in DARTS_V2.to_dict().items() if k != "reduce_concat"}, r"missing key\(s\) reduce_concat"),
    (with_(extra=1), r"unexpected key\(s\) extra"),
    (with_(normal=[["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["skip_connect", 3], ["skip_connect", 0]],
           reduce=DARTS_V2.to_dict()["reduce"][:4]),
     r"normal edge 2 \(node 1\) takes input 3, which is not an earlier node; node 1 may take inputs 0..2"),
    (with_(normal=[["sep_conv_3x3", 2], ["sep_conv_3x3", 1]] + DARTS_V2.to_dict()["normal"][2:]),
     r"normal edge 0 \(node 0\) takes input 2, which is not an earlier node"),
    (with_(reduce=[["max_pool_3x3", -1]] + DARTS_V2.to_dict()["reduce"][1:]),
     r"reduce edge 0 \(node 0\) takes input -1"),
    (with_(normal=[["conv_9x9", 0]] + DARTS_V2.to_dict()["normal"][1:]),
     r"unknown op 'conv_9x9'; known ops: none, max_pool_3x3, .*conv_1x3_3x1"),
    (with_(reduce=[["none", 0]] + DARTS_V2.to_dict()["reduce"][1:]), r"reduce edge 0 \(node 0\) keeps the op 'none'"),
    (with_(normal_concat=[2, 3, 6]), r"normal_concat has \[6\] outside 2..5"),
    (with_(reduce_concat=[1, 2]), r"reduce_concat has \[1\] outside 2..5"),
    (with_(normal_concat=[2, 2, 3]), r"normal_concat \[2, 2, 3\] names a node twice"),
    (with_(reduce_concat=[]), r"reduce_concat is empty"),
    (with_(normal_concat="2345"), r"normal_concat must be a list of node indices"),
    (with_(normal=DARTS_V2.to_dict()["normal"][:7]), r"normal has 7 edges; a cell needs 2 per intermediate node"),
    (with_(normal=[]), r"normal has no edges"),
    (with_(reduce=DARTS_V2.to_dict()["reduce"][:6]),
     r"normal has 4 intermediate nodes but reduce has 3"),
    (with_(normal=[["sep_conv_3x3"]] + DARTS_V2.to_dict()["normal"][1:]),
     r"normal edge 0 must be an \[op_name, input_node\] pair, got \['sep_conv_3x3'\]"),
    (with_(normal=[["sep_conv_3x3", "0"]] + DARTS_V2.to_dict()["normal"][1:]), r"normal edge 0 must be an"),
    (with_(normal=[["sep_conv_3x3", True]] + DARTS_V2.to_dict()["normal"][1:]), r"normal edge 0 must be an"),
    (with_(normal=[[0, "sep_conv_3x3"]] + DARTS_V2.to_dict()["normal"][1:]), r"normal edge 0 must be an"),
    (with_(reduce="max_pool_3x3"), r"reduce must be a list of \[op_name, input_node\] pairs"),
    ([1, 2], r"a genotype must be a JSON object"),
])
def test_validation_errors_are_one_clear_line(d, pattern):
    with pytest.raises(FastDartsError, match=pattern) as info:
        Genotype.from_dict(d)
    assert "\n" not in str(info.value)


def test_missing_and_extra_keys_are_both_named():
    d = with_(extra=1, other=2)
    del d["normal"]
    with pytest.raises(FastDartsError, match=r"missing key\(s\) normal; unexpected key\(s\) extra, other"):
        Genotype.from_dict(d)


def test_constructor_validates_too():
    with pytest.raises(FastDartsError, match="keeps the op 'none'"):
        Genotype(normal=[("none", 0), ("skip_connect", 1)], normal_concat=[2],
                 reduce=[("skip_connect", 0), ("skip_connect", 1)], reduce_concat=[2])


def test_str_shows_ops_and_node_structure():
    text = str(DARTS_V2)
    lines = text.splitlines()
    assert lines[0] == "normal cell:"
    assert lines[1] == "  node 0 = sep_conv_3x3(c_{k-2}) + sep_conv_3x3(c_{k-1})"
    assert lines[4] == "  node 3 = skip_connect(c_{k-2}) + dil_conv_3x3(node 0)"
    assert lines[5] == "  output = concat(node 0, node 1, node 2, node 3)"
    assert lines[6] == "reduce cell:"
    assert lines[8] == "  node 1 = skip_connect(node 0) + max_pool_3x3(c_{k-1})"
    assert len(lines) == 12
