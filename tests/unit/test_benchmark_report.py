"""The benchmark's ratio report (`benchmarks.run.ratios`): against the right peer, and, with several
tries, paired round by round."""

from __future__ import annotations

from benchmarks.run import ratios, round_ratios


def _result(name, trainer, tokens_per_s, round_=0, checkpointing=True):
    return {
        "name": name,
        "trainer": trainer,
        "method": "lora",
        "tokens_per_s": tokens_per_s,
        "peak_rss_mb": 1000.0,
        "losses": [2.0] * 5,
        "eval_loss": 2.0,
        "gradient_checkpointing": checkpointing,
        "round": round_,
    }


def test_round_ratios_pair_tries_of_the_same_round():
    runs = {
        "trl": [_result("trl", "trl", 100, 0), _result("trl", "trl", 200, 1)],
        "ours": [_result("ours", "tunelab", 400, 0), _result("ours", "tunelab", 500, 1)],
    }
    assert round_ratios(runs, "ours", "trl") == [4.0, 2.5]


def test_ratios_use_the_best_tries_and_report_the_median_of_rounds():
    runs = {
        "trl": [_result("trl", "trl", t, i) for i, t in enumerate((100, 120, 110))],
        "trl nock": [
            _result("trl nock", "trl", t, i, checkpointing=False) for i, t in enumerate((150, 150, 150))
        ],
        "ours": [_result("ours", "tunelab", t, i) for i, t in enumerate((380, 600, 330))],
    }
    best = [max(tries, key=lambda r: r["tokens_per_s"]) for tries in runs.values()]
    lines = ratios(best, "lora", runs)
    assert lines[0].startswith("lora vs TRL's best default setting 'trl' (120 tok/s")
    assert "tokens/s x5.00" in lines[1]  # 600 / 120: best against best
    assert lines[2].strip() == "tokens/s by round x3.80 x5.00 x3.00, median x3.80"
    assert lines[3].startswith("lora vs TRL's fastest setting 'trl nock' (150 tok/s")
    assert "tokens/s x4.00" in lines[4]
    assert "median x2.53" in lines[5]  # 380 / 150
    assert len(ratios(best, "lora")) == 4  # one try each: no round lines
