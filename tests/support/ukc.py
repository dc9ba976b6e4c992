"""`ukc` run as a real process in a project directory against a local metro daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from reconciler.local.daemon import MetroInfo

__all__ = ["Ukc"]


@dataclass
class Ukc:
    """Runs `ukc` in a project directory against the test metro."""

    project: Path
    metro: MetroInfo
    extra_env: dict[str, str]

    def env(self) -> dict[str, str]:
        # the suite's own warm process (tests/conftest.py) is kept; every other UKC_ is not
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("UKC_") or k == "UKC_WARM_DIR"
        }
        env["UKC_LOCAL_STATE_DIR"] = str(self.metro.state_dir)
        env.update(self.extra_env)
        return env

    def run(
        self, *args: str, check: int | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "reconciler", *args],
            cwd=self.project,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check is not None:
            assert proc.returncode == check, (
                f"ukc {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def write_spec(self, text: str, name: str = "session.yaml") -> Path:
        path = self.project / name
        path.write_text(textwrap.dedent(text))
        return path

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.project / ".ukc" / "status.json").read_text())
        return data

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.metro.api_url,
            headers={"Authorization": f"Bearer {self.metro.token}"},
            timeout=30,
        )

    def instances(self) -> list[dict[str, Any]]:
        """The metro's instances, without the deleted ones it still retains (state
        `deleted`: their name may be taken a while, they are gone for everything else)."""
        with self.api() as client:
            body = client.get("/v1/instances", params={"details": "true"}).json()
        return [i for i in body["data"]["instances"] if i.get("state") != "deleted"]

    def workspace(self, uuid: str) -> Path:
        return self.metro.state_dir / "workspaces" / uuid
