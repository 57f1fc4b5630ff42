"""Carry NVIDIA DALI to a machine that has a GPU but no package registry, in small parts.

The CUDA 13 DALI wheel is about 200 MB and needs nvimgcodec, nvcomp and nvjpeg (about 55 MB)
and a few small pure-Python packages, while a call to the lent GPU machine carries at most
64 MiB (the working tree included). Git-ignored folders stay on that machine between calls
while it is warm, so the wheels travel cut into parts, one part per call, and are joined and
installed by the last call. Only the Python standard library is used, so the same file runs
on both machines.

Here (with registry access):
    python tools/stage_dali.py prepare          # download, cut into .whl/dali/part-NN/
    python tools/stage_dali.py plan             # the calls to make, one per part

There (each call carries the next part, e.g. carry=[".whl/dali/part-01"]):
    python3 tools/stage_dali.py check           # what has arrived so far
    python3 tools/stage_dali.py install         # last call: join, verify, install
    export PYTHONPATH=$PWD/.whl/dali/site       # then: python3 -c "import nvidia.dali"

Notes. The machine goes back after a short idle time (30 s on the lent H100/H200), so make
the calls back to back and run the work that needs DALI in the same call as `install`, or
soon after: `install` puts the packages under .whl/dali/site, a git-ignored folder that also
stays while the machine is warm. `/.whl/` must be git-ignored (the repository's .gitignore
does it). Every part's pieces carry a SHA-256 in manifest.json, checked before installing.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".whl" / "dali"
WHEELS = STAGE / "wheels"  # downloaded here; joined there
SITE = STAGE / "site"  # installed there (--target), put on PYTHONPATH
MANIFEST = "manifest.json"

# What the lent machine's image lacks (it has numpy, packaging, six, pyyaml, wheel,
# typing-extensions already). Pinned to what CI installs with the [dali] extra, so the GPU
# run tests the same DALI. nvidia-nvjpeg is nvimgcodec's "nvjpeg" extra: the GPU decoder;
# its jpeg2k and tiff extras are left out (JPEG only).
PACKAGES = [
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-libnvcomp-cu13==5.3.0.16",
    "nvidia-nvjpeg==13.3.2.43",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "optree==0.20.0",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "nvtx==0.2.17",
]
PYTHON = "3.12"  # the lent machine's python3
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
PART_MIB = 56  # per call: 64 MiB minus the working tree and a margin


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download() -> list[Path]:
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp", *platforms,
           "-d", str(WHEELS), *PACKAGES]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    if len(wheels) != len(names):
        raise SystemExit(f"two versions of one package in {WHEELS}: remove the stale ones")
    return wheels


def split(wheels: list[Path], part_bytes: int) -> list[Path]:
    """Cut the wheels into pieces and deal them into part folders of at most part_bytes.

    Pieces are filled greedily in file order, so a wheel may span parts; the manifest in
    every part lists the pieces of every wheel, so any part can check what is missing.
    """
    for old in STAGE.glob("part-*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    manifest: dict[str, dict] = {}
    part, used = 1, 0
    for wheel in wheels:
        pieces = []
        with open(wheel, "rb") as f:
            index = 0
            while True:
                room = part_bytes - used
                if room <= 0:
                    part, used = part + 1, 0
                    room = part_bytes
                data = f.read(room)
                if not data:
                    break
                folder = STAGE / f"part-{part:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{wheel.name}.{index:03d}"
                (folder / name).write_bytes(data)
                pieces.append({"part": folder.name, "file": name, "bytes": len(data)})
                used += len(data)
                index += 1
        manifest[wheel.name] = {"sha256": _sha256(wheel), "pieces": pieces}
    folders = sorted(STAGE.glob("part-*"))
    for folder in folders:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folders


def _manifest() -> dict:
    found = sorted(STAGE.glob(f"part-*/{MANIFEST}"))
    if not found:
        raise SystemExit(f"no part has arrived under {STAGE}: carry .whl/dali/part-01 first")
    return json.loads(found[-1].read_text())


def missing_parts(manifest: dict) -> list[str]:
    parts = {p["part"] for w in manifest.values() for p in w["pieces"]}
    return sorted(p for p in parts if not (STAGE / p / MANIFEST).exists())


def join(manifest: dict) -> list[Path]:
    """Reassemble every wheel from its pieces and check its SHA-256."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, entry in manifest.items():
        target = WHEELS / name
        if not (target.exists() and _sha256(target) == entry["sha256"]):
            with open(target, "wb") as out:
                for piece in entry["pieces"]:
                    out.write((STAGE / piece["part"] / piece["file"]).read_bytes())
            if _sha256(target) != entry["sha256"]:
                raise SystemExit(f"{name}: wrong SHA-256 after joining; carry its parts again")
        wheels.append(target)
    return wheels


def install(wheels: list[Path]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE),
           *map(str, wheels)]  # fmt: skip
    subprocess.run(cmd, check=True)
    env = dict(os.environ, PYTHONPATH=f"{SITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    probe = "import nvidia.dali as d; print('nvidia.dali', d.__version__)"
    subprocess.run([sys.executable, "-c", probe], check=True, env=env)


def plan(folders: list[Path]) -> None:
    print(f"{len(folders)} calls, back to back (the machine goes back after a short idle):")
    for i, folder in enumerate(folders, 1):
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        rel = folder.relative_to(ROOT)
        last = i == len(folders)
        cmd = "python3 tools/stage_dali.py " + (
            "install && export PYTHONPATH=$PWD/.whl/dali/site && <your command>"
            if last
            else "check"
        )
        print(f"  call {i}: carry=['{rel}'] ({size:.1f} MiB)  command: {cmd}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="download the wheels and cut them into parts (here)")
    prep.add_argument("--part-mib", type=float, default=PART_MIB)
    prep.add_argument("--no-download", action="store_true", help="reuse .whl/dali/wheels")
    sub.add_parser("plan", help="print the calls that carry the parts")
    sub.add_parser("check", help="list parts still missing (there)")
    sub.add_parser("install", help="join the parts and install into .whl/dali/site (there)")
    args = p.parse_args(argv)

    if args.cmd == "prepare":
        wheels = sorted(WHEELS.glob("*.whl")) if args.no_download else download()
        total = sum(w.stat().st_size for w in wheels) / 2**20
        folders = split(wheels, int(args.part_mib * 2**20))
        print(f"{len(wheels)} wheels, {total:.1f} MiB, in {len(folders)} parts under {STAGE}")
        plan(folders)
    elif args.cmd == "plan":
        plan(sorted(STAGE.glob("part-*")))
    elif args.cmd == "check":
        missing = missing_parts(_manifest())
        print("all parts here: run install" if not missing else f"missing: {', '.join(missing)}")
    else:
        manifest = _manifest()
        missing = missing_parts(manifest)
        if missing:
            raise SystemExit(f"parts not here yet: {', '.join(missing)}; carry them first")
        install(join(manifest))
        print(f"installed under {SITE}: export PYTHONPATH={SITE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
