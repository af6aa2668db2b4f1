"""ertacache-eval end to end on the shipped testbed, in seconds (tiny step count and sample set)."""

import json
import sys

import pytest

from ertacache.cli import eval as eval_cli
from ertacache.eval.config import BASELINES, ERTA_METHODS


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "cal.txt"
    path.write_text("digit 1 moving left\ndigit 2 moving up\n")
    return path


@pytest.mark.slow
def test_eval_cli_smoke(cal_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = eval_cli.main(["--model", "wan2.1-tiny", "--steps", "8", "--speedups", "2", "--methods",
                        "baselines,erta,erta-t2-closed-full,diffusers-taylorseer-o1",
                        "--seeds", "1000-1001", "--calibration-prompts", str(cal_file), "--studies", "transfer",
                        "--wallclock", "--repeats", "1", "--json", str(tmp_path / "e.json"), "--out", str(out),
                        "--quiet"])
    assert rc == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    rows = doc["rows"]
    assert [r["method"] for r in rows] == ["uncached", *BASELINES, *ERTA_METHODS, "erta-t2-closed-full",
                                           "diffusers-taylorseer-o1"]
    assert all(r["full_steps"] == 4 for r in rows[1:] if r["method"] != "teacache")
    assert not set(doc["config"]["held_out_prompts"]) & set(doc["config"]["calibration_prompts"])
    assert doc["command"].startswith("ertacache-eval --model wan2.1-tiny") and doc["machine"]["cores"] >= 1
    assert doc["wallclock"]["rows"][0]["full_steps"] == 4 and len(doc["studies"]["transfer"]) == 3
    assert doc["wallclock"]["method"] == "erta-t2-closed-full"  # the studies use the product's default
    for name in ("psnr_vs_speedup.png", "schedules_2x.png", "strip.gif", "strip.png"):
        assert (out / name).stat().st_size > 1000
    out_text = capsys.readouterr().out
    assert "erta-closed-full" in out_text and "worst" in out_text and "pooled" in out_text


def test_missing_peers_extra_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # an environment without the extra
    rc = eval_cli.main(["--model", "wan2.1-tiny", "--steps", "6", "--quiet", "--methods", "cachedit-dbcache"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'ertacache[peers]'" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, match", [
    (["--methods", "bogus"], "unknown method 'bogus'"),
    (["--speedups", "9"], "above what 6 steps allow"),
    (["--seeds", "0-1"], "are calibration seeds"),
    (["--studies", "nope"], "unknown studies"),
    (["--seeds", "x"], "integers or ranges"),
])
def test_eval_cli_user_errors(extra, match, capsys):
    rc = eval_cli.main(["--model", "wan2.1-tiny", "--steps", "6", "--quiet", *extra])
    assert rc == 2
    assert match in capsys.readouterr().err
