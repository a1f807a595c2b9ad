"""Who may talk to a server: a shared token checked on every call, and TLS credentials.

The token guards the tinyps service only; the standard health and reflection services stay
open, so that Kubernetes probes and stock gRPC tools keep working. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from ps.settings import setting

__all__ = ["TOKEN_ENV", "SecurityConfig", "TLSFiles", "TokenInterceptor", "channel_credentials",
           "client_tls", "server_credentials", "server_tls"]

TOKEN_ENV = "TINYPS_TOKEN"  # the shared token travels to child processes in the environment

_PROTECTED = "/tinyps.ParameterServer/"  # method prefix of the service the token guards


@dataclass(frozen=True)
class TLSFiles:
    """PEM files. Server: cert and key, plus ca to demand client certificates (mutual TLS).
    Client: ca to trust the servers, plus cert and key to prove itself under mutual TLS."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None:
                path = Path(path)
                if not path.is_file():
                    raise FileNotFoundError(f"TLS {name} file {path} does not exist")
                object.__setattr__(self, name, path)
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate and its key, or neither")

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        return None if path is None else path.read_bytes()


def server_tls(cert, key, ca=None) -> TLSFiles | None:
    """A server's TLS files from the cluster's settings (None: no TLS)."""
    if cert is None and key is None:
        return None
    return TLSFiles(cert=cert, key=key, ca=ca)


def client_tls(cert, key, ca=None) -> TLSFiles | None:
    """What a client of those servers uses: it trusts the CA if there is one, else the
    servers' own (self-signed) certificate; under mutual TLS it shows the cluster's
    certificate too (one identity for every process of a run)."""
    if cert is None and key is None:
        return None if ca is None else TLSFiles(ca=ca)
    if ca is None:
        return TLSFiles(ca=cert)
    return TLSFiles(cert=cert, key=key, ca=ca)


@dataclass(frozen=True)
class SecurityConfig:
    """Who may talk to the servers: the same settings for every process of a cluster."""

    token: str | None = setting(
        None, "shared token checked on every call", secret=True,
        env=TOKEN_ENV)
    tls_cert: str | None = setting(None, "PEM certificate of the servers (TLS for all traffic)")
    tls_key: str | None = setting(None, "PEM key of that certificate")
    tls_ca: str | None = setting(
        None, "PEM CA: servers demand client certificates it signed (mutual TLS)")

    def __post_init__(self) -> None:
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, str(value))
        if self.token == "":
            raise ValueError("the token must not be empty")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key (the servers' own "
                             "certificate)")
        self.tls(client=False)  # the files exist and come in pairs

    def tls(self, client: bool) -> TLSFiles | None:
        """TLS files for a server, or for a client of the servers (None: no TLS)."""
        make = client_tls if client else server_tls
        return make(self.tls_cert, self.tls_key, self.tls_ca)

    def describe(self) -> str:
        """How the servers are guarded, in a few words for a log line (never the token)."""
        if self.tls_cert is None:
            channel = "plaintext"
        elif self.tls_ca is None:
            channel = "TLS"
        else:
            channel = "mutual TLS (client certificates signed by its CA)"
        return f"{channel}, {'token required' if self.token else 'no token'}"

    def __repr__(self) -> str:  # never shows the token
        return (f"SecurityConfig(token={'(set)' if self.token else None}, "
                f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}, tls_ca={self.tls_ca!r})")


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    if tls.cert is None:
        raise ValueError("a TLS server needs --tls-cert and --tls-key")
    return grpc.ssl_server_credentials(
        [(tls._read("key"), tls._read("cert"))], root_certificates=tls._read("ca"),
        require_client_auth=tls.ca is not None)


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls._read("ca"),
                                        private_key=tls._read("key"),
                                        certificate_chain=tls._read("cert"))


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse tinyps calls whose `authorization: Bearer <token>` is missing or wrong."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the token must not be empty")
        self._expected = f"Bearer {token}".encode()

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token (authorization: Bearer ...)")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(_PROTECTED):
            return continuation(handler_call_details)  # health and reflection stay open
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        return self._refusal
