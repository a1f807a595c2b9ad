"""Throwaway TLS files for tests, made with the openssl command: a CA, and certificates it
signs for the names a test dials (subjectAltName entries such as IP:127.0.0.1, DNS:*.svc)."""

from __future__ import annotations

import subprocess
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # fast keys


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, cert: str = "ca.pem", days: int = 2) -> Path:
    """A self-signed CA: `cert` and ca.key in `directory`."""
    openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", cert, "-days", str(days),
            "-subj", "/CN=tinyps test CA", cwd=directory)
    return directory / cert


def issue(directory: Path, name: str, alt_names: list[str], ca: str = "ca.pem",
          cert: str | None = None, days: int = 2) -> tuple[Path, Path]:
    """A certificate for `alt_names` signed by the CA in `directory`: (NAME.pem, NAME.key)."""
    cert = cert or f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=" + ",".join(alt_names) + "\n")
    openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=tinyps {name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca, "-CAkey", "ca.key",
            "-CAcreateserial", "-out", cert, "-days", str(days), "-extfile", ext.name,
            cwd=directory)
    return directory / cert, directory / f"{name}.key"
