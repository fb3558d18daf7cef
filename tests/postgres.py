"""A real PostgreSQL server for tests, on loopback, in a temporary folder.

    with PostgresServer() as pg:               # initdb + pg_ctl start (~2 s)
        url = pg.create_database("t1")          # postgresql+psycopg://…/t1

Debian's postgresql package (installed by scripts/install) keeps its programs in
/usr/lib/postgresql/<version>/bin. PostgreSQL refuses to run as root, so when the tests run as
root the server runs as the `postgres` system user (created by the package), or `nobody`, from
a temporary folder handed to that user. Trust authentication on 127.0.0.1 only: a throwaway
server that lives as long as the test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "run `bash scripts/install` (it installs Debian's postgresql)"


def pg_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder, or a folder on PATH holding initdb."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """initdb into a temp folder, start on a free loopback port; stop and delete on exit."""

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError(f"PostgreSQL's initdb was not found; {INSTALL_HINT}")
        self.bin = bin_dir
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    continue
                self.user = name
                break
        self.root = Path(tempfile.mkdtemp(prefix="evertune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    # -- processes, as the server's user ------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {"user": self.user} if self.user else {}
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, check=check, cwd=self.root, **kwargs)

    def start(self) -> PostgresServer:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.root} -c fsync=off "
                   "-c max_connections=200")
        done = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                         "-l", str(self.log), "-o", options, check=False)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"postgres did not start: {done.stderr}\n{log}")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data), check=False)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down `down_s` seconds, start the same data folder again (a
        database outage and its recovery)."""
        self._run("pg_ctl", "stop", "-m", "fast", "-D", str(self.data), check=False)
        time.sleep(down_s)
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.root} -c fsync=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log),
                  "-o", options)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
