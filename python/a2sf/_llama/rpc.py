"""Layers on other machines: ``Llama(..., rpc_servers="host:port,...")``.

llama.cpp's RPC backend (a libllama built with ``-DGGML_RPC=ON``) turns each
``rpc-server`` (``ggml-rpc-server``) into a ggml device; a model load with
``n_gpu_layers`` then places layers there, with their K/V and a2sf's score
tensors (allocated in each layer's buffer type). llama-server registers them from
``--rpc``; llama-cpp-python 0.3.36 has no such parameter, so :func:`add_rpc_servers`
calls a2sf's ``llama_kv_policy_rpc_add_server`` (cpp/src/llama-kv-rpc.cpp) in the
libllama that llama_cpp loaded, before the model load.

ggml's RPC client aborts the process when it cannot connect or the server speaks
another protocol, so every endpoint is first checked here: a malformed one is a
``ValueError``, an unreachable or foreign server a ``ConnectionError``, a build
without RPC a ``RuntimeError``. The registration is process-wide (ggml's device
registry): later loads with ``n_gpu_layers`` in the same process use the devices
too. rpc-server is unauthenticated: use it on loopback or a trusted network only
(docs/DEPLOY.md).
"""
from __future__ import annotations

import ctypes
import re
import socket
import struct
from typing import Any, List, Tuple

import llama_cpp

__all__ = ["parse_rpc_servers", "add_rpc_servers", "rpc_supported"]

# ggml-rpc's handshake (ggml/src/ggml-rpc/ggml-rpc.cpp of the pinned llama.cpp):
# | cmd HELLO=14 (1 byte) | size (8 bytes) | conn_caps[24] |  ->  | size (8 bytes) | major, minor, patch, pad, conn_caps[24] |
_HELLO = 14
_CAPS_SIZE = 24
_PROTO_MAJOR, _PROTO_MINOR = 7, 0  # RPC_PROTO_{MAJOR,MINOR}_VERSION in ggml-rpc.h
_MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS
_TIMEOUT_S = 10.0

_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")

#: endpoints registered in this process (ggml keeps one connection to each: an
#: rpc-server serves one client at a time, so they are not probed again)
_registered: List[str] = []


def parse_rpc_servers(value: Any) -> List[Tuple[str, int]]:
    """``"host:port,host:port"`` (as llama-server's ``--rpc``) or a list of
    ``"host:port"`` strings -> ``[(host, port), ...]``; ValueError when malformed.

    Hosts are IPv4 addresses or names (ggml's RPC client resolves IPv4 only)."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ValueError(
            f"rpc_servers must be a 'host:port[,host:port...]' string or a list of 'host:port' "
            f"strings, got {value!r}"
        )
    out: List[Tuple[str, int]] = []
    for item in items:
        ep = item.strip()
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not _HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"rpc_servers: {item!r} is not an endpoint 'host:port' (an IPv4 address or host name, "
                f"a port in 1..65535), e.g. '127.0.0.1:50052'"
            )
        if (host, int(port)) in out:
            raise ValueError(f"rpc_servers: {ep!r} is given twice")
        out.append((host, int(port)))
    if not out:
        raise ValueError("rpc_servers is empty")
    if len(out) > _MAX_SERVERS:
        raise ValueError(f"rpc_servers: at most {_MAX_SERVERS} servers, got {len(out)}")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the connection was closed")
        buf += chunk
    return buf


def _check_server(host: str, port: int, timeout: float = _TIMEOUT_S) -> None:
    """Connect and shake hands as ggml's client does, then hang up; ConnectionError
    when that fails (ggml itself would abort the process)."""
    ep = f"{host}:{port}"
    hint = f"start one there with: rpc-server -H {host} -p {port} (docs/DEPLOY.md)"
    try:
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except OSError as e:
        raise ConnectionError(f"rpc_servers: cannot resolve {host!r} (IPv4): {e}") from None
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", _HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(s, 8))
            if size != 4 + _CAPS_SIZE:
                raise ConnectionError(f"unexpected handshake reply ({size} bytes)")
            major, minor, patch = _recv_exact(s, size)[:3]
    except socket.timeout:
        raise ConnectionError(
            f"rpc_servers: {ep} accepted no handshake within {timeout:g} s (an rpc-server serves one "
            "client at a time: is another process using it?)"
        ) from None
    except OSError as e:  # refused, reset, closed (ConnectionError is an OSError)
        raise ConnectionError(f"rpc_servers: no RPC server at {ep} ({e}); {hint}") from None
    if major != _PROTO_MAJOR or minor > _PROTO_MINOR:
        raise ConnectionError(
            f"rpc_servers: {ep} speaks RPC protocol {major}.{minor}.{patch}, this build "
            f"{_PROTO_MAJOR}.{_PROTO_MINOR}.x: run the rpc-server built from the same tree "
            "(bash scripts/build-rpc.sh)"
        )


def _lib() -> Any:
    return llama_cpp.llama_cpp._lib


def rpc_supported() -> bool:
    """True if the loaded libllama has llama.cpp's RPC backend (built with -DGGML_RPC=ON)."""
    return bool(llama_cpp.llama_supports_rpc()) and hasattr(_lib(), "llama_kv_policy_rpc_add_server")


def add_rpc_servers(value: Any) -> List[str]:
    """Check and register the RPC servers of ``value`` (see :func:`parse_rpc_servers`);
    returns their endpoints. Endpoints registered before are kept (not added twice)."""
    servers = parse_rpc_servers(value)
    if not rpc_supported():
        raise RuntimeError(
            "rpc_servers needs a2sf built with llama.cpp's RPC backend, and this build has none: "
            "CMAKE_ARGS=\"-DGGML_RPC=ON\" bash scripts/setup.sh (docs/DEPLOY.md)"
        )
    fn = _lib().llama_kv_policy_rpc_add_server
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = ctypes.c_int32
    endpoints = []
    for host, port in servers:
        ep = f"{host}:{port}"
        if ep in _registered:
            endpoints.append(ep)
            continue
        _check_server(host, port)
        n = fn(ep.encode())
        if n < 0:
            raise RuntimeError(f"rpc_servers: registering {ep} failed (error {n})")
        if n == 0:
            raise ConnectionError(f"rpc_servers: the RPC server at {ep} reports no devices")
        _registered.append(ep)
        endpoints.append(ep)
    return endpoints
