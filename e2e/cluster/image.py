#!/usr/bin/env python3
"""Build kubetasks' images without Docker or a registry, and import them into the local node.

The Dockerfile stays the way to build the image with a builder; this script
builds the same image (tests/packaging/test_dockerfile.py and the node tests keep
the two in step: Python 3.11, user 10001, entrypoint `kubetasks run`, /app,
the files of pyproject.toml, README.md and operator/) from four layers, each
cached under $KUBETASKS_IMAGES by a hash of its inputs:

  1. base      Debian 12 (bookworm) minbase from debootstrap, with python3 and
               python3-venv, and the kubetasks user (uid/gid 10001) the
               Dockerfile creates. About a minute, once.
  2. deps      a venv at /opt/kubetasks holding the project's dependencies,
               resolved from PyPI by the image's own Python (Debian's 3.11.2,
               whose environment markers differ from the host's Python) inside
               a chroot with `env -i`, so no host pip setting leaks in.
  3. kubetasks the project's wheel (built from exactly what the Dockerfile
               copies), installed into that venv without dependencies.
  4. apps      /app/examples (make demo's app and Tasks) and /app/nodeapp (the
               node tests' app; version 2 adds a handler), for the apps images only.

Images (names with a dot, so the CRI never rewrites them to docker.io):
  kubetasks.local/kubetasks:<version>   layers 1-3, what the Dockerfile builds
  kubetasks.local/kubetasks-apps:1, :2  layers 1-4
  kubetasks.local/pause:3.10            the pod sandbox (build.sh's pause binary)

Commands:
  image.py build [--spec FILE]            build (or reuse) the layers; write the image set
  image.py pause [--spec FILE]            the pause image only
  image.py import --spec FILE --address SOCK   stream the set as one OCI archive into containerd
  image.py archive --spec FILE OUT.tar    write the set as an OCI archive file

Needs root (debootstrap, chroot) and the debootstrap package; node-deps.sh installs it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(
    os.environ.get("KUBETASKS_IMAGES")
    or Path(os.environ.get("KUBETASKS_CACHE") or Path.home() / ".cache/kubetasks") / "images"
)
RECIPE = 1  # bump to rebuild every layer

# The Dockerfile's `FROM python:3.11-slim-bookworm` is Debian 12 with Python 3.11; so is this base.
SUITE = "bookworm"
PYTHON_MINOR = "3.11"
BASE_PACKAGES = ("python3", "python3-venv")
MIRROR = os.environ.get("KUBETASKS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
VENV = "/opt/kubetasks"
# What the Dockerfile COPYs before `pip install .`; the wheel is built from these alone,
# plus the dashboard's page, which its Node stage builds from UI_SOURCES (here: the
# build backend's own page build, on the host).
SOURCES = ("pyproject.toml", "README.md", "operator")
UI_SOURCES = ("dashboard-ui",)
STATIC = "operator/kubetasks/dashboard/static"
# The Dockerfile's user, working directory, environment, port and command.
USER_NAME, UID, GID = "kubetasks", 10001, 10001
SHELL = "/usr/sbin/nologin"
WORKDIR = "/app"  # also the user's home, as in the Dockerfile
ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXPOSE = (9090,)
ENTRYPOINT = ["kubetasks"]
CMD = ["run"]

KUBETASKS_REPO = "kubetasks.local/kubetasks"
APPS_REPO = "kubetasks.local/kubetasks-apps"
PAUSE_REF = "kubetasks.local/pause:3.10"

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[image {time.monotonic() - T0:5.1f}s] {msg}", flush=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_of(obj: object) -> str:
    return sha(json.dumps(obj, sort_keys=True).encode())[:16]


def run(cmd: list[str], *, log: Path | None = None, **kw: object) -> None:
    """Run a command; on failure show its output's tail and stop."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
        raise SystemExit(f"image.py: {' '.join(cmd[:6])} ... failed ({out.returncode}):\n{tail}")


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One build at a time per machine: clones share the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another build holds the image cache; waiting")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- layers -------------------------------------------------------------------


def make_layer(src: Path, out: Path, members: list[str] | None = None) -> dict[str, object]:
    """An uncompressed layer tar of ``src`` (or of its ``members``), sorted, numeric owners."""
    tmp = out.with_suffix(".tmp")
    cmd = ["tar", "--numeric-owner", "--sort=name", "--xattrs", "-C", str(src), "-cf", str(tmp)]
    run([*cmd, *(members or ["."])])
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    info = {"path": str(out), "digest": "sha256:" + h.hexdigest(), "size": tmp.stat().st_size}
    tmp.rename(out)
    out.with_suffix(".json").write_text(json.dumps(info))
    return info


def cached_layer(out: Path) -> dict[str, object] | None:
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        info: dict[str, object] = json.loads(meta.read_text())
        return info
    return None


def chroot(rootfs: Path, *cmd: str) -> None:
    """Run in the image's root with a clean environment (the host sets PIP_FIND_LINKS and more)."""
    env = [
        "env",
        "-i",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        "PIP_CERT=/tmp/host-ca.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK=1",
        "PIP_DEFAULT_TIMEOUT=180",
        "PIP_NO_CACHE_DIR=1",
    ]
    run(["chroot", str(rootfs), *env, *cmd])


@contextlib.contextmanager
def network_files(rootfs: Path) -> Iterator[None]:
    """The host's resolver and CA bundle while pip runs in the chroot; removed afterwards."""
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    shutil.copy(ca, rootfs / "tmp/host-ca.crt")
    resolv = rootfs / "etc/resolv.conf"
    shutil.copy("/etc/resolv.conf", resolv)
    try:
        yield
    finally:
        (rootfs / "tmp/host-ca.crt").unlink(missing_ok=True)
        resolv.write_text("")  # the kubelet mounts the pod's own


def base_layer() -> tuple[str, Path, dict[str, object]]:
    key = key_of({"recipe": RECIPE, "suite": SUITE, "pkgs": BASE_PACKAGES, "mirror": MIRROR, "uid": UID})
    d = CACHE / f"base-{key}"
    info = cached_layer(d / "layer.tar")
    if info is not None and (d / "rootfs").is_dir():
        say(f"base layer cached ({d.name})")
        return key, d / "rootfs", info
    if shutil.which("debootstrap") is None:
        raise SystemExit("image.py: debootstrap is not installed (e2e/cluster/node-deps.sh installs it)")
    tmp = CACHE / f"base-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    say(f"debootstrap {SUITE} (minbase + {', '.join(BASE_PACKAGES)}) from {MIRROR}: about a minute, once")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
            MIRROR,
        ],
        log=tmp / "debootstrap.log",
    )
    # The Dockerfile's user: `groupadd --system --gid 10001` + `useradd --system --uid 10001 ...`
    run(["chroot", str(rootfs), "groupadd", "--system", "--gid", str(GID), USER_NAME])
    run(
        [
            "chroot", str(rootfs), "useradd", "--system", "--uid", str(UID), "--gid", str(GID),
            "--no-create-home", "--home-dir", WORKDIR, "--shell", SHELL, USER_NAME,
        ]
    )  # fmt: skip
    (rootfs / WORKDIR.lstrip("/")).mkdir(mode=0o755, exist_ok=True)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                 "usr/share/info", "usr/share/locale", "var/log"):  # fmt: skip
        for p in (rootfs / junk).glob("*"):
            if p.is_file() or p.is_symlink():
                p.unlink()
            elif p.is_dir() and junk != "var/log":
                shutil.rmtree(p)
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/hostname").write_text("")
    version = (rootfs / f"usr/bin/python{PYTHON_MINOR}").exists()
    if not version:
        raise SystemExit(f"image.py: the base has no python{PYTHON_MINOR}")
    info = make_layer(rootfs, tmp / "layer.tar")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info["path"] = str(d / "layer.tar")
    (d / "layer.json").write_text(json.dumps(info))
    say(f"base layer built ({int(info['size']) >> 20} MiB)")  # type: ignore[call-overload]
    return key, d / "rootfs", info


def dependencies() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(meta["project"]["dependencies"])


def deps_layer(base_key: str, base_root: Path) -> tuple[str, Path, dict[str, object]]:
    deps = dependencies()
    key = key_of({"recipe": RECIPE, "base": base_key, "deps": deps})
    d = CACHE / f"deps-{key}"
    info = cached_layer(d / "layer.tar")
    if info is not None and (d / "rootfs").is_dir():
        say(f"dependencies layer cached ({d.name})")
        return key, d / "rootfs", info
    tmp = CACHE / f"deps-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    run(["cp", "-a", str(base_root), str(rootfs)])
    say(f"resolving {len(deps)} dependencies with the image's Python (pip in a chroot, env -i)")
    with network_files(rootfs):
        chroot(rootfs, "/usr/bin/python3", "-m", "venv", VENV)
        chroot(rootfs, f"{VENV}/bin/pip", "install", "-q", *deps)
    (tmp / "freeze.txt").write_text(
        subprocess.run(
            ["chroot", str(rootfs), "env", "-i", f"{VENV}/bin/pip", "freeze"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    shutil.rmtree(rootfs / "root/.cache", ignore_errors=True)
    info = make_layer(rootfs, tmp / "layer.tar", ["./opt"])
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info["path"] = str(d / "layer.tar")
    (d / "layer.json").write_text(json.dumps(info))
    say(f"dependencies layer built ({int(info['size']) >> 20} MiB)")  # type: ignore[call-overload]
    return key, d / "rootfs", info


def source_files() -> list[Path]:
    """The files of SOURCES a build sees: tracked or new, not ignored (no caches, no build output)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *SOURCES, *UI_SOURCES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        raise SystemExit(f"image.py: git ls-files failed: {listed.stderr.strip()}")
    files = {ROOT / rel for rel in listed.stdout.splitlines()}
    return sorted(f for f in files if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")


def tree_hash(files: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def kubetasks_layer(deps_key: str, deps_root: Path) -> tuple[str, dict[str, object]]:
    files = source_files()
    key = key_of({"recipe": RECIPE, "deps": deps_key, "src": tree_hash(files, ROOT)})
    d = CACHE / f"kubetasks-{key}"
    info = cached_layer(d / "layer.tar")
    if info is not None:
        say(f"kubetasks layer cached ({d.name})")
        return key, info
    tmp = CACHE / f"kubetasks-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    staging = tmp / "src"
    for f in files:
        rel = f.relative_to(ROOT)
        if rel.parts[0] in UI_SOURCES:
            continue  # the Node stage's input: only the page it builds goes on
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    # COPY --from=ui: the page, built from the sources hashed above.
    run([sys.executable, str(ROOT / "operator" / "_kubetasks_ui.py")])
    shutil.copytree(ROOT / STATIC, staging / STATIC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_FIND_LINKS")}
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "wheel"), str(staging)],
        env=env,
    )
    wheel = next((tmp / "wheel").glob("kubetasks-*.whl"))
    say(f"built {wheel.name} from {', '.join(SOURCES)}")
    # Installed by the image's pip into a staging root inside the chroot: the layer is
    # exactly the files the wheel adds to the venv (package, metadata, console script).
    work = f"/tmp/kt-{key}"
    inside = deps_root / work.lstrip("/")
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir(parents=True)
    shutil.copy(wheel, inside / wheel.name)
    try:
        chroot(deps_root, f"{VENV}/bin/pip", "install", "-q", "--no-deps", "--no-compile", "--root",
               f"{work}/root", f"{work}/{wheel.name}")  # fmt: skip
        site = f"{work}/root{VENV}/lib/python{PYTHON_MINOR}/site-packages/kubetasks"
        # byte-code compiled as if installed in place, so tracebacks name the real path
        chroot(deps_root, f"{VENV}/bin/python", "-m", "compileall", "-q", "-s", f"{work}/root", "-p", "/",
               site)  # fmt: skip
        info = make_layer(inside / "root", tmp / "layer.tar")
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    shutil.rmtree(staging)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info["path"] = str(d / "layer.tar")
    (d / "layer.json").write_text(json.dumps(info))
    say(f"kubetasks layer built ({int(info['size']) >> 10} KiB)")  # type: ignore[call-overload]
    return key, info


def apps_layer(version: int) -> dict[str, object]:
    """/app/examples and /app/nodeapp (version 2: app_v2.py as app.py)."""
    examples = [
        ROOT / "examples/__init__.py",
        ROOT / "examples/app.py",
        *sorted((ROOT / "examples/tasks").glob("*")),
    ]
    files = {f"examples/{f.relative_to(ROOT / 'examples')}": f for f in examples}
    node = ROOT / "e2e/nodeapp"
    for f in ("__init__.py", "side.py"):
        files[f"nodeapp/{f}"] = node / f
    files["nodeapp/app.py"] = node / ("app.py" if version == 1 else "app_v2.py")
    files = {k: v for k, v in files.items() if v.is_file() and "__pycache__" not in k}
    h = hashlib.sha256()
    for k, v in sorted(files.items()):
        h.update(k.encode() + b"\0" + v.read_bytes() + b"\0")
    key = key_of({"recipe": RECIPE, "v": version, "files": h.hexdigest()})
    d = CACHE / f"apps-{key}"
    info = cached_layer(d / "layer.tar")
    if info is not None:
        return info
    tmp = CACHE / f"apps-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for k, v in files.items():
        dst = tmp / "root" / WORKDIR.lstrip("/") / k
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(v, dst)
        dst.chmod(0o644)
    for p in (tmp / "root").rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    info = make_layer(tmp / "root", tmp / "layer.tar", [f"./{WORKDIR.lstrip('/')}"])
    shutil.rmtree(tmp / "root")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info["path"] = str(d / "layer.tar")
    (d / "layer.json").write_text(json.dumps(info))
    return info


def pause_layer() -> dict[str, object]:
    binary = Path(os.environ.get("KUBETASKS_PAUSE") or Path(CACHE).parent / "bin/pause-1/pause")
    if not binary.exists():
        raise SystemExit(f"image.py: {binary} is missing (e2e/cluster/build.sh pause)")
    key = key_of({"recipe": RECIPE, "pause": sha(binary.read_bytes())})
    d = CACHE / f"pause-{key}"
    info = cached_layer(d / "layer.tar")
    if info is not None:
        return info
    tmp = CACHE / f"pause-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "root").mkdir(parents=True)
    shutil.copy(binary, tmp / "root/pause")
    (tmp / "root/pause").chmod(0o755)
    info = make_layer(tmp / "root", tmp / "layer.tar")
    shutil.rmtree(tmp / "root")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info["path"] = str(d / "layer.tar")
    (d / "layer.json").write_text(json.dumps(info))
    return info


# -- image configs and the archive ---------------------------------------------


def image_config(layers: list[dict[str, object]]) -> dict[str, object]:
    """The OCI config: what the Dockerfile's ENV, WORKDIR, USER, EXPOSE, ENTRYPOINT and CMD say."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [f"PATH={PATH}", *(f"{k}={v}" for k, v in ENV.items())],
            "WorkingDir": WORKDIR,
            "User": f"{UID}:{GID}",
            "ExposedPorts": {f"{p}/tcp": {} for p in EXPOSE},
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
            "Labels": {"org.opencontainers.image.source": "kubetasks (e2e/cluster/image.py)"},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        "history": [{"created_by": "e2e/cluster/image.py"} for _ in layers],
    }


def pause_config(layer: dict[str, object]) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
        "history": [{"created_by": "e2e/cluster/image.py (pause)"}],
    }


def version() -> str:
    v: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return v


def prune_cache(used: list[dict[str, Any]], days: float = 7) -> None:
    """Layers no build has used for ``days`` go (clones on other branches keep theirs warm)."""
    keep = {Path(str(layer["path"])).parent for layer in used}
    for d in keep:
        os.utime(d)
    cutoff = time.time() - days * 86400  # file ages, not stored data
    for d in CACHE.glob("*-*"):
        if d.is_dir() and d not in keep and d.stat().st_mtime < cutoff:
            shutil.rmtree(d, ignore_errors=True)


def build(with_apps: bool = True) -> dict[str, object]:
    with cache_lock():
        base_key, base_root, base = base_layer()
        deps_key, deps_root, deps = deps_layer(base_key, base_root)
        _, kt = kubetasks_layer(deps_key, deps_root)
        core = [base, deps, kt]
        images = [{"name": f"{KUBETASKS_REPO}:{version()}", "config": image_config(core), "layers": core}]
        if with_apps:
            for v in (1, 2):
                layers = [*core, apps_layer(v)]
                images.append({"name": f"{APPS_REPO}:{v}", "config": image_config(layers), "layers": layers})
        prune_cache([layer for img in images for layer in img["layers"]])  # type: ignore[attr-defined]
    return {"images": images}


def pause_set() -> dict[str, object]:
    with cache_lock():
        layer = pause_layer()
    return {"images": [{"name": PAUSE_REF, "config": pause_config(layer), "layers": [layer]}]}


def manifest(img: dict[str, Any]) -> tuple[bytes, bytes]:
    """(config, manifest) of one image, as the bytes whose digests name them."""
    cfg = json.dumps(img["config"], sort_keys=True).encode()
    man = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + sha(cfg),
            "size": len(cfg),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": lyr["digest"],
                "size": lyr["size"],
            }
            for lyr in img["layers"]
        ],
    }
    return cfg, json.dumps(man, sort_keys=True).encode()


def write_archive(spec: dict[str, Any], out: Any) -> None:
    """An OCI image layout as a tar stream: shared layers once, one manifest per named image."""
    blobs: dict[str, bytes] = {}
    manifests = []

    def blob(data: bytes) -> tuple[str, int]:
        d = "sha256:" + sha(data)
        blobs[d] = data
        return d, len(data)

    layers: dict[str, dict[str, Any]] = {}
    for img in spec["images"]:
        cfg, man = manifest(img)
        blob(cfg)
        for lyr in img["layers"]:
            layers[lyr["digest"]] = lyr
        man_d, man_n = blob(man)
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_d,
                "size": man_n,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": img["name"],
                    "org.opencontainers.image.ref.name": img["name"].rsplit(":", 1)[-1],
                },
            }
        )
    with tarfile.open(fileobj=out, mode="w|") as t:  # type: ignore[call-overload]

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            t.addfile(ti, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps({"schemaVersion": 2, "manifests": manifests}).encode())
        for d, data in blobs.items():
            add("blobs/sha256/" + d.split(":")[1], data)
        for d, lyr in layers.items():
            t.add(str(lyr["path"]), arcname="blobs/sha256/" + d.split(":")[1])


def import_set(spec: dict[str, Any], address: str) -> None:
    """Stream the images containerd does not already hold (by manifest digest) into it."""
    ctr = ["ctr", "--address", address, "-n", "k8s.io", "images"]
    listed = subprocess.run([*ctr, "ls"], capture_output=True, text=True).stdout.splitlines()[1:]
    held = {(f[0], f[2]) for f in (line.split() for line in listed) if len(f) > 2}
    missing = [img for img in spec["images"] if (img["name"], "sha256:" + sha(manifest(img)[1])) not in held]
    if not missing:
        say(f"already imported: {', '.join(img['name'] for img in spec['images'])}")
        return
    spec = {"images": missing}
    names = [img["name"] for img in missing]
    proc = subprocess.Popen(
        [*ctr, "import", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None
    try:
        write_archive(spec, proc.stdin)
    finally:
        proc.stdin.close()
    out = proc.stdout.read().decode() if proc.stdout else ""
    if proc.wait() != 0:
        raise SystemExit(f"image.py: ctr images import failed ({proc.returncode}):\n{out}")
    say(f"imported {', '.join(names)}")
    prune(ctr)


def prune(ctr: list[str]) -> None:
    """The kept store keeps what an image name points at: drop the CRI's image-id references to
    manifests no name points at any more (earlier builds), so containerd collects their layers."""
    listed = subprocess.run([*ctr, "ls"], capture_output=True, text=True).stdout.splitlines()[1:]
    refs = [(f[0], f[2]) for f in (line.split() for line in listed) if len(f) > 2]
    named = {digest for ref, digest in refs if not ref.startswith("sha256:")}
    stale = [ref for ref, digest in refs if ref.startswith("sha256:") and digest not in named]
    if stale:
        subprocess.run([*ctr, "rm", *stale], capture_output=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--spec", type=Path)
    b.add_argument("--no-apps", action="store_true")
    pz = sub.add_parser("pause")
    pz.add_argument("--spec", type=Path)
    i = sub.add_parser("import")
    i.add_argument("--spec", type=Path, required=True)
    i.add_argument("--address", required=True)
    a = sub.add_parser("archive")
    a.add_argument("--spec", type=Path, required=True)
    a.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd in ("build", "pause"):
        spec = build(with_apps=not args.no_apps) if args.cmd == "build" else pause_set()
        text = json.dumps(spec, indent=1)
        if args.spec:
            args.spec.parent.mkdir(parents=True, exist_ok=True)
            args.spec.write_text(text)
        for img in spec["images"]:  # type: ignore[attr-defined]
            size = sum(int(lyr["size"]) for lyr in img["layers"]) >> 20
            say(f"{img['name']}: {len(img['layers'])} layers, {size} MiB")
        return 0
    spec = json.loads(args.spec.read_text())
    if args.cmd == "import":
        import_set(spec, args.address)
    else:
        with open(args.out, "wb") as f:
            write_archive(spec, f)
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
