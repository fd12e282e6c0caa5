"""Podman for the container test: settings these machines need, the base image, the build.

No Docker engine and no image registry is needed (see docs/docker.md and the team's FACTS):

- podman runs rootful with runc and a private ``CONTAINERS_CONF`` (rlimits the sandbox can set,
  cgroupfs, a file event log); nothing is written to /etc/containers.
- The base is the official ``python:3.11-slim-bookworm`` when it is here or can be pulled;
  otherwise a stand-in made once from Debian packages with mmdebstrap (Debian's Python 3.11 in a
  venv at /opt/venv, first on PATH like the official image's /usr/local) and kept for
  ``BASE_MAX_AGE_DAYS``. The apt sources are the host's, read at run time.
- The image is tagged by a hash of what the build copies, so an unchanged tree is not built
  again; podman's layer cache keeps the dependency layer while only pyproject.toml is unchanged.

Everything slow is timed (:attr:`Podman.timings`) so the test can report its cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import reaper

__all__ = [
    "OFFICIAL_BASE",
    "STANDIN_BASE",
    "Podman",
    "PodmanError",
    "build_context_files",
]

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_BASE = "docker.io/library/python:3.11-slim-bookworm"
STANDIN_BASE = "localhost/popgate-python-standin:3.11-bookworm"
IMAGE_REPO = "localhost/popgate-test"
SUITE = "bookworm"
BASE_MAX_AGE_DAYS = 7
#: what the stand-in adds to Debian's minimal system: the official slim image's Python and what
#: its Debian base has that the Dockerfile uses (useradd)
STANDIN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
STANDIN_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PodmanError(RuntimeError):
    """podman (or the base image's making) failed; the message holds its output."""


def _cache_dir() -> Path:
    default = "/var/tmp/popgate-podman" if os.geteuid() == 0 else "~/.cache/popgate-podman"
    path = Path(os.environ.get("POPGATE_PODMAN_CACHE", default)).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _containers_conf(directory: Path) -> Path:
    """podman's defaults ask for rlimits (nofile 1048576, nproc above 32768) that need
    CAP_SYS_RESOURCE, which these sandboxes lack; there is no systemd; crun refuses the hybrid
    cgroup layout. Written once per machine, read by every podman call of the tests."""
    nofile_hard = _hard_limit("-Hn", 1048576)
    nproc = min(_hard_limit("-Hu", 32768), 32768)
    soft = min(1024, nofile_hard)
    text = (
        "[containers]\n"
        f'default_ulimits = ["nofile={soft}:{nofile_hard}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    path = directory / "containers.conf"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def _hard_limit(flag: str, unlimited: int) -> int:
    import resource

    which = resource.RLIMIT_NOFILE if flag == "-Hn" else resource.RLIMIT_NPROC
    hard = resource.getrlimit(which)[1]
    return unlimited if hard == resource.RLIM_INFINITY else int(hard)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One maker of a shared image at a time (several checkouts may run the suite at once)."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_context_files() -> list[Path]:
    """What the Dockerfile copies (and the Dockerfile): the image's identity."""
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted(p for p in (ROOT / "docker").iterdir() if p.is_file())
    files += sorted(
        p for p in (ROOT / "gateway").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    return files


def _context_hash() -> str:
    digest = hashlib.sha256()
    for path in build_context_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts (a TLS-intercepting proxy's CA may be in it only)."""
    candidates = [os.environ.get("PIP_CERT", "")]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(
            ["python3", "-m", "pip", "config", "get", "global.cert"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        candidates.append(got.stdout.strip() if got.returncode == 0 else "")
    candidates += [
        os.environ.get("REQUESTS_CA_BUNDLE", ""),
        os.environ.get("SSL_CERT_FILE", ""),
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _apt_sources() -> list[str]:
    """``deb URI SUITE COMPONENT`` lines of the host's Debian sources for SUITE (and its
    -updates/-security), as apt has them configured: no mirror name is written anywhere."""
    fmt = "$(ORIGIN)|$(RELEASE)|$(REPO_URI)|$(COMPONENT)|$(IDENTIFIER)"

    def read() -> list[str]:
        out = subprocess.run(
            ["apt-get", "indextargets", "--format", fmt],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        lines = set()
        for row in out.splitlines():
            origin, release, uri, component, identifier = (row.split("|") + [""] * 5)[:5]
            ours = release == SUITE or release.startswith(SUITE + "-")
            if origin == "Debian" and ours and identifier == "Packages":
                lines.add(f"deb {uri} {release} {component}")
        return sorted(lines)

    sources = read()
    if not sources:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        sources = read()
    if not sources:
        raise PodmanError(f"no Debian {SUITE} source in the host's apt configuration")
    return sources


def _apt_options() -> list[str]:
    """The host's mirrors may be dated snapshots with expired Release files: what the host's apt
    accepts, mmdebstrap's apt accepts too."""
    options = []
    for key in ("Acquire::Check-Valid-Until", "Acquire::Check-Date"):
        dump = subprocess.run(
            ["apt-config", "dump", key], capture_output=True, text=True, timeout=30
        ).stdout
        for line in dump.splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip('";') == "false":
                options.append(f'--aptopt={key} "false"')
    return options


RECIPE_LABEL = "org.popgate.standin-recipe"


def _standin_recipe() -> str:
    """What the stand-in is made of: a change makes it again."""
    recipe = json.dumps(
        [SUITE, STANDIN_PACKAGES, STANDIN_PATH, [h.rsplit("/", 1)[1] for h in _hooks()]]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _hooks() -> list[str]:
    """mmdebstrap's own hooks: merged-usr lays out a merged /usr itself; eatmydata skips dpkg's
    fsyncs while the tree is made (the hook fetches eatmydata into the tree and removes it)."""
    hooks = Path("/usr/share/mmdebstrap/hooks")
    return [
        f"--hook-dir={hooks / name}"
        for name in ("merged-usr", "eatmydata")
        if (hooks / name).is_dir()
    ]


class Podman:
    """Runs podman with the private settings; makes the base and the popgate image."""

    def __init__(self) -> None:
        if shutil.which("podman") is None:
            raise PodmanError("podman not found: run ./tests/bootstrap.sh (installs podman, runc)")
        self.cache = _cache_dir()
        self.env = {**os.environ, "CONTAINERS_CONF": str(_containers_conf(self.cache))}
        #: seconds spent per slow step ("base", "build"); absent when it was cached
        self.timings: dict[str, float] = {}
        #: reaper tokens of the containers and volumes made here and not removed yet
        self._reaper_tokens: dict[tuple[str, str], int | None] = {}

    # ----------------------------------------------------------------- plumbing
    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                ["podman", *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                input=input.decode() if input is not None else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(f"podman {' '.join(args[:3])} ... took over {timeout}s") from exc
        finally:
            if args[:1] == ("run",) and "--name" in args:  # removed by remove(), or the reaper
                self._watch("container", args[args.index("--name") + 1])
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def exists(self, kind: str, name: str) -> bool:
        """``kind`` is image, container or volume."""
        return self.run(kind, "exists", name, check=False).returncode == 0

    def inspect(self, name: str, kind: str = "container") -> dict[str, object]:
        out = self.run(kind, "inspect", name).stdout
        (data,) = json.loads(out)
        assert isinstance(data, dict)
        return data

    def check_works(self) -> None:
        """Fail loudly (never skip) when podman cannot run at all here."""
        self.run("info", timeout=60)

    # ----------------------------------------------------------------- the base image
    def base_image(self) -> str:
        """``POPGATE_TEST_BASE`` if set; the official image if here or pullable; else the
        stand-in (made now when missing or older than BASE_MAX_AGE_DAYS)."""
        wanted = os.environ.get("POPGATE_TEST_BASE", "")
        if wanted:
            if not self.exists("image", wanted):
                self.run("pull", wanted, timeout=600)
            return wanted
        if self.exists("image", OFFICIAL_BASE):
            return OFFICIAL_BASE
        # no registry here: the pull fails within a second (name resolution)
        if self.run("pull", "-q", OFFICIAL_BASE, check=False, timeout=300).returncode == 0:
            return OFFICIAL_BASE
        with _locked(self.cache / "standin.lock"):
            if os.environ.get("POPGATE_REBUILD_BASE") == "1" or not self._standin_is_current():
                self._make_standin()
        return STANDIN_BASE

    def _standin_is_current(self) -> bool:
        """Made by this recipe, and not older than BASE_MAX_AGE_DAYS (a current Debian 12)."""
        if not self.exists("image", STANDIN_BASE):
            return False
        fmt = '{{.Created.Unix}} {{index .Labels "' + RECIPE_LABEL + '"}}'
        created, _, recipe = (
            self.run("image", "inspect", STANDIN_BASE, "--format", fmt)
            .stdout.strip()
            .partition(" ")
        )
        age = time.time() - int(created)
        return recipe == _standin_recipe() and age < BASE_MAX_AGE_DAYS * 86400

    def _make_standin(self) -> None:
        for tool in ("mmdebstrap", "apt-get"):
            if shutil.which(tool) is None:
                raise PodmanError(f"{tool} not found: run ./tests/bootstrap.sh")
        started = time.monotonic()
        old = None
        if self.exists("image", STANDIN_BASE):
            old = self.run("image", "inspect", STANDIN_BASE, "--format", "{{.Id}}").stdout.strip()
        with tempfile.TemporaryDirectory(prefix="standin-", dir=self.cache) as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            argv = [
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                "--include=" + ",".join(STANDIN_PACKAGES),
                # like Debian's slim images: no documentation, manuals or translations
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                '--customize-hook=chroot "$1" python3 -m venv /opt/venv',
                *_apt_options(),
                SUITE,
                str(rootfs),
                *_apt_sources(),
            ]
            log = self.cache / "mmdebstrap.log"
            with open(log, "wb") as out:
                rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if rc.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise PodmanError(f"mmdebstrap exited {rc.returncode} (log {log}):\n{tail}")
            self.run(
                "import",
                "--change",
                f"ENV PATH={STANDIN_PATH}",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                f"LABEL {RECIPE_LABEL}={_standin_recipe()}",
                "--change",
                'CMD ["python3"]',
                "--message",
                "stand-in for python:3.11-slim-bookworm: mmdebstrap minbase + "
                + " ".join(STANDIN_PACKAGES)
                + ", venv /opt/venv",
                str(rootfs),
                STANDIN_BASE,
                timeout=300,
            )
        new = self.run("image", "inspect", STANDIN_BASE, "--format", "{{.Id}}").stdout.strip()
        if old and old != new:
            # popgate images built on the old base go with it (podman refuses, and keeps them,
            # while a container of another checkout's run still uses one)
            built = self.run("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPO)
            for name in built.stdout.split():
                self.run("rmi", name, check=False)
            self.run("rmi", old, check=False)
        self.timings["base"] = time.monotonic() - started

    # ----------------------------------------------------------------- the popgate image
    def build_image(self, base: str) -> str:
        """Build docker/Dockerfile on ``base`` unless this tree's image exists; its name."""
        base_id = self.run("image", "inspect", base, "--format", "{{.Id}}").stdout.strip()
        tag = f"{IMAGE_REPO}:{_context_hash()}-{base_id[:12]}"
        with _locked(self.cache / "build.lock"):
            if self.exists("image", tag):
                return tag
            started = time.monotonic()
            argv = [
                "build",
                "--format",
                "docker",  # the OCI format drops HEALTHCHECK
                "--pull=never",
                "--network=host",
                "--build-arg",
                f"BASE={base}",
                "-f",
                str(ROOT / "docker" / "Dockerfile"),
                "-t",
                tag,
            ]
            ca = host_ca_bundle()
            if ca is not None:
                # pip inside the build trusts what the host trusts (an egress proxy's CA)
                argv += ["-v", f"{ca}:/etc/ssl/certs/ca-certificates.crt:ro"]
            self.run(*argv, str(ROOT), timeout=900)
            self.timings["build"] = time.monotonic() - started
            self._drop_older_builds(keep=tag)
        return tag

    def _drop_older_builds(self, keep: str, older_than_days: float = 1) -> None:
        """Images of earlier trees pile up: remove those older than a day (other checkouts'
        current ones are younger; an image a container still uses is refused and kept)."""
        listed = self.run("images", "--format", "json", IMAGE_REPO).stdout
        now = time.time()
        for entry in json.loads(listed or "[]"):
            for name in entry.get("Names") or []:
                if (
                    name != keep
                    and now - float(entry.get("Created", now)) > older_than_days * 86400
                ):
                    self.run("rmi", name, check=False)

    # ----------------------------------------------------------------- containers
    def _watch(self, kind: str, name: str) -> None:
        """Have the reaper remove the container or volume if this pytest run dies first."""
        if (kind, name) not in self._reaper_tokens:
            argv = ["podman", "rm", "-f", "-v", "-t", "0", name]
            if kind == "volume":
                argv = ["podman", "volume", "rm", "-f", name]
            self._reaper_tokens[kind, name] = reaper.watch_command(argv, self.env)

    def volume(self, name: str) -> Path:
        """Create a named volume; its directory on the host (rootful podman: readable)."""
        self._watch("volume", name)
        self.run("volume", "create", name)
        return Path(
            self.run("volume", "inspect", name, "--format", "{{.Mountpoint}}").stdout.strip()
        )

    def remove(self, containers: Sequence[str] = (), volumes: Sequence[str] = ()) -> None:
        for name in containers:
            self.run("rm", "-f", "-v", "-t", "0", name, check=False)  # -v: anonymous volumes too
            reaper.unwatch(self._reaper_tokens.pop(("container", name), None))
        for name in volumes:
            self.run("volume", "rm", "-f", name, check=False)
            reaper.unwatch(self._reaper_tokens.pop(("volume", name), None))
