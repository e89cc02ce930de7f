"""Fixtures: the bundled stories260K, SmolLM2-135M-Instruct (scripts/fetch-models.sh) and the
tandem CLI binary the Python results are compared with."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stories() -> Path:
    return ROOT / "models" / "stories260K"


@pytest.fixture(scope="session")
def tandem_bin() -> Path:
    b = Path(os.environ.get("TANDEM_BIN", ROOT / "target" / "release" / "tandem"))
    if not b.exists():
        pytest.skip(f"{b}: build the CLI first (cargo build --release)")
    return b


@pytest.fixture(scope="session")
def smollm2(tandem_bin) -> Path:
    """The SmolLM2 F16 folder, fetched and converted on first use."""
    env = dict(os.environ, TANDEM_BIN=str(tandem_bin))
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-models.sh")],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip().splitlines()[-1]
    return Path(out) / "smollm2-135m-f16"


@pytest.fixture(scope="session")
def chat_prompts() -> list:
    lines = (ROOT / "scripts" / "chat-prompts.jsonl").read_text().splitlines()
    return [json.loads(l)["prompt"] for l in lines if l.strip()]


@pytest.fixture(scope="session")
def smol(smollm2):
    import tandem
    return tandem.Model(smollm2)


@pytest.fixture(scope="session")
def smol_gguf(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 as an F16 GGUF (what llama.cpp loads), written by tandem.quantize."""
    import tandem
    out = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    tandem.quantize(smollm2, out, scheme="f16", embeddings="f16", output="f16", progress=False)
    return out


def cli(tandem_bin, *args) -> str:
    r = subprocess.run([str(tandem_bin), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout
