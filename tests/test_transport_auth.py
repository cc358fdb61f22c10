"""Only trusted peers over TCP: shared-key challenge-response, TLS, the loopback default.

Every test uses real sockets on loopback and real threads; a listener that refused a peer
must still hand out the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pageflip.errors import PeerRejected, PeerTimeout, SpanError
from pageflip.transport import (
    Address,
    TcpAuth,
    TcpConnection,
    TcpListener,
    TlsFiles,
    is_loopback,
)

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
#: The refusal marker a refused peer reads before the connection closes.
REFUSED = b"PFA1-NO\n"


class Background:
    """Run ``fn(*args)`` in a thread; :meth:`join` returns its result or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as err:
            self._error = err

    def join(self) -> Any:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the background call never returned"
        if self._error is not None:
            raise self._error
        return self._value


def _loopback(auth: TcpAuth | None) -> TcpListener:
    listener = Address.parse("tcp:127.0.0.1:0").listen(auth=auth)
    assert isinstance(listener, TcpListener)
    return listener


def _connect(listener: TcpListener, auth: TcpAuth | None) -> TcpConnection:
    host = "127.0.0.1" if listener.host == "0.0.0.0" else listener.host
    conn = TcpConnection.connect(host, listener.port, 10, auth=auth)
    assert isinstance(conn, TcpConnection)
    return conn


def _recv_all(conn: TcpConnection, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        assert conn.wait_readable(30)
        data, _ = conn.recv(size - len(out))
        assert data, f"EOF after {len(out)} of {size} bytes"
        out += data
    return bytes(out)


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            out += chunk
    return out


def _pair(listener: TcpListener, auth: TcpAuth | None) -> tuple[TcpConnection, TcpConnection]:
    """An accepted and a connected connection through ``listener``."""
    accepting = Background(listener.accept, 30)
    try:
        client = _connect(listener, auth)
    finally:
        server = accepting.join()
    return server, client


def _exchange(server: TcpConnection, client: TcpConnection) -> None:
    client.send(b"from the source", phase="test")
    assert _recv_all(server, 15) == b"from the source"
    server.send(b"from the destination", phase="test")
    assert _recv_all(client, 20) == b"from the destination"


def _assert_usable(listener: TcpListener, auth: TcpAuth | None) -> None:
    server, client = _pair(listener, auth)
    try:
        _exchange(server, client)
    finally:
        server.close()
        client.close()


# -- shared key --------------------------------------------------------------------------------


def test_shared_key_authenticates_both_sides_and_data_flows() -> None:
    auth = TcpAuth(key=KEY)
    with _loopback(auth) as listener:
        server, client = _pair(listener, auth)
        try:
            assert server.auth_mode == client.auth_mode == "key"
            _exchange(server, client)
        finally:
            server.close()
            client.close()


def test_wrong_key_is_refused_on_both_sides_and_the_listener_takes_the_next() -> None:
    with _loopback(TcpAuth(key=KEY)) as listener:
        accepting = Background(listener.accept, 30)
        with pytest.raises(PeerRejected) as client_err:
            _connect(listener, TcpAuth(key=OTHER_KEY))
        with pytest.raises(PeerRejected) as server_err:
            accepting.join()
        assert client_err.value.phase == server_err.value.phase == "auth"
        assert "refused us" in str(client_err.value)
        assert "does not know the shared key" in str(server_err.value)
        _assert_usable(listener, TcpAuth(key=KEY))


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 100_000],
    ids=["http", "a flood of zeros"],
)
def test_a_peer_speaking_something_else_is_refused_with_a_marker(garbage: bytes) -> None:
    with _loopback(TcpAuth(key=KEY)) as listener:
        accepting = Background(listener.accept, 30)
        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            raw.sendall(garbage[:4096])
            with pytest.raises(PeerRejected, match="does not speak") as err:
                accepting.join()
            assert err.value.phase == "auth"
            assert _read_to_eof(raw) == REFUSED
        _assert_usable(listener, TcpAuth(key=KEY))


def test_a_silent_peer_is_refused_at_the_deadline() -> None:
    auth = TcpAuth(key=KEY, timeout=0.3)
    with _loopback(auth) as listener:
        accepting = Background(listener.accept, 30)
        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            with pytest.raises(PeerRejected, match=r"did not authenticate within 0\.3 s"):
                accepting.join()
            assert _read_to_eof(raw) == REFUSED
        _assert_usable(listener, auth)


def test_a_peer_that_stops_mid_message_is_refused() -> None:
    with _loopback(TcpAuth(key=KEY)) as listener:
        accepting = Background(listener.accept, 30)
        with socket.create_connection(("127.0.0.1", listener.port)) as raw:
            raw.sendall(b"PFA1-HC\n" + b"12345")
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(PeerRejected, match="in the middle of a message"):
                accepting.join()
        _assert_usable(listener, TcpAuth(key=KEY))


@contextlib.contextmanager
def fake_listener(script: Callable[[socket.socket], Any]) -> Iterator[tuple[int, Background]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> Any:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            return script(conn)

    try:
        job = Background(serve)
        yield server.getsockname()[1], job
        job.join()
    finally:
        server.close()


def _exactly(conn: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = conn.recv(size - len(out))
        assert chunk
        out += chunk
    return out


def test_the_connector_refuses_a_listener_that_does_not_know_the_key() -> None:
    """Mutual: a listener that cannot prove the key is refused even though it took ours."""
    seen: list[bytes] = []

    def impostor(conn: socket.socket) -> None:
        _exactly(conn, 40)
        conn.sendall(b"PFA1-HS\n" + os.urandom(32))
        _exactly(conn, 40)
        conn.sendall(b"PFA1-PF\n" + os.urandom(32))
        seen.append(_read_to_eof(conn))

    with fake_listener(impostor) as (port, job):
        with pytest.raises(PeerRejected, match="does not know the shared key") as err:
            TcpConnection.connect("127.0.0.1", port, 10, auth=TcpAuth(key=KEY))
        assert err.value.phase == "auth"
        job.join()
    assert seen == [REFUSED]


def test_a_reflected_proof_fails() -> None:
    """An impostor that sends our nonce and our own proof back cannot pass as the listener."""

    def mirror(conn: socket.socket) -> None:
        hello = _exactly(conn, 40)
        conn.sendall(b"PFA1-HS\n" + hello[8:])
        proof = _exactly(conn, 40)
        conn.sendall(proof)
        _read_to_eof(conn)

    with (
        fake_listener(mirror) as (port, _job),
        pytest.raises(PeerRejected, match="does not know the shared key"),
    ):
        TcpConnection.connect("127.0.0.1", port, 10, auth=TcpAuth(key=KEY))


def test_a_silent_listener_times_the_connector_out() -> None:
    with fake_listener(_read_to_eof) as (port, _job):
        with pytest.raises(PeerTimeout, match=r"within 0\.3 s") as err:
            TcpConnection.connect("127.0.0.1", port, None, auth=TcpAuth(key=KEY, timeout=0.3))
        assert err.value.phase == "auth"


def test_a_key_connector_learns_that_the_listener_asks_for_no_key() -> None:
    with _loopback(None) as listener:
        accepting = Background(listener.accept, 30)
        connecting = Background(_connect, listener, TcpAuth(key=KEY))
        server = accepting.join()
        try:
            assert server.auth_mode == "loopback"
            # The listener's caller gets our hello as its first bytes, and hangs up.
            assert _recv_all(server, 40)[:8] == b"PFA1-HC\n"
        finally:
            server.close()
        with pytest.raises(PeerRejected, match="same --key-file"):
            connecting.join()


# -- the loopback default and --insecure ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("localhost.example.com", False),
        ("127.0.0.1.example.com", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_needs_authentication_or_insecure() -> None:
    with pytest.raises(PeerRejected) as err:
        TcpListener("0.0.0.0", 0)
    message = str(err.value)
    for option in ("--key-file", "--tls-cert", "--tls-key", "--tls-ca", "--insecure"):
        assert option in message
    assert err.value.phase == "listen on"
    with Address.parse("tcp:0.0.0.0:0").listen(auth=TcpAuth(insecure=True)) as listener:
        assert isinstance(listener, TcpListener)
        assert listener.port != 0 and listener.path == f"tcp:0.0.0.0:{listener.port}"
        server, client = _pair(listener, None)  # we connect over loopback: nothing asked
        try:
            assert server.auth_mode == "insecure" and client.auth_mode == "loopback"
            _exchange(server, client)
        finally:
            server.close()
            client.close()


def test_connecting_beyond_loopback_needs_authentication_or_insecure() -> None:
    # 192.0.2.0/24 is TEST-NET-1: refused before any packet is sent.
    with pytest.raises(PeerRejected, match="--insecure") as err:
        Address.parse("tcp:192.0.2.1:9").connect(1)
    assert err.value.phase == "connect to"


def test_loopback_without_authentication_is_the_default() -> None:
    with _loopback(None) as listener:
        assert listener.auth is None and listener.auth_mode == "loopback"
        _assert_usable(listener, None)


# -- the port really bound -------------------------------------------------------------------


def test_port_zero_reports_the_port_really_bound() -> None:
    listener = Address.parse("tcp:127.0.0.1:0").listen()
    with listener:
        assert isinstance(listener, TcpListener)
        assert listener.port != 0
        assert listener.path == f"tcp:127.0.0.1:{listener.port}"
        assert str(listener.address) == listener.path
        assert Address.parse(listener.path) == listener.address
        _assert_usable(listener, None)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_addresses_are_written_with_brackets_and_parse_back() -> None:
    with Address.parse("tcp:[::1]:0").listen() as listener:
        assert isinstance(listener, TcpListener)
        assert listener.path == f"tcp:[::1]:{listener.port}"
        assert Address.parse(listener.path) == listener.address
        _assert_usable(listener, None)


# -- the settings ----------------------------------------------------------------------------


def _key_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "key"
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def test_a_key_file_gives_its_key_without_the_newline(tmp_path: Path) -> None:
    auth = TcpAuth.from_key_file(_key_file(tmp_path, KEY + b"\n", 0o640))
    assert auth.key == KEY and auth.mode == "key"
    assert "0123" not in repr(auth)  # the secret stays out of logs


@pytest.mark.parametrize(
    ("data", "mode", "fix"),
    [
        (b"", 0o600, "is empty: make one with"),
        (b"\n\n", 0o600, "is empty: make one with"),
        (b"short\n", 0o600, "needs at least 16: make one with"),
        (KEY, 0o644, "run chmod 600"),
        (KEY, 0o602, "run chmod 600"),
        (b"x" * 5000, 0o600, "is it a key file?"),
    ],
    ids=["empty", "newlines only", "too short", "world-readable", "world-writable", "huge"],
)
def test_a_bad_key_file_is_refused_saying_what_to_fix(
    tmp_path: Path, data: bytes, mode: int, fix: str
) -> None:
    path = _key_file(tmp_path, data, mode)
    with pytest.raises(SpanError, match=fix) as err:
        TcpAuth.from_key_file(path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpanError, match="No such file"):
        TcpAuth.from_key_file(str(tmp_path / "nothing"))


def test_exactly_one_way_to_authenticate() -> None:
    with pytest.raises(SpanError, match="given: none"):
        TcpAuth()
    with pytest.raises(SpanError, match="given: key and insecure"):
        TcpAuth(key=KEY, insecure=True)
    with pytest.raises(SpanError, match="at least 16 bytes"):
        TcpAuth(key=b"pw")
    assert TcpAuth.from_options() is None
    assert TcpAuth.from_options(insecure=True) == TcpAuth(insecure=True)
    with pytest.raises(SpanError, match="--key-file and --insecure exclude each other"):
        TcpAuth.from_options(key_file="k", insecure=True)
    with pytest.raises(SpanError, match="both --tls-cert and --tls-key"):
        TcpAuth.from_options(tls_cert="c.pem", tls_ca="ca.pem")


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    stranger_cert: str  # a client certificate signed by the other CA
    stranger_key: str

    def listener(self, timeout: float = 10.0) -> TcpAuth:
        files = TlsFiles(cert=self.server_cert, key=self.server_key, ca=self.ca)
        return TcpAuth(tls=files, timeout=timeout)

    def client(self, **change: str | None) -> TcpAuth:
        fields: dict[str, str | None] = {
            "cert": self.client_cert,
            "key": self.client_key,
            "ca": self.ca,
        }
        fields.update(change)
        return TcpAuth(tls=TlsFiles(**fields))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, usage: str, san: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        f"subjectAltName={san}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name,
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with a server and a client certificate, and a second, unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    _make_leaf(d, "client", "ca", "clientAuth", "DNS:source.test")
    _make_leaf(d, "stranger", "other-ca", "clientAuth", "DNS:stranger.test")

    def p(name: str) -> str:
        return str(d / name)

    return Pki(
        ca=p("ca.pem"),
        server_cert=p("server.pem"),
        server_key=p("server.key"),
        client_cert=p("client.pem"),
        client_key=p("client.key"),
        other_ca=p("other-ca.pem"),
        stranger_cert=p("stranger.pem"),
        stranger_key=p("stranger.key"),
    )


def test_mutual_tls_carries_data_both_ways(pki: Pki) -> None:
    with _loopback(pki.listener()) as listener:
        server, client = _pair(listener, pki.client())
        try:
            assert server.auth_mode == client.auth_mode == "tls"
            _exchange(server, client)
            big = os.urandom(1 << 20)  # many TLS records
            sending = Background(client.send, big, None, "test")
            assert _recv_all(server, len(big)) == big
            sending.join()
            client.close()
            assert server.wait_readable(30)
            assert server.recv() == (b"", [])  # EOF, and it stays EOF
            assert server.wait_readable(0) and server.recv() == (b"", [])
        finally:
            server.close()
            client.close()


def test_tls_readiness_counts_bytes_already_decrypted(pki: Pki) -> None:
    """A record read in part leaves bytes in the SSL object while the socket is not
    readable: wait_readable must still say yes, and no when nothing is left."""
    with _loopback(pki.listener()) as listener:
        server, client = _pair(listener, pki.client())
        try:
            assert not server.wait_readable(0)  # no stray session tickets or such
            client.send(b"a" * 100, phase="test")
            assert server.recv(10)[0] == b"a" * 10  # a blocking read takes the whole record
            assert server.wait_readable(0)  # 90 bytes wait in the SSL object
            assert server.recv(1000)[0] == b"a" * 90
            assert not server.wait_readable(0)
            client.send(b"b" * 100, phase="test")
            assert server.wait_readable(30)  # this one reads ahead
            assert server.recv(10)[0] == b"b" * 10
            assert server.wait_readable(0)
            assert server.recv(1000)[0] == b"b" * 90
            assert not server.wait_readable(0)
        finally:
            server.close()
            client.close()


@pytest.mark.parametrize(
    ("change", "client_says"),
    [
        ({"ca": "other_ca"}, "certificate verify failed"),
        ({"cert": None, "key": None}, "certificate required"),
        ({"cert": "stranger_cert", "key": "stranger_key"}, "unknown ca"),
        ({"server_name": "elsewhere.test"}, "certificate verify failed"),
    ],
    ids=[
        "client trusts another CA",
        "client has no certificate",
        "client certificate from another CA",
        "listener certificate names another host",
    ],
)
def test_tls_refusals_reach_both_sides_and_the_listener_lives_on(
    pki: Pki, change: dict[str, str | None], client_says: str
) -> None:
    resolved = {k: (getattr(pki, v) if v in ("other_ca", "stranger_cert", "stranger_key") else v)
                for k, v in change.items()}  # fmt: skip
    with _loopback(pki.listener()) as listener:
        accepting = Background(listener.accept, 30)
        with pytest.raises(PeerRejected, match=client_says) as client_err:
            _connect(listener, pki.client(**resolved))
        with pytest.raises(PeerRejected, match="TLS handshake failed") as server_err:
            accepting.join()
        assert client_err.value.phase == server_err.value.phase == "tls"
        _assert_usable(listener, pki.client())


def test_a_key_connector_is_refused_by_a_tls_listener(pki: Pki) -> None:
    with _loopback(pki.listener()) as listener:
        accepting = Background(listener.accept, 30)
        with pytest.raises(PeerRejected, match="same --key-file"):
            _connect(listener, TcpAuth(key=KEY))
        with pytest.raises(PeerRejected, match="TLS handshake failed"):
            accepting.join()
        _assert_usable(listener, pki.client())


def test_a_silent_peer_cannot_hold_a_tls_listener(pki: Pki) -> None:
    with _loopback(pki.listener(timeout=0.3)) as listener:
        accepting = Background(listener.accept, 30)
        with (
            socket.create_connection(("127.0.0.1", listener.port)),
            pytest.raises(PeerRejected, match=r"within 0\.3 s"),
        ):
            accepting.join()
        _assert_usable(listener, pki.client())


def test_a_tls_listener_must_verify_its_clients(pki: Pki) -> None:
    no_ca = TcpAuth(tls=TlsFiles(cert=pki.server_cert, key=pki.server_key))
    with pytest.raises(SpanError, match="give --tls-ca"):
        TcpListener("127.0.0.1", 0, auth=no_ca)
    with pytest.raises(SpanError, match="give --tls-cert and --tls-key"):
        TcpListener("127.0.0.1", 0, auth=TcpAuth(tls=TlsFiles(ca=pki.ca)))


def test_unreadable_tls_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    bad = TcpAuth(tls=TlsFiles(cert=missing, key=pki.server_key, ca=pki.ca))
    with pytest.raises(SpanError, match=f"TLS certificate {missing}"):
        TcpListener("127.0.0.1", 0, auth=bad)
    with pytest.raises(SpanError, match=f"TLS CA file {missing}"):
        TcpConnection.connect("127.0.0.1", 9, 1, auth=TcpAuth(tls=TlsFiles(ca=missing)))
