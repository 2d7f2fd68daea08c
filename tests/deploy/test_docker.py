"""The Dockerfiles install what scripts/setup.sh (the README's setup) installs, in the same
order, run as a non-root user and check real health endpoints. CI has no Docker engine,
so both files are parsed."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"
DOCKER = ROOT / "deploy" / "docker"
# Packages an image adds beyond setup.sh, and why: curl runs HEALTHCHECK; the CUDA base
# image has no Python of its own.
IMAGE_ONLY_APT = {"cpu": {"curl"}, "cuda": {"curl", "python3", "python3-venv"}}
# The CUDA image takes Mooncake's CUDA wheel (setup.sh keeps it where it is installed).
CUDA_SWAPS = {"mooncake-transfer-engine-non-cuda": "mooncake-transfer-engine"}


def pip_args(command: str) -> tuple[str, ...]:
    """The arguments of one `pip install`, without what does not change what is installed."""
    rest = command.split("pip install", 1)[1]
    return tuple(a for a in shlex.split(rest) if a not in ("-q", "$@"))


def setup_steps(text: str) -> tuple[list[tuple[str, ...]], set[str], bool]:
    """(pip installs in order, apt packages, stubs generated) of scripts/setup.sh."""
    pips = [pip_args(line.split("||")[-1]) for line in text.splitlines()
            if "-m pip install" in line and not line.lstrip().startswith("#")]
    (pairs,) = re.findall(r"for pair in (.*?); do", text)
    apt = {pair.split(":")[1] for pair in pairs.split()}
    return pips, apt, '$VPY -c "import proto"' in text


def dockerfile_runs(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip()[4:] for line in joined.splitlines() if line.strip().startswith("RUN ")]


def docker_steps(text: str) -> tuple[list[tuple[str, ...]], set[str], bool]:
    commands = [c.strip() for run in dockerfile_runs(text) for c in re.split(r"&&|;", run)]
    pips = [pip_args(c) for c in commands if "pip install" in c]
    apt: set[str] = set()
    for command in commands:
        if "apt-get install" in command:
            apt |= {a for a in shlex.split(command.split("apt-get install", 1)[1]) if not a.startswith("-")}
    return pips, apt, any(c in ('python -c "import proto"', 'python3 -c "import proto"') for c in commands)


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_installs_what_setup_installs(flavour: str) -> None:
    setup_pips, setup_apt, setup_stubs = setup_steps(SETUP.read_text())
    pips, apt, stubs = docker_steps((DOCKER / f"Dockerfile.{flavour}").read_text())
    if flavour == "cuda":
        setup_pips = [tuple(CUDA_SWAPS.get(a, a) for a in step) for step in setup_pips]
    assert len(setup_pips) >= 5 and ("torch==2.13.0",) in setup_pips  # the parser found setup's steps
    assert pips == setup_pips
    assert apt - IMAGE_ONLY_APT[flavour] == setup_apt == {"libibverbs1", "libnuma1"}
    assert stubs and setup_stubs


def test_the_check_can_fail() -> None:
    text = (DOCKER / "Dockerfile.cpu").read_text().replace("nixl==1.5.1 ", "nixl==1.5.0 ")
    assert docker_steps(text)[0] != setup_steps(SETUP.read_text())[0]


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_image_runs_as_non_root_with_a_real_healthcheck(flavour: str) -> None:
    text = (DOCKER / f"Dockerfile.{flavour}").read_text()
    (user,) = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    (check,) = re.findall(r"^HEALTHCHECK .*", re.sub(r"\\\n", " ", text), re.MULTILINE)
    assert "/health" in check and "EPD_HEALTH_PORT:-8000" in check  # router's HTTP port or a worker's metrics port
    assert re.search(r'^ENTRYPOINT \["epd"\]', text, re.MULTILINE)
    ignored = (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored


def test_chart_defaults_use_the_cpu_image() -> None:
    values = yaml.safe_load((ROOT / "helm" / "epd-serve" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "epd-serve" / "Chart.yaml").read_text())
    assert values["image"]["tag"] == f"{chart['appVersion']}-cpu"
    assert f"epd-serve:{values['image']['tag']}" in (DOCKER / "Dockerfile.cpu").read_text()
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["podSecurityContext"]["runAsUser"] == 10001  # the image's user
