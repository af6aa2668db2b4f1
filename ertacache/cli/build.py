"""ertacache-build: build TensorRT engines from an export folder's ONNX on the machine that will run them."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ertacache.cli.common import add_engines_arg, apply_threads, new_parser, run_cli
from ertacache.cli.validate import add_digest_arg, check_args, check_digest_arg
from ertacache.errors import UserError

BUILD_TARGETS = ("tensorrt",)
#: as ertacache.engines.tensorrt.HARDWARE_COMPATIBILITY (tests/cli checks they agree), spelled here so --help
#: needs no torch
HARDWARE_COMPATIBILITY = ("none", "ampere+", "same-cc")


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-build", description="Build TensorRT engines (strongly typed, static "
                                "shapes, timing cache) from an export folder's onnx/ into its tensorrt/, and record "
                                "them (TensorRT version, GPU, sha256) in its manifest.")
    add_engines_arg(p, help="export folder with ONNX graphs (ertacache-export --targets onnx)")
    p.add_argument("--targets", default="tensorrt", help=f"what to build: {list(BUILD_TARGETS)}")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: tensorrt/timing.cache)")
    p.add_argument("--hardware-compatibility", default="none", choices=list(HARDWARE_COMPATIBILITY),
                   help="none: this GPU only (fastest); ampere+: any Ampere-or-later GPU; same-cc")
    p.add_argument("--version-compatible", action="store_true", help="engines later TensorRT versions can run")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit")
    p.add_argument("--force", action="store_true", help="replace existing engines")
    add_digest_arg(p)
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    check_digest_arg(args.expect_digest)
    apply_threads(args.threads)
    from ertacache.contract import folder_digest, load_manifest
    from ertacache.engines.base import require_backend
    from ertacache.engines.tensorrt import TensorRTBuildOptions, build_engines
    from ertacache.export.manifest import file_entries, write_manifest
    from ertacache.io import output_lock, remove_stale_siblings
    from ertacache.runtime.checks import check_against_profile

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in BUILD_TARGETS for t in targets):
        raise UserError(f"--targets takes {list(BUILD_TARGETS)}, got {args.targets!r}")
    folder = Path(args.engines)
    if not folder.is_dir():
        raise UserError(f"--engines {folder} is not a folder; create it with ertacache-export --engines {folder}")
    with output_lock(folder, "export folder"):  # one build at a time; a killed build's leftovers go first
        remove_stale_siblings(folder / "tensorrt", log=print)
        manifest = load_manifest(folder, expect_digest=args.expect_digest)  # tampered files: refused before the build
        check_against_profile(manifest)  # the schedule the engines will run equals profile/
        if "onnx" not in manifest.targets:
            raise UserError(f"{folder} has no ONNX graphs to build from; export with ertacache-export --targets onnx")
        require_backend("tensorrt")  # names the pip extra, or says there is no GPU
        if (folder / "tensorrt").exists() and not args.force:
            raise UserError(f"{folder}/tensorrt already exists; pass --force to rebuild the engines")
        options = TensorRTBuildOptions(args.timing_cache, args.hardware_compatibility, args.version_compatible,
                                       args.workspace_gib)
        onnx = manifest.graph_files("onnx")  # listed, hashed and inside the folder (checked on load)
        tmp = Path(tempfile.mkdtemp(prefix=".tensorrt.tmp-", dir=folder))
        try:
            print(f"[build] TensorRT engines for {sorted(onnx)} in {folder}/tensorrt")
            entry = build_engines(onnx, tmp, options)
            entry = json.loads(json.dumps(entry).replace(f"{tmp.name}/", "tensorrt/"))
            if (folder / "tensorrt").exists():
                shutil.rmtree(folder / "tensorrt")
            tmp.rename(folder / "tensorrt")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        data = json.loads(json.dumps(manifest.data))  # a mutable copy of the manifest as read
        data["targets"]["tensorrt"] = entry
        data["backends"] = list(dict.fromkeys([*data.get("backends", []), "tensorrt"]))
        data["files"] = file_entries(folder)
        write_manifest(folder, data)
        print(f"[build] TensorRT {entry['version']} on {entry['gpu']} (sm {entry['compute_capability']}): "
              + ", ".join(f"{g} {e['build_s']} s" for g, e in entry["engines"].items()))
        print(f"[build] new folder digest {folder_digest(folder)} (the manifest changed; pin this one)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
