"""What every console script shares: --version, --threads, a --help that loads no torch, one flag per concept."""

import subprocess
import sys
from importlib import import_module
from importlib.metadata import entry_points

import pytest

import ertacache
from ertacache.cli import common

SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("ertacache.")}
MODULES = sorted({target.split(":")[0] for target in SCRIPTS.values()})


def test_every_console_script_is_a_cli_module_with_main():
    assert len(SCRIPTS) >= 8
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), name


@pytest.mark.parametrize("module", MODULES)
def test_parsers_build_without_importing_torch(module):
    """--help and --version answer before torch loads (it takes seconds): the heavy imports sit after parsing."""
    code = (f"import sys; import {module} as m; m.parser(); "
            f"getattr(m, 'serve_parser', lambda: None)(); "
            "heavy = [n for n in ('torch', 'diffusers', 'onnxruntime', 'transformers') if n in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{module} imports {done.stdout.strip()} to build its parser\n{done.stderr}"


@pytest.mark.parametrize("module", MODULES)
def test_version_and_threads_on_every_script(module, capsys):
    m = import_module(module)
    with pytest.raises(SystemExit) as exit_:
        m.parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert ertacache.__version__ in capsys.readouterr().out
    actions = {s for a in m.parser()._actions for s in a.option_strings}
    assert "--threads" in actions


def test_threads_must_be_positive(capsys):
    from ertacache.cli import run

    with pytest.raises(SystemExit):
        run.parser().parse_args(["--engines", "x", "--prompt", "p", "--out", "v.gif", "--threads", "-1"])
    assert "0 (auto) or more threads" in capsys.readouterr().err
    args = run.parser().parse_args(["--engines", "x", "--prompt", "p", "--out", "v.gif"])
    assert args.threads == common.DEFAULT_THREADS


def test_the_export_folder_is_engines_everywhere_and_out_is_kept_as_an_alias():
    from ertacache.cli import build, export, run, triton, verify

    assert export.parser().parse_args(["--engines", "e"]).engines == "e"
    assert export.parser().parse_args(["--out", "e"]).engines == "e"  # the old spelling
    assert run.parser().parse_args(["--engines", "e", "--prompt", "p", "--out", "v.gif"]).engines == "e"
    assert verify.parser().parse_args(["--engines", "e", "--prompt", "p"]).engines == "e"
    assert build.parser().parse_args(["--engines", "e"]).engines == "e"
    assert triton.parser().parse_args(["--engines", "e", "--repo", "r"]).engines == "e"
    args = triton.parser().parse_args(["--engines", "e", "--repo", "r", "--intra-op-threads", "3"])
    assert args.intra_op_threads == 3  # old spelling of --threads there


def test_triton_usage_names_the_serve_subcommand(capsys):
    from ertacache.cli import triton

    with pytest.raises(SystemExit):
        triton.parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "ertacache-triton serve --repo" in out and "--log-dir" in triton.serve_parser().format_help()


def test_names_spelled_in_the_clis_agree_with_the_library():
    from ertacache.cli import build, eval as eval_cli, verify
    from ertacache.engines.base import BACKENDS
    from ertacache.engines.tensorrt import HARDWARE_COMPATIBILITY
    from ertacache.eval.config import ALL_METHODS, METHOD_GROUPS
    from ertacache.eval.studies import STUDIES
    from ertacache.export.config import DEFAULT_TARGETS, TARGETS
    from ertacache.runtime.verify import TOLERANCES

    assert common.BACKEND_NAMES == tuple(BACKENDS)
    assert common.EXPORT_TARGETS == tuple(TARGETS) and common.DEFAULT_EXPORT_TARGETS == tuple(DEFAULT_TARGETS)
    assert verify.TOLERANCES == TOLERANCES
    assert build.HARDWARE_COMPATIBILITY == tuple(HARDWARE_COMPATIBILITY)
    assert eval_cli.ALL_METHODS == tuple(ALL_METHODS) and eval_cli.METHOD_GROUPS == tuple(METHOD_GROUPS)
    assert eval_cli.STUDIES == tuple(STUDIES)


def test_a_video_name_that_cannot_be_written_is_refused_before_any_sampling(tmp_path, capsys):
    from ertacache.cli import generate

    # a model that does not exist: the output check must come first, so this fails on the suffix
    rc = generate.main(["--model", "nope", "--prompt", "p", "--out", str(tmp_path / "v.avi")])
    assert rc == 2 and ".gif" in capsys.readouterr().err
    assert not (tmp_path / "v.avi").exists()


def test_mp4_writes_out_of_the_box(tmp_path):
    import numpy as np

    from ertacache.video import check_writable, save_video

    check_writable(tmp_path / "v.mp4")
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    path = save_video(frames, tmp_path / "v.mp4")
    assert path.read_bytes()[4:8] == b"ftyp"  # an ISO media file
