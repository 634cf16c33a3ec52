"""Stand-in base images for the stack test: built here from Debian packages and PyPI, tagged with
the names the project's Dockerfiles and compose file use (no image registry is reachable).

Each stand-in is built as `lora-retrain-standin/<name>` (kept between runs: the layer cache) and
tagged with its official name only while the test runs (`untag_official` at its end), so no stand-in stays
behind under a name like `postgres:16`, and an official image already on the engine is never
shadowed: the test stops instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STANDINS = HERE / "standins"
ROOT = HERE.parent.parent
LABEL = "org.lora-retrain.standin"
DEBIAN = "lora-retrain-standin/debian:bookworm"
# stand-in -> the official name it poses as (in build order: python first, the others build on it)
OFFICIAL = {
    "lora-retrain-standin/python:3.11-slim": "python:3.11-slim",
    "lora-retrain-standin/airflow:3.3.2-python3.11": "apache/airflow:3.3.2-python3.11",
    "lora-retrain-standin/postgres:16": "postgres:16",
    "lora-retrain-standin/redis:7.2-bookworm": "redis:7.2-bookworm",
    "lora-retrain-standin/s3:latest": "",  # the MinIO stand-in, named as such in compose.test.yaml
}


def run(*cmd: str, stdin: Any = None) -> str:
    """A command's output; its failure raised with what it printed (a build's log, say)."""
    out = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n"
                           f"{out.stdout[-5000:]}\n{out.stderr[-5000:]}")
    return out.stdout


def exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def is_standin(image: str) -> bool:
    out = subprocess.run(["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{LABEL}"}}}}', image],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "true"


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 sources or sources.list)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))]
    for text in texts:
        for stanza in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and "security" not in stanza:
                found = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if found:
                    return found.group(1)
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]
    for path in lists:
        if path.exists():
            found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", path.read_text(), re.M)
            if found:
                return found.group(1)
    raise RuntimeError("no Debian bookworm mirror in /etc/apt/sources*: debootstrap needs one")


def pip_setting(name: str) -> list[str]:
    """A value of the host's pip configuration (e.g. `cert`, `find-links`), split on whitespace."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == name:
            values += value.strip().strip("'\"").split()
    return values


def host_ca_bundle() -> Path:
    """The CA bundle the host's pip trusts: pip inside the builds needs it to reach the index."""
    for value in pip_setting("cert") + ["/etc/ssl/certs/ca-certificates.crt"]:
        if Path(value).is_file():
            return Path(value)
    raise RuntimeError("no CA bundle: pip config has no `cert` and /etc/ssl/certs/ca-certificates.crt is missing")


def torch_wheels() -> list[Path]:
    """The CPU torch wheel(s) the host's pip installs from its local wheel folder (find-links)."""
    return [w for d in pip_setting("find-links") if Path(d).is_dir() for w in sorted(Path(d).glob("torch-*+cpu-*.whl"))]


def build_debian(rebuild: bool = False) -> None:
    if exists(DEBIAN) and not rebuild:
        return
    with tempfile.TemporaryDirectory(prefix="standin-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror())
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run("docker", "import", "-c", f"LABEL {LABEL}=true", "-c", 'CMD ["bash"]', "-", DEBIAN, stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap rootfs failed")


def build_standins(rebuild: bool = False) -> None:
    """Every stand-in: the Debian root file system only when missing (or `rebuild`), the images on
    it always (Docker's layer cache makes an unchanged one a matter of seconds)."""
    build_debian(rebuild)
    for image, official in OFFICIAL.items():
        name = image.split("/", 1)[1].split(":", 1)[0]
        with tempfile.TemporaryDirectory(prefix=f"standin-{name}-") as tmp:
            context = Path(tmp) / name
            shutil.copytree(STANDINS / name, context)
            if name == "python":
                shutil.copy(host_ca_bundle(), context / "host-ca.crt")
            if name == "airflow":
                (context / "wheels").mkdir()
                for wheel in torch_wheels():
                    shutil.copy(wheel, context / "wheels" / wheel.name)
                shutil.copy(ROOT / "requirements" / "constraints.txt", context)
            run("docker", "build", "--quiet", *(["--no-cache"] if rebuild else []), "--label", f"{LABEL}=true",
                "-t", image, str(context))
        if official:
            tag(image, official)  # the next stand-ins build FROM python:3.11-slim


def tag(image: str, official: str) -> None:
    if exists(official) and not is_standin(official):
        raise RuntimeError(f"{official} on this engine is not a stand-in of this test: it would be shadowed; "
                           "remove it or run the test on another engine")
    run("docker", "tag", image, official)


def untag_official() -> None:
    for official in filter(None, OFFICIAL.values()):
        if exists(official) and is_standin(official):
            subprocess.run(["docker", "rmi", official], capture_output=True)

