"""Prepare wheels of dvtrain's runtime dependencies for an offline GPU machine (run where pip can download).

The GPU machine keeps its own torch, torchvision and triton (their CUDA wheels are GBs and must match its
driver); everything else dvtrain needs at run time that the target lacks is downloaded here as wheels for
the target's Python and platform, at the versions installed in this environment (the tested ones), into
one folder that travels with the repository. ``benchmarks/gpu_check.sh OUT --wheels DIR`` installs them
there with ``pip install --no-index --no-deps`` (see docs/gpu.md).

Also carried, installed there only when the machine's own version fails a requirement: newer wheels of
packages the target has but that a carried package needs at a minimum version (typing-extensions for
pydantic, protobuf for wandb, ...), except the heavy shared ones in NEVER_REPLACE (numpy, transformers, ...).

What is left out:
  - what the target already has (``--have``: names, or a ``pip list --format=freeze`` of the target);
  - torch, torchvision, triton and the nvidia-*/cuda-* runtime packages (always the target's own);
  - the object-store SDKs that mosaicml-streaming imports only when a dataset lives on s3://, gs://,
    oci://, azure:// or sftp:// (boto3, google-cloud-storage, oci, azure-*, paramiko and their needs):
    the check reads local shards. Add ``--with-object-stores`` to carry them too.

Usage::

    benchmarks/gpu_wheels.sh [OUTDIR] [--python-version 3.12] [--have FILE]   # default OUTDIR: .gpu_wheels

Prints each wheel and the total size; the device tool carries at most 64 MiB (working tree included).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent

FROM_TARGET_PREFIXES = ("nvidia-", "cuda-")
FROM_TARGET = {"torch", "torchvision", "triton", "dvtrain"}
OBJECT_STORE_ONLY = {
    "boto3", "botocore", "s3transfer", "jmespath", "oci", "circuitbreaker", "azure-core", "azure-identity",
    "azure-storage-blob", "azure-storage-file-datalake", "msal", "msal-extensions", "isodate", "google-cloud-storage",
    "google-cloud-core", "google-api-core", "google-auth", "google-resumable-media", "google-crc32c",
    "googleapis-common-protos", "proto-plus", "pyasn1", "pyasn1-modules", "paramiko", "bcrypt", "pynacl",
    "cryptography", "pyopenssl", "python-pkcs11", "asn1crypto", "cffi", "pycparser", "pyjwt", "crc32c",
}
NEVER_REPLACE = {"numpy", "transformers", "huggingface-hub", "tokenizers", "matplotlib", "scipy", "pandas", "pillow",
                 "safetensors", "scikit-learn", "jax", "jaxlib"}
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]


def read_have(path: Path) -> set[str]:
    """Distribution names (canonical) listed in ``path``: one per line, ``name`` or ``name==version``."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(re.split(r"[=<>!~ @]", line, maxsplit=1)[0]))
    return names


def closure(root: str, skip: set[str], marker_env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Runtime requirements of ``root`` (no extras), transitively, as installed in this environment.

    Does not descend into ``skip`` (the target provides those with their own needs).

    Returns:
        ({canonical name: installed version here}, [requirements not installed here]).
    """
    found: dict[str, str] = {}
    missing: list[str] = []
    todo = [root]
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate(dict(marker_env, extra="")):
                continue
            key = canonicalize_name(req.name)
            if key in found or key in skip:
                continue
            try:
                found[key] = md.version(req.name)
            except md.PackageNotFoundError:
                missing.append(req.name)
                continue
            todo.append(req.name)
    return found, missing


def upgrade_candidates(carried: dict[str, str], have: set[str], marker_env: dict[str, str]) -> dict[str, str]:
    """Packages the target has that dvtrain or a carried package requires with a version specifier.

    Returns:
        {canonical name: version installed here}, for those whose version here satisfies the requirement.
    """
    out: dict[str, str] = {}
    for name in ["dvtrain", *carried]:
        for spec in md.distribution(name).requires or []:
            req = Requirement(spec)
            key = canonicalize_name(req.name)
            if req.marker and not req.marker.evaluate(dict(marker_env, extra="")):
                continue
            if key not in have or key in FROM_TARGET or key in NEVER_REPLACE or key.startswith(FROM_TARGET_PREFIXES):
                continue
            if not req.specifier:
                continue
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                continue
            if req.specifier.contains(version, prereleases=True):
                out[key] = version
    return out


def download(name: str, version: str, out: Path, python_version: str) -> Path:
    """One wheel of ``name==version`` for the target into ``out``: a published wheel, else one built here
    from the sdist (pure-Python packages only, e.g. deepspeed, whose CUDA ops compile at run time).

    Raises:
        RuntimeError: no wheel could be had, or the built one is platform-specific.
    """
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(out), f"{name}=={version}"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                              "-w", str(out), f"{name}=={version}"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{name}=={version}: no wheel for Python {python_version} and none built here:\n"
                               f"{res.stderr[-1500:]}")
    new = [p for p in set(out.glob("*.whl")) - before if canonicalize_name(parse_wheel_filename(p.name)[0]) == name]
    wheel = new[0] if new else next(p for p in out.glob("*.whl")
                                    if canonicalize_name(parse_wheel_filename(p.name)[0]) == name)
    tags = parse_wheel_filename(wheel.name)[3]
    cp = int(python_version.replace(".", ""))

    def fits(t) -> bool:  # pure Python, this exact CPython, or the stable ABI of an older one
        return t.interpreter.startswith("py3") or t.interpreter == f"cp{cp}" or (
            t.abi == "abi3" and t.interpreter.startswith("cp") and int(t.interpreter[2:]) <= cp)

    if not any(fits(t) for t in tags):
        raise RuntimeError(f"{wheel.name}: built for this machine's Python, not {python_version}")
    return wheel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", type=Path, default=REPO / ".gpu_wheels")
    p.add_argument("--python-version", default="3.12", help="The target's Python (major.minor).")
    p.add_argument("--have", type=Path, default=REPO / "benchmarks" / "gpu_target_packages.txt",
                   help="Distributions the target already has: names or a pip freeze.")
    p.add_argument("--with-object-stores", action="store_true", help="Also carry the s3/gs/azure/oci/sftp SDKs.")
    p.add_argument("--limit-mib", type=float, default=48.0, help="Warn above this total (the carry limit is 64 MiB "
                   "including the working tree).")
    args = p.parse_args()

    have = read_have(args.have) if args.have else set()
    skip = have | FROM_TARGET | ({} if args.with_object_stores else OBJECT_STORE_ONLY)
    skip |= {canonicalize_name(d.metadata["Name"]) for d in md.distributions()
             if canonicalize_name(d.metadata["Name"]).startswith(FROM_TARGET_PREFIXES)}
    marker_env = {"python_version": args.python_version, "python_full_version": args.python_version + ".0",
                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                  "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    need, missing = closure("dvtrain", skip, marker_env)
    if missing:
        print(f"not installed in this environment (install them here first): {sorted(set(missing))}", file=sys.stderr)
        return 1
    upgrades = upgrade_candidates(need, have, marker_env)
    args.out.mkdir(parents=True, exist_ok=True)
    wheels = {}
    for name, version in sorted({**need, **upgrades}.items()):
        for old in args.out.glob("*.whl"):  # one version of each: two stop the whole install
            n, v, *_ = parse_wheel_filename(old.name)
            if canonicalize_name(n) == name and str(v) != version:
                old.unlink()
        wheels[name] = download(name, version, args.out, args.python_version)
        note = " (only if the target's is too old)" if name in upgrades else ""
        print(f"  {wheels[name].name:75s} {wheels[name].stat().st_size / 2**20:6.2f} MiB{note}", flush=True)
    keep = {w.name for w in wheels.values()}
    for stale in args.out.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()
    total = sum(w.stat().st_size for w in wheels.values()) / 2**20
    (args.out / "MANIFEST.json").write_text(json.dumps({
        "python_version": args.python_version, "have": str(args.have), "wheels": sorted(keep),
        "upgrade_only": sorted(upgrades),
        "total_mib": round(total, 2), "object_stores": args.with_object_stores}, indent=2))
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.out}")
    if total > args.limit_mib:
        print(f"warning: more than {args.limit_mib} MiB; the device tool carries 64 MiB with the working tree",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
