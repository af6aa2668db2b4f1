"""Bad-input sweep of every console script: malformed values, files and folders.

Each case runs one console script on bad input and must

1. exit non-zero,
2. print no Python traceback (the error is one ``error: ...`` line),
3. create or change no file outside the sweep's temporary folder (the export folder given with
   ``--engines`` is copied before any case edits it, and it and the repository are watched).

    python tools/fuzz_cli.py                        # builds a small export of wan2.1-tiny first (~1 min)
    python tools/fuzz_cli.py --engines engines/demo/export --json fuzz.json
    python tools/fuzz_cli.py --quick                # the reduced set the test suite runs
    python tools/fuzz_cli.py --subprocess           # each case as its own `python -m ertacache.cli.X` process

By default the cases run in this process (``main(argv)`` of each CLI, stdout/stderr captured,
working directory set to the case's folder): a traceback is an exception escaping ``main``
(anything but SystemExit) or a traceback on stderr. ``--subprocess`` runs the real entry points
as new processes (slower: one interpreter and torch import per case) and reads their exit code
and stderr. The summary reports the count tried and the count of tracebacks; the exit code is 1
when any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "ertacache-profile": "ertacache.cli.profile", "ertacache-generate": "ertacache.cli.generate",
    "ertacache-export": "ertacache.cli.export", "ertacache-run": "ertacache.cli.run",
    "ertacache-verify": "ertacache.cli.verify", "ertacache-build": "ertacache.cli.build",
    "ertacache-eval": "ertacache.cli.eval", "ertacache-triton": "ertacache.cli.triton",
}
#: not watched for changes: where tools write caches and environments
_SKIP_NAMES = {".git", ".venv", ".venv-triton", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


@dataclass
class Ctx:
    """What a case builds its arguments from: its own folder and copies of the sources."""

    work: Path  # the case's folder (the working directory of the run)
    engines: Path  # the source export folder (never edited: copy it with `folder()`)

    def folder(self, name: str = "engines") -> Path:
        """A fresh copy of the export folder inside the case's folder."""
        dest = self.work / name
        if not dest.exists():
            shutil.copytree(self.engines, dest, symlinks=True)
        return dest

    def profile(self) -> Path:
        dest = self.work / "profile"
        if not dest.exists():
            shutil.copytree(self.engines / "profile", dest, symlinks=True)
        return dest

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


@dataclass
class Case:
    name: str
    script: str
    argv: Callable[[Ctx], list[str]]
    quick: bool = False  # in the reduced set the test suite runs


@dataclass
class Result:
    name: str
    script: str
    rc: int | None
    traceback: str | None
    changed: list[str]
    seconds: float
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.rc not in (0, None) and self.traceback is None and not self.changed


# ---- helpers that damage copies of the sources ---------------------------------------------------------------

def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rehash(folder: Path, *rels: str) -> None:
    """Record new sha256s of ``rels`` in the folder's manifest (a 'legitimate-looking' edit)."""
    from ertacache.io import sha256_file

    def edit(m):
        for rel in rels:
            m["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    _edit_json(folder / "manifest.json", edit)


def manifest_edit(edit: Callable[[dict], None]) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        folder = ctx.folder()
        _edit_json(folder / "manifest.json", edit)
        return folder
    return make


def profile_edit(edit: Callable[[dict], None]) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        prof = ctx.profile()
        _edit_json(prof / "profile.json", edit)
        return prof
    return make


def nan_correction(ctx: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    from ertacache.io import sha256_file

    prof = ctx.profile()
    tables = load_file(str(prof / "correction.safetensors"))
    tables["a"][1] = float("nan")
    save_file(tables, str(prof / "correction.safetensors"))
    sha = sha256_file(prof / "correction.safetensors")
    _edit_json(prof / "profile.json", lambda m: m["correction"].update(sha256=sha))
    return prof


def pickle_as_pt2(ctx: Ctx) -> Path:
    """AOTInductor 'packages' that are pickles, listed and hashed: must be refused, never unpickled or run."""
    folder = ctx.folder()
    (folder / "aoti").mkdir()
    graphs = {}
    for g in ("full_step", "cached_step"):
        (folder / "aoti" / f"{g}.pt2").write_bytes(pickle.dumps({"evil": "os.system"}))
        graphs[g] = {"file": f"aoti/{g}.pt2"}
    _edit_json(folder / "manifest.json", lambda m: m["targets"].update(aoti={"graphs": graphs, "device": "cpu"}))
    _rehash(folder, "aoti/full_step.pt2", "aoti/cached_step.pt2")
    return folder


def deep_json(ctx: Ctx, name: str) -> Path:
    folder = ctx.folder()
    (folder / name).write_text("[" * 200_000 + "]" * 200_000)
    return folder


def symlinked_folder(ctx: Ctx) -> Path:
    folder = ctx.folder()
    (folder / "profile" / "passwd").symlink_to("/etc/passwd")
    return folder


def npy_file(ctx: Ctx, kind: str) -> Path:
    import numpy as np

    path = ctx.work / f"{kind}.npy"
    if kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "ints":
        np.save(path, np.zeros((2, 5, 16), np.int64))
    elif kind == "shape":
        np.save(path, np.zeros((3, 3), np.float32))
    elif kind == "text":
        path.write_text("not an array")
    return path


# ---- the cases ---------------------------------------------------------------------------------------------------

def cases() -> list[Case]:
    out: list[Case] = []

    def add(name, script, argv, quick=False):
        out.append(Case(name, script, argv if callable(argv) else (lambda ctx, a=argv: list(a)), quick))

    gen_base = ["--prompt", "digit 3 moving left", "--out", "v.gif"]
    # numbers: non-finite, negative, zero, huge, not a number, per script and flag
    numeric = {
        "ertacache-profile": [("--lambda", ["inf", "nan", "-1", "1e400"]), ("--speedup", ["nan", "0.5", "-2", "inf"]),
                              ("--steps", ["0", "-5", "10000000", "abc"]), ("--batch-size", ["0", "-1"]),
                              ("--seed", [str(2**63), "-1"]), ("--warmup-steps", ["0"]),
                              ("--guidance-scale", ["-5", "nan"]), ("--shift", ["0", "inf", "-1"]),
                              ("--height", ["0", "-32"]), ("--frames", ["0"])],
        "ertacache-generate": [("--seed", [str(2**63), str(2**64), "-1", "1.5"]), ("--steps", ["0", "10000000"]),
                               ("--guidance-scale", ["inf", "-1"]), ("--width", ["-8"])],
        "ertacache-export": [("--batch-size", ["0"]), ("--opset", ["5"]), ("--timing-repeats", ["-1"]),
                             ("--lambda", ["inf"]), ("--speedup", ["nan"])],
        "ertacache-eval": [("--steps", ["0"]), ("--batch-size", ["0"]), ("--study-speedup", ["nan"]),
                           ("--calibration-seed", ["-1"])],
    }
    for script, flags in numeric.items():
        for flag, values in flags:
            for value in values:
                tail = gen_base if script == "ertacache-generate" else (["--out", "out"] if script != "ertacache-eval"
                                                                        else [])
                add(f"{script} {flag} {value}", script, [flag, value, *tail],
                    quick=(flag, value) in {("--lambda", "inf"), ("--seed", str(2**63)), ("--steps", "10000000")})

    # devices
    for script in ("ertacache-profile", "ertacache-generate", "ertacache-export"):
        tail = gen_base if script == "ertacache-generate" else ["--out", "out"]
        for dev in ("foo", "cuda:99", "", "cuda" if not _cuda() else "mps"):
            add(f"{script} --device {dev!r}", script, ["--device", dev, *tail], quick=dev == "foo")

    # prompts
    for prompt, label in (("", "empty"), ("   ", "blank"), ("x" * 100_000, "100 kB"),
                          ("zebra unicorn ✨", "unknown words + unicode"), ("digit 3 " * 50, "too many words")):
        add(f"ertacache-generate --prompt {label}", "ertacache-generate",
            ["--prompt", prompt, "--out", "v.gif", "--steps", "2"],
            quick=label in ("100 kB", "unknown words + unicode"))

    # --out
    add("generate --out a folder", "ertacache-generate", lambda c: ["--prompt", "digit 3", "--out", str(c.work)])
    add("generate --out existing, no --force", "ertacache-generate",
        lambda c: ["--prompt", "digit 3", "--out", str(c.file("old.gif", b"GIF89a"))], quick=True)
    add("generate --out .avi", "ertacache-generate", ["--prompt", "digit 3", "--out", "v.avi"])
    add("generate --out under a file", "ertacache-generate",
        lambda c: ["--prompt", "digit 3", "--out", str(c.file("f", "x") / "v.gif")])
    add("profile --out a file, --force", "ertacache-profile", lambda c: ["--out", str(c.file("notes.txt", "keep")),
                                                                         "--force"], quick=True)
    add("profile --out unrelated folder, --force", "ertacache-profile",
        lambda c: ["--out", str(c.file("photos/cat.jpg", "x").parent), "--force"])
    add("export --out a file, --force", "ertacache-export",
        lambda c: ["--out", str(c.file("notes.txt", "k")), "--force"])
    add("export --out existing folder", "ertacache-export", lambda c: ["--out", str(c.folder())])

    # model folders that do not load
    add("generate --model-path a folder of corrupt configs", "ertacache-generate",
        lambda c: ["--model", "wan2.1", "--model-path", str(_corrupt_model(c)), "--prompt", "a cat", "--out", "v.gif"],
        quick=True)
    add("profile --model-path a file", "ertacache-profile",
        lambda c: ["--model", "wan2.1", "--model-path", str(c.file("model.bin", "x")), "--out", "p"])
    add("export --model-path an empty folder", "ertacache-export",
        lambda c: ["--model", "wan2.1", "--model-path", str(c.work), "--dtype", "fp32", "--out", "e"])
    add("generate --model unknown", "ertacache-generate", ["--model", "sdxl", "--prompt", "a", "--out", "v.gif"])

    # prompts files
    add("profile --prompts a folder", "ertacache-profile", lambda c: ["--prompts", str(c.work), "--out", "p"],
        quick=True)
    add("profile --prompts binary", "ertacache-profile",
        lambda c: ["--prompts", str(c.file("p.bin", bytes(range(256)) * 4)), "--out", "p"])
    add("profile --prompts missing", "ertacache-profile", ["--prompts", "nope.txt", "--out", "p"])
    add("profile --prompts empty", "ertacache-profile", lambda c: ["--prompts", str(c.file("e.txt", "\n# c\n")),
                                                                   "--out", "p"])
    add("export --prompts a folder", "ertacache-export", lambda c: ["--prompts", str(c.work), "--out", "e"])

    # profile folders (generate --profile, export --profile)
    profiles = {
        "missing": lambda c: c.work / "nope",
        "a file": lambda c: c.file("prof.txt", "x"),
        "empty folder": lambda c: (c.work / "empty").mkdir() or c.work / "empty",
        "phi a string": profile_edit(lambda m: m.update(phi="1.0")),
        "stats a list": profile_edit(lambda m: m.update(stats=[1, 2])),
        "empty latent_shape": profile_edit(lambda m: m.update(latent_shape=[])),
        "negative_prompt a number": profile_edit(lambda m: m["calibration"].update(negative_prompt=5)),
        "NaN guidance": profile_edit(lambda m: m.update(guidance_scale=float("nan"))),
        "NaN correction table (rehashed)": nan_correction,
        "deeply nested JSON": lambda c: _write(c.profile(), "profile.json", "[" * 100_000 + "]" * 100_000),
        "steps a huge number": profile_edit(lambda m: m.update(steps=10**9)),
        "mask of strings": profile_edit(lambda m: m.update(mask=["x"] * len(m["mask"]))),
    }
    for label, make in profiles.items():
        add(f"generate --profile {label}", "ertacache-generate",
            lambda c, make=make: ["--profile", str(make(c)), "--prompt", "digit 3", "--out", "v.gif"],
            quick=label in ("NaN correction table (rehashed)", "phi a string"))
        add(f"export --profile {label}", "ertacache-export", lambda c, make=make: ["--profile", str(make(c)),
                                                                                 "--out", "e"])

    # export folders (run, verify, build, triton)
    folders = {
        "missing": lambda c: c.work / "nope",
        "a file": lambda c: c.file("engines.txt", "x"),
        "empty folder": lambda c: (c.work / "empty").mkdir() or c.work / "empty",
        "files a list": manifest_edit(lambda m: m.update(files=list(m["files"]))),
        "graph spec without shape": manifest_edit(lambda m: m["graphs"]["full_step"]["inputs"][0].pop("shape")),
        "steps + 1": manifest_edit(lambda m: m["profile"].update(steps=m["profile"]["steps"] + 1)),
        "mask edited": manifest_edit(lambda m: m["profile"].update(mask=[True] * len(m["profile"]["mask"]))),
        "guidance edited": manifest_edit(lambda m: m["profile"].update(guidance_scale=9.0)),
        "NaN guidance": manifest_edit(lambda m: m["profile"].update(guidance_scale=float("nan"))),
        "graph path ..": manifest_edit(lambda m: m["targets"]["onnx"]["graphs"]["full_step"].update(
            file="../../etc/passwd")),
        "graph path absolute": manifest_edit(lambda m: m["targets"]["onnx"]["graphs"]["full_step"].update(
            file="/etc/passwd")),
        "graph not in files": manifest_edit(lambda m: m["files"].pop(m["targets"]["onnx"]["graphs"]["cached_step"]
                                                                     ["file"])),
        "schema_version 99": manifest_edit(lambda m: m.update(schema_version=99)),
        "deeply nested manifest": lambda c: deep_json(c, "manifest.json"),
        "symlink inside": symlinked_folder,
        "tampered graph": lambda c: _write(c.folder(), "onnx/cached_step.onnx", "x"),
        "unlisted file": lambda c: _write(c.folder(), "onnx/extra.onnx", "x"),
    }
    for label, make in folders.items():
        run_argv = (lambda c, make=make: ["--engines", str(make(c)), "--text-embeds", "t.npy", "--out", "v.gif"])
        add(f"run --engines {label}", "ertacache-run", run_argv,
            quick=label in ("files a list", "graph path ..", "mask edited", "graph not in files"))
        if label in ("files a list", "graph path ..", "mask edited", "missing", "a file", "tampered graph"):
            add(f"verify --engines {label}", "ertacache-verify",
                lambda c, make=make: ["--engines", str(make(c)), "--text-embeds", "t.npy"])
            add(f"build --engines {label}", "ertacache-build", lambda c, make=make: ["--engines", str(make(c))])
            add(f"triton --engines {label}", "ertacache-triton",
                lambda c, make=make: ["--engines", str(make(c)), "--repo", "repo"])
    add("run --backend aoti with pickles as .pt2", "ertacache-run",
        lambda c: ["--engines", str(pickle_as_pt2(c)), "--backend", "aoti", "--text-embeds", "t.npy", "--out", "v.gif"],
        quick=True)

    # request inputs of run
    ok = (lambda c: ["--engines", str(c.engines)])
    for kind in ("pickle", "ints", "shape", "text"):
        add(f"run --text-embeds {kind}", "ertacache-run",
            lambda c, kind=kind: [*ok(c), "--text-embeds", str(npy_file(c, kind)), "--out", "v.gif"],
            quick=kind == "pickle")
    add("run --text-embeds a folder", "ertacache-run",
        lambda c: [*ok(c), "--text-embeds", str(c.work), "--out", "v.gif"])
    add("run --seed 2**63", "ertacache-run", lambda c: [*ok(c), "--text-embeds", "t.npy", "--seed", str(2**63),
                                                       "--out", "v.gif"])
    add("run --backend foo", "ertacache-run", lambda c: [*ok(c), "--backend", "foo", "--text-embeds", "t.npy",
                                                        "--out", "v.gif"])
    add("run --providers Foo", "ertacache-run", lambda c: [*ok(c), "--providers", "FooExecutionProvider",
                                                          "--text-embeds", "t.npy", "--out", "v.gif"])
    add("run --device foo", "ertacache-run", lambda c: [*ok(c), "--device", "foo", "--text-embeds", "t.npy",
                                                       "--out", "v.gif"])
    add("run --device cuda (onnxruntime, CPU providers)", "ertacache-run",
        lambda c: [*ok(c), "--device", "cuda", "--text-embeds", "t.npy", "--out", "v.gif"], quick=True)
    add("run --prompt of unknown words", "ertacache-run", lambda c: [*ok(c), "--prompt", "zzzz qqqq ✨", "--out",
                                                                   "v.gif"])
    add("run --out a folder", "ertacache-run", lambda c: [*ok(c), "--text-embeds", "t.npy", "--out", str(c.work)])
    add("run --out .avi", "ertacache-run", lambda c: [*ok(c), "--text-embeds", "t.npy", "--out", "v.avi"])
    add("run --expect-digest malformed", "ertacache-run", lambda c: [*ok(c), "--text-embeds", "t.npy",
                                                                    "--expect-digest", "md5:1", "--out", "v.gif"])
    add("run --expect-digest other", "ertacache-run", lambda c: [*ok(c), "--text-embeds", "t.npy", "--expect-digest",
                                                                "sha256:" + "0" * 64, "--out", "v.gif"], quick=True)
    for tol in ("-1", "inf", "nan", "0"):
        add(f"verify --tolerance {tol}", "ertacache-verify", lambda c, tol=tol: [*ok(c), "--text-embeds", "t.npy",
                                                                                 "--tolerance", tol],
            quick=tol == "-1")
    add("verify --json a folder", "ertacache-verify", lambda c: [*ok(c), "--text-embeds", "t.npy", "--json",
                                                                str(c.work)])
    add("build --targets foo", "ertacache-build", lambda c: [*ok(c), "--targets", "foo"])
    add("build --workspace-gib -1", "ertacache-build", lambda c: [*ok(c), "--workspace-gib", "-1"])
    add("build --expect-digest other", "ertacache-build", lambda c: [*ok(c), "--expect-digest", "f" * 64])
    add("build without TensorRT", "ertacache-build", lambda c: ["--engines", str(c.folder())])

    # Triton
    add("triton --repo a file", "ertacache-triton", lambda c: [*ok(c), "--repo", str(c.file("repo.txt", "x"))],
        quick=True)
    for flag, value in (("--instances", "0"), ("--instances", "-3"), ("--max-batch-size", "-1"),
                        ("--intra-op-threads", "-1"), ("--name", "../evil"), ("--name", ""), ("--backend", "foo"),
                        ("--expect-digest", "zz")):
        add(f"triton {flag} {value}", "ertacache-triton", lambda c, f=flag, v=value: [*ok(c), "--repo", "repo", f, v])
    add("triton serve --repo missing", "ertacache-triton", ["serve", "--repo", "nope"])
    add("triton serve --repo a file", "ertacache-triton", lambda c: ["serve", "--repo", str(c.file("r.txt", "x"))])
    add("triton serve --http-port 70000", "ertacache-triton", lambda c: ["serve", "--repo", str(c.work),
                                                                          "--http-port", "70000"])
    add("triton serve stale model.py", "ertacache-triton", lambda c: ["serve", "--repo", str(_stale_repo(c))])

    # eval
    add("eval --speedups abc", "ertacache-eval", ["--speedups", "abc"])
    add("eval --methods foo", "ertacache-eval", ["--methods", "foo"])
    add("eval --seeds x", "ertacache-eval", ["--seeds", "x"])
    add("eval --json a folder", "ertacache-eval", lambda c: ["--json", str(c.work), "--steps", "0"])

    # unknown flags and scripts' own usage errors
    for script in MODULES:
        add(f"{script} --no-such-flag", script, ["--no-such-flag"], quick=script == "ertacache-run")
    return out


def _corrupt_model(ctx: Ctx) -> Path:
    """A diffusers-format folder whose every config.json is truncated JSON."""
    root = ctx.work / "model"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{")
    return root


def _write(folder: Path, rel: str, text: str) -> Path:
    """Write ``folder/rel`` and return ``folder``."""
    (folder / rel).write_text(text)
    return folder


def _stale_repo(ctx: Ctx) -> Path:
    repo = ctx.work / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text("# Written by ertacache-triton 0.0.1\nname: \"m\"\n")
    (repo / "m" / "1" / "model.py").write_text("# an older model.py\n")
    return repo


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ---- running -----------------------------------------------------------------------------------------------------

def snapshot(roots: list[Path], skip: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``roots`` (not under ``skip``, caches and environments skipped)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_NAMES and Path(dirpath, d) != skip]
            for name in filenames:
                full = Path(dirpath, name)
                try:
                    st = full.lstat()
                except FileNotFoundError:
                    continue
                out[str(full)] = (st.st_size, st.st_mtime_ns)
    return out


def run_inprocess(script: str, argv: list[str], cwd: Path) -> tuple[int | None, str, str | None]:
    main = importlib.import_module(MODULES[script]).main
    out, err = io.StringIO(), io.StringIO()
    tb = None
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse usage errors: exit 2 with a usage line, no traceback
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - exactly what the sweep looks for
                tb, rc = traceback.format_exc(), 1
    finally:
        os.chdir(old)
    stderr = err.getvalue()
    if tb is None and "Traceback (most recent call last)" in stderr:
        tb = stderr
    return rc, stderr, tb


def run_subprocess(script: str, argv: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    try:
        proc = subprocess.run([sys.executable, "-m", MODULES[script], *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out", None
    tb = proc.stderr if "Traceback (most recent call last)" in proc.stderr else None
    return proc.returncode, proc.stderr, tb


def sweep(engines: Path, selected: list[Case], tmp: Path, use_subprocess: bool = False, timeout: float = 300,
          log: Callable[[str], None] = print) -> list[Result]:
    """Run ``selected`` cases, each in its own folder under ``tmp``; see the module docstring."""
    engines = engines.resolve()
    watched = [REPO, engines.parent]
    watched = list(dict.fromkeys(p for p in watched if p.exists() and tmp not in p.parents and p != tmp))
    before_all = snapshot(watched, tmp)
    results = []
    for k, case in enumerate(selected):
        ctx = Ctx(tmp / f"case{k:03d}", engines)
        ctx.work.mkdir(parents=True)
        before = snapshot([engines], tmp)
        start = time.perf_counter()
        try:
            argv = case.argv(ctx)
        except Exception as e:  # noqa: BLE001 - a broken case is reported, not a crash of the sweep
            results.append(Result(case.name, case.script, None, f"case set-up failed: {e!r}", [], 0.0))
            continue
        if use_subprocess:
            rc, stderr, tb = run_subprocess(case.script, argv, ctx.work, timeout)
        else:
            rc, stderr, tb = run_inprocess(case.script, argv, ctx.work)
        after = snapshot([engines], tmp)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        r = Result(case.name, case.script, rc, tb, changed, time.perf_counter() - start, stderr.strip()[-300:])
        results.append(r)
        log(f"[{'ok ' if r.ok else 'BAD'}] {case.name[:70]:70s} rc={rc} {r.seconds:5.1f} s  "
            f"{(stderr.strip().splitlines() or [''])[-1][:90]}")
    after_all = snapshot(watched, tmp)
    outside = sorted(k for k in set(before_all) | set(after_all) if before_all.get(k) != after_all.get(k))
    if outside:
        results.append(Result("(files outside the sweep's folder)", "-", None, None, outside, 0.0))
    return results


def summary(results: list[Result]) -> dict:
    cases_run = [r for r in results if r.script != "-"]
    return {
        "tried": len(cases_run),
        "tracebacks": sum(r.traceback is not None for r in cases_run),
        "zero_exit": sum(r.rc == 0 for r in cases_run),
        "timed_out": sum(r.rc is None and r.traceback is None for r in cases_run),
        "changed_files": sorted({f for r in results for f in r.changed}),
        "failed": [{"case": r.name, "script": r.script, "rc": r.rc, "traceback": (r.traceback or "")[-2000:],
                    "changed": r.changed, "stderr": r.stderr_tail} for r in results if not r.ok],
    }


def make_engines(tmp: Path) -> Path:
    """A small ONNX export of the shipped testbed (4 steps), the sweep's source folder."""
    from ertacache.cli import export as export_cli

    out = tmp / "source-engines"
    rc = export_cli.main(["--model", "wan2.1-tiny", "--steps", "4", "--speedup", "2", "--loop", "open", "--targets",
                          "onnx", "--timing-repeats", "0", "--out", str(out), "--quiet"])
    if rc != 0:
        raise SystemExit(f"could not build the source export folder (exit {rc})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=None, help="a valid export folder (copied, never edited); default: build one")
    p.add_argument("--quick", action="store_true", help="only the reduced set the test suite runs")
    p.add_argument("--subprocess", action="store_true", help="run each case as a new process (slower, the real "
                                                             "entry points)")
    p.add_argument("--match", default=None, help="only cases whose name contains this")
    p.add_argument("--timeout", type=float, default=300, help="seconds per case with --subprocess")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    selected = [c for c in cases() if (c.quick or not args.quick) and (args.match is None or args.match in c.name)]
    tmp = Path(tempfile.mkdtemp(prefix="ertacache-fuzz-"))
    try:
        engines = Path(args.engines) if args.engines else make_engines(tmp)
        results = sweep(engines, selected, tmp / "cases", args.subprocess, args.timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = summary(results)
    print(f"\n{report['tried']} cases tried, {report['tracebacks']} tracebacks, {report['zero_exit']} exited 0, "
          f"{len(report['changed_files'])} files changed outside the sweep's folder, {len(report['failed'])} failed")
    for f in report["failed"]:
        print(f"  FAILED {f['case']}: rc={f['rc']} {f['changed'][:3]}\n{f['traceback'][-800:]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
