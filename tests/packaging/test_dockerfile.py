"""The Dockerfile, checked without a Docker engine (none runs here).

The image's contract is read from the Dockerfile itself; e2e/cluster/image.py,
which builds the same image without Docker for the local node, is kept in step
with it (TestImageScript; e2e/test_node.py checks the image it built); and the
Dockerfile's install step is replayed: the build context that .dockerignore lets through is copied as
the COPY lines say, the RUN line's `pip install` runs in a fresh virtualenv
(non-editable, from PyPI), the sources are removed as the RUN line removes
them, and the installed `kubetasks --help` must work.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def the(name: str) -> list[str]:
    return [args for ins, args in instructions() if ins == name]


def stage(name_or_last: str | None = None) -> list[tuple[str, str]]:
    """The instructions of one build stage (``FROM ... AS name``; None: the last, the image)."""
    stages: list[list[tuple[str, str]]] = []
    for ins, args in instructions():
        if ins == "FROM":
            stages.append([])
        stages[-1].append((ins, args))
    if name_or_last is None:
        return stages[-1]
    for st in stages:
        words = st[0][1].split()
        if len(words) == 3 and words[1].upper() == "AS" and words[2] == name_or_last:
            return st
    raise AssertionError(f"no stage {name_or_last!r}")


def pip_install_args() -> list[str]:
    """The `pip install ...` command of the RUN step that installs kubetasks."""
    for run in the("RUN"):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                return words
    raise AssertionError("no RUN step runs `pip install`")


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match on a parent dir counts."""
    ignored = False
    parts = rel.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        hit = any(
            fnmatch.fnmatchcase("/".join(parts[: i + 1]), p)
            or (p.startswith("**/") and fnmatch.fnmatchcase(parts[i], p[3:]))
            for i in range(len(parts))
        )
        if hit:
            ignored = not neg
    return ignored


def ignore_patterns() -> list[str]:
    return [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]


def build_context(dest: Path) -> None:
    """Copy what the build would see: the repository minus .dockerignore."""
    patterns = ignore_patterns()
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in tracked:
        if not dockerignored(rel, patterns) and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


class TestDockerfile:
    def test_image_contract(self) -> None:
        """python:3.11-slim-bookworm, uid 10001, ENTRYPOINT kubetasks, CMD run, metrics port exposed."""
        # The dashboard's page is built by a Node stage; the image is the Python stage.
        assert the("FROM") == ["node:20-bookworm-slim AS ui", "python:3.11-slim-bookworm"]
        assert [a for i, a in stage("ui") if i == "RUN"] == ["npm ci --no-audit --no-fund && npm run build"]
        assert the("USER") == ["10001:10001"]
        assert json.loads(the("ENTRYPOINT")[-1]) == ["kubetasks"]
        assert json.loads(the("CMD")[-1]) == ["run"]
        assert the("EXPOSE") == ["9090"]
        assert any("useradd" in r and "--uid 10001" in r for r in the("RUN"))
        assert pip_install_args() == ["pip", "install", "--no-cache-dir", "."]
        # USER comes after every RUN: nothing runs as root at start-up
        order = [ins for ins, _ in instructions()]
        assert order.index("USER") > max(i for i, ins in enumerate(order) if ins == "RUN")

    def test_build_context_is_small(self, tmp_path: Path) -> None:
        """.dockerignore lets in pyproject.toml, README.md, operator/ and the page's sources
        (no .venv, .run, tests, node_modules or a page built on the host)."""
        build_context(tmp_path)
        top = sorted(p.name for p in tmp_path.iterdir())
        assert top == ["README.md", "dashboard-ui", "operator", "pyproject.toml"], top
        assert not list(tmp_path.rglob("__pycache__"))
        assert not list(tmp_path.rglob("node_modules")) and not list(tmp_path.rglob("static"))
        assert dockerignored("operator/kubetasks/dashboard/static/index.html", ignore_patterns())
        assert dockerignored("dashboard-ui/node_modules/preact/package.json", ignore_patterns())
        assert (tmp_path / "operator" / "kubetasks" / "store" / "sql" / "schema.sql").is_file()

    @pytest.mark.timeout(420)
    def test_the_install_step_works(self, tmp_path: Path) -> None:
        """Replaying COPY + `pip install --no-cache-dir .` into a fresh venv gives a working `kubetasks`."""
        context = tmp_path / "context"
        context.mkdir()
        build_context(context)
        # The Node stage, replayed: its COPY into its WORKDIR, then its RUN (npm from the registry).
        ui_root = tmp_path / "ui"
        ui_stage = stage("ui")
        [ui_workdir] = [a for i, a in ui_stage if i == "WORKDIR"]
        ui_dir = ui_root / ui_workdir.lstrip("/")
        [ui_copy] = [shlex.split(a) for i, a in ui_stage if i == "COPY"]
        shutil.copytree(context / ui_copy[0], ui_dir)
        [ui_run] = [a for i, a in ui_stage if i == "RUN"]
        built = subprocess.run(
            ["bash", "-c", ui_run], cwd=ui_dir, capture_output=True, text=True, timeout=240
        )
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]

        src = tmp_path / "image" / "src"  # WORKDIR /src
        src.mkdir(parents=True)
        assert "/src" in the("WORKDIR")
        for ins, args in stage(None):
            if ins != "COPY":
                continue
            words = shlex.split(args)
            origin = context
            if words[0].startswith("--from="):
                assert words[0] == "--from=ui", words
                origin, words = ui_root, words[1:]
            *sources, target = words
            into_dir = target.endswith("/") or len(sources) > 1
            for s in sources:
                dest = src / target / Path(s).name if into_dir else src / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                if (origin / s.lstrip("/")).is_dir():
                    shutil.copytree(origin / s.lstrip("/"), dest)
                else:
                    shutil.copy2(origin / s.lstrip("/"), dest)
        assert (src / "pyproject.toml").is_file() and (src / "operator" / "kubetasks" / "cli.py").is_file()
        assert (src / "operator" / "kubetasks" / "dashboard" / "static" / "index.html").is_file()
        assert not (src / "dashboard-ui").exists()  # the Python stage never sees the page's sources

        base = shutil.which("python3.11") or sys.executable  # the image is python:3.11
        venv = tmp_path / "venv"
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        py, bin_dir = venv / "bin" / "python", venv / "bin"
        version = subprocess.run(
            [str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"\nvenv python {version}; replaying: {' '.join(pip_install_args())} (cwd {src})")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
        env.update(
            PATH=f"{bin_dir}:{env.get('PATH', '')}",
            PYTHONDONTWRITEBYTECODE="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        pip = [str(py), "-m", *pip_install_args()]
        res = subprocess.run(pip, cwd=src, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        shutil.rmtree(src)  # `&& rm -rf /src`: the install must not depend on the sources

        app_dir = tmp_path / "image" / "app"  # WORKDIR /app
        app_dir.mkdir()
        helped = subprocess.run(
            [str(bin_dir / "kubetasks"), "--help"],
            cwd=app_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert helped.returncode == 0, helped.stderr
        assert "run" in helped.stdout and "migrate" in helped.stdout, helped.stdout
        run_help = subprocess.run(
            [str(bin_dir / "kubetasks"), "run", "--help"],
            cwd=app_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run_help.returncode == 0 and "KUBETASKS_APP" in run_help.stdout, run_help.stdout
        data = subprocess.run(
            [
                str(py),
                "-c",
                "from importlib.resources import files; import kubetasks, sys;"
                "assert 'site-packages' in kubetasks.__file__, kubetasks.__file__;"
                "assert (files('kubetasks') / 'store' / 'sql' / 'schema.sql').is_file();"
                "assert (files('kubetasks') / 'dashboard' / 'static' / 'index.html').is_file()",
            ],
            cwd=app_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert data.returncode == 0, data.stderr


def image_script() -> ModuleType:
    """e2e/cluster/image.py, loaded as a module (its recipe is in constants)."""
    spec = importlib.util.spec_from_file_location("image_script", ROOT / "e2e" / "cluster" / "image.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TestImageScript:
    """The Dockerfile and e2e/cluster/image.py (the same image without Docker) stay in step."""

    def test_same_debian_and_python_minor(self) -> None:
        image = image_script()
        m = re.fullmatch(r"python:(\d+\.\d+)-slim-(\w+)", the("FROM")[-1])
        assert m, f"the Dockerfile's base should name its Python minor and Debian release: {the('FROM')}"
        assert (m.group(1), m.group(2)) == (image.PYTHON_MINOR, image.SUITE)

    def test_same_user_directory_environment_port_and_command(self) -> None:
        image = image_script()
        assert the("USER")[-1] == f"{image.UID}:{image.GID}"
        assert the("WORKDIR")[-1] == image.WORKDIR
        assert [int(p) for p in the("EXPOSE")[-1].split()] == list(image.EXPOSE)
        assert json.loads(the("ENTRYPOINT")[-1]) == image.ENTRYPOINT
        assert json.loads(the("CMD")[-1]) == image.CMD
        env = dict(kv.split("=", 1) for args in the("ENV") for kv in shlex.split(args))
        assert env == image.ENV
        config = image.image_config([{"digest": "sha256:0"}])["config"]
        assert config["User"] == the("USER")[-1] and config["WorkingDir"] == the("WORKDIR")[-1]
        assert config["Entrypoint"] == image.ENTRYPOINT and config["Cmd"] == image.CMD
        assert config["ExposedPorts"] == {f"{p}/tcp": {} for p in image.EXPOSE}
        assert {e.split("=", 1)[0] for e in config["Env"]} == {"PATH", *env}

    def test_same_user_account(self) -> None:
        image = image_script()
        words = [shlex.split(part) for run in the("RUN") for part in run.split("&&")]
        group = next(w for w in words if w[:1] == ["groupadd"])
        user = next(w for w in words if w[:1] == ["useradd"])
        assert group[group.index("--gid") + 1] == str(image.GID) and group[-1] == image.USER_NAME
        assert user[user.index("--uid") + 1] == str(image.UID) and user[user.index("--gid") + 1] == str(
            image.GID
        )
        assert user[user.index("--home-dir") + 1] == image.WORKDIR
        assert user[user.index("--shell") + 1] == image.SHELL and user[-1] == image.USER_NAME
        assert "--system" in user and "--no-create-home" in user

    def test_same_files_and_no_extras(self, tmp_path: Path) -> None:
        image = image_script()
        copied = sorted(
            s.rstrip("/") for i, args in stage(None) if i == "COPY" and not args.startswith("--from")
            for s in shlex.split(args)[:-1]
        )  # fmt: skip
        assert copied == sorted(image.SOURCES)
        ui_copied = sorted(
            s.rstrip("/") for i, args in stage("ui") if i == "COPY" for s in shlex.split(args)[:-1]
        )
        assert ui_copied == sorted(image.UI_SOURCES)
        build_context(tmp_path)
        context = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
        files = {str(p.relative_to(ROOT)) for p in image.source_files()}
        assert files == context, "image.py builds its wheel from exactly the Dockerfile's build context"
        assert pip_install_args()[-1] == "."  # the project itself, no [extras]: image.py installs none
