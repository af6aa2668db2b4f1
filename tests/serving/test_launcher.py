"""The server launcher's checks that need no server (tests/serving/test_server.py starts real ones)."""

import sys

import pytest

from ertacache.errors import UserError
from ertacache.serving.server import PythonEnv, ServerConfig, TritonDistribution, free_port


def test_server_config_refusals(tmp_path):
    with pytest.raises(UserError, match="is not a folder; write one with ertacache-triton"):
        ServerConfig(repo=tmp_path / "none")
    with pytest.raises(UserError, match="need explicit model control"):
        ServerConfig(repo=tmp_path, load_models=("a",))
    with pytest.raises(UserError, match="--http-port 70000 is not a TCP port"):
        ServerConfig(repo=tmp_path, http_port=70000)
    assert ServerConfig(repo=tmp_path, explicit=True, load_models=("a",)).repo.is_absolute()


def test_python_env_names_its_shared_libpython():
    """What the stub needs: the interpreter's version and the folder of its libpython3.X.so.1.0."""
    env = PythonEnv.of(sys.executable)
    assert env.version == "%d.%d" % sys.version_info[:2]
    assert (env.libdir / env.soname).exists(), "LD_LIBRARY_PATH must name this folder for the stub"
    assert env.site_packages
    with pytest.raises(UserError, match="cannot be run"):
        PythonEnv.of("/nonexistent/python3")


def test_distribution_refusals(tmp_path):
    with pytest.raises(UserError, match="--tritonserver .* does not exist"):
        TritonDistribution.find(tmp_path / "tritonserver")
    dist = TritonDistribution(tmp_path / "tritonserver", stubs=tmp_path)
    (tmp_path / "3.11").mkdir()
    with pytest.raises(UserError, match=r"stubs for Python \['3.11'\], not 2.7"):
        dist.stub("2.7")


def test_free_port_is_free():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing else holds it


def test_log_dir_keeps_the_server_log_after_stop(tmp_path):
    """--log-dir: the log is written there and stays when the server (here a stand-in that exits) is gone."""
    from ertacache.serving.server import ServerError, TritonServer

    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\necho \"stand-in server: $1\"\nexit 3\n")
    fake.chmod(0o755)
    (tmp_path / "repo").mkdir()
    server = TritonServer(ServerConfig(repo=tmp_path / "repo", tritonserver=fake, startup_timeout_s=30),
                          log_dir=tmp_path / "logs")
    assert server.log_path == tmp_path / "logs" / "server.log"
    with pytest.raises(ServerError, match="stand-in server"):
        server.start()
    server.close()
    assert not server.workdir.exists()  # the temporary folder goes ...
    assert "stand-in server: --model-repository=" in (tmp_path / "logs" / "server.log").read_text()  # ... the log stays
