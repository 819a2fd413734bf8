"""DARTS+ early stopping and the per-epoch ranking measures (issue 9 §2)."""
import json

import pytest

from fastdarts.cli import search_main
from fastdarts.errors import FastDartsError
from fastdarts.genotype import Genotype
from fastdarts.methods.early_stop import canonical, parse_early_stop, rank_measures, skip_connects, stop_reason
from fastdarts.ops import DARTS_OPS
from fastdarts.rank_stats import kendall_tau
import fastdarts.search_loop as search_module
from fastdarts.search_loop import SearchConfig, search

TINY = dict(dataset="digits", layout="N,R,N", layers=None, channels=4, steps=2, multiplier=2, batch_size=16,
            max_steps=2, device="cpu", progress=False, order="first")


def _quiet(_):
    pass


def test_parse_and_canonical_form():
    assert parse_early_stop(None) == {}
    assert parse_early_stop("skip:2") == {"skip": 2}
    assert parse_early_stop(["stable:10", "skip:2"]) == {"stable": 10, "skip": 2}
    assert canonical(parse_early_stop("stable:10,skip:2")) == "skip:2,stable:10"
    for bad, message in [("often:3", "unknown early-stop criterion"), ("skip", "positive integer"),
                         ("skip:0", "positive integer"), ("stable:x", "positive integer"),
                         ("skip:2,skip:3", "given twice")]:
        with pytest.raises(FastDartsError, match=message):
            parse_early_stop(bad)


def _cell(rows):
    """Two edges of a 1-step cell, as softmax weights."""
    return [list(map(float, r)) for r in rows]


def test_rank_measures_on_a_scripted_history():
    ops = DARTS_OPS  # parametric: indices 4..7
    a = {"normal": _cell([[.1, .1, .1, .1, .2, .15, .1, .05], [.125] * 8]),
         "reduce": _cell([[.125] * 8, [.125] * 8])}
    # Only a non-parametric op moves: the parametric ranking holds.
    b = {"normal": _cell([[.05, .15, .1, .1, .2, .15, .1, .05], [.125] * 8]), "reduce": a["reduce"]}
    m = rank_measures(a, b, ops, unchanged_before=3)
    assert m["rank_unchanged_epochs"] == 4
    # τ per edge, constant rows count as 1 (nothing moved): mean of τ(edge 0) and three 1s.
    assert m["alpha_rank_tau"] == pytest.approx((kendall_tau(a["normal"][0], b["normal"][0]) + 3) / 4)
    # Two parametric ops swap on one edge: the count restarts.
    c = {"normal": _cell([[.05, .15, .1, .1, .15, .2, .1, .05], [.125] * 8]), "reduce": a["reduce"]}
    assert rank_measures(b, c, ops, unchanged_before=4)["rank_unchanged_epochs"] == 0


def test_stop_reasons():
    genotype = Genotype(normal=[("skip_connect", 0), ("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
                        normal_concat=[2, 3], reduce=[("max_pool_3x3", 0), ("skip_connect", 1)] * 2,
                        reduce_concat=[2, 3])
    assert skip_connects(genotype) == 3  # the normal cell only
    entry = dict(skip_connects=3, rank_unchanged_epochs=4)
    assert stop_reason({}, entry) is None
    assert "skip:2" in stop_reason({"skip": 2}, entry)
    assert stop_reason({"skip": 4}, entry) is None
    assert stop_reason({"stable": 5}, entry) is None
    both = stop_reason({"skip": 3, "stable": 4}, entry)
    assert "skip:3" in both and "stable:4" in both


def test_every_search_records_the_measures(tmp_path):
    result = search(SearchConfig(epochs=2, **TINY), out=str(tmp_path), log=_quiet)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for m, e in zip(lines, result.history):
        assert m["skip_connects"] == skip_connects(Genotype.from_dict(m["genotype"]))
        assert isinstance(m["rank_unchanged_epochs"], int) and -1 <= m["alpha_rank_tau"] <= 1
        assert m["stopped"] is None
    # Epoch 2 is measured against epoch 1's α.
    expected = rank_measures(lines[0]["alphas"], lines[1]["alphas"], DARTS_OPS, lines[0]["rank_unchanged_epochs"])
    assert lines[1]["alpha_rank_tau"] == pytest.approx(expected["alpha_rank_tau"])
    assert result.stopped is None


def test_a_search_stops_at_the_first_epoch_meeting_a_criterion(tmp_path, monkeypatch):
    # Scripted: the normal cell "holds" 1, 2, 3... skip connections in epochs 1, 2, 3...
    counts = iter(range(1, 10))
    monkeypatch.setattr(search_module, "skip_connects", lambda genotype: next(counts))
    logged = []
    result = search(SearchConfig(epochs=4, early_stop="skip:2", **TINY), out=str(tmp_path), log=logged.append)
    assert len(result.history) == 2 and "skip:2" in result.stopped
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["stopped"] is not None for m in lines] == [False, True]
    assert any(line.startswith("stopping after epoch 2/4: early stop (skip:2)") for line in logged)
    # The result is the stopping epoch's genotype.
    assert Genotype.load(tmp_path / "genotype.json").to_dict() == lines[-1]["genotype"]
    # Resuming a stopped run says it has finished and trains nothing more.
    logged.clear()
    again = search(SearchConfig(epochs=4, early_stop="skip:2", **TINY), out=str(tmp_path), resume=True,
                   log=logged.append)
    assert len(again.history) == 2 and any("this search has finished" in line for line in logged)


def test_stable_criterion_in_the_loop(tmp_path, monkeypatch):
    real = search_module.rank_measures

    def always_stable(previous, current, ops, unchanged_before):
        return dict(real(previous, current, ops, unchanged_before), rank_unchanged_epochs=unchanged_before + 1)

    monkeypatch.setattr(search_module, "rank_measures", always_stable)
    result = search(SearchConfig(epochs=5, early_stop=["stable:3"], **TINY), out=str(tmp_path), log=_quiet)
    assert len(result.history) == 3 and "stable:3" in result.stopped


def test_criteria_are_result_defining(tmp_path):
    search(SearchConfig(epochs=1, **TINY), out=str(tmp_path), log=_quiet)
    with pytest.raises(FastDartsError, match="early_stop: checkpoint None vs now 'skip:2'"):
        search(SearchConfig(epochs=1, early_stop="skip:2", **TINY), out=str(tmp_path), resume=True, log=_quiet)


def test_bad_criterion_is_one_line_before_any_data(tmp_path, capsys):
    out = tmp_path / "run"
    # cifar10 without data: a data error would come later; the criterion is refused first.
    assert search_main(["--early-stop", "often:3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown early-stop criterion 'often:3'" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_op_list_of_only_none_is_refused_before_any_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert search_main(["--ops", "none", "--out", str(out)]) == 2
    assert "only 'none'" in capsys.readouterr().err and not out.exists()
