"""A bad launcher environment (RANK, WORLD_SIZE, MASTER_PORT, DS_ACCELERATOR, ...) is one error line
naming the variable, found before anything reads it: torch and DeepSpeed read them with bare ``int()``
(tracebacks), and a rank outside the world or an unresolvable MASTER_ADDR waited out the whole
rendezvous timeout (10 minutes by default)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.runtime.distributed import LaunchError, check_launch_environment
from tests.launch_helpers import REPO, child_env

_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
LAUNCH = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


@pytest.fixture
def env(monkeypatch):
    """Set the launch variables of this test only (the session's runtime fixture set its own)."""
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_


def test_no_launcher_is_a_world_of_one_and_a_launch_is_read(env):
    assert check_launch_environment() == (0, 1)
    env(**{**LAUNCH, "RANK": "1", "LOCAL_RANK": "1"}, DS_ACCELERATOR="cpu")
    assert check_launch_environment() == (1, 2)


@pytest.mark.parametrize("values, says", [
    # Each was a ValueError traceback (from pretrain.main, torch's rendezvous or DeepSpeed's engine).
    ({"RANK": "abc"}, "RANK: not a whole number ('abc')"),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE: not a whole number ('x')"),
    ({"LOCAL_RANK": "abc"}, "LOCAL_RANK: not a whole number ('abc')"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT: not a whole number ('abc')"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT: 70000 is not a port number (1 .. 65535)"),
    # No other rank can find rank 0's port 0: they waited out the rendezvous timeout.
    ({"MASTER_PORT": "0"}, "MASTER_PORT: 0 is not a port number (1 .. 65535)"),
    # Each waited out the rendezvous timeout for a world that could never gather.
    ({"RANK": "-1"}, "RANK: must be at least 0, got -1"),
    ({"RANK": "2"}, "RANK: 2 is not below WORLD_SIZE=2 (ranks are 0 .. 1)"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK: must be at least 0, got -1"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK: 2 is not below WORLD_SIZE=2"),
    # Was "parallel.tensor_parallel: ... must divide the world size 0".
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE: must be at least 1, got 0"),
])
def test_a_bad_launch_variable_is_named(env, values, says):
    env(**{**LAUNCH, **values})
    with pytest.raises(LaunchError) as err:
        check_launch_environment()
    assert str(err.value).startswith(says + "; "), err.value
    assert err.value.all_ranks is False  # rank-local: the process that has it says it


@pytest.mark.parametrize("values, says", [
    # Rank 0 of a world of 2 was filled in and waited for ranks that were never started.
    ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: not set, but WORLD_SIZE is; "),
    # DeepSpeed went looking for MPI: ModuleNotFoundError: No module named 'mpi4py'.
    ({"RANK": "0", "WORLD_SIZE": "1"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT: not set, but RANK, WORLD_SIZE are; "),
])
def test_a_half_copied_launch_names_what_is_missing(env, values, says):
    env(**values)
    with pytest.raises(LaunchError, match="^" + says):
        check_launch_environment()


def test_a_world_of_one_may_take_any_free_port(env):
    env(MASTER_PORT="0")
    assert check_launch_environment() == (0, 1)
    env(MASTER_PORT="65536")
    with pytest.raises(LaunchError, match="^MASTER_PORT: 65536 is not a port number"):
        check_launch_environment()


def test_an_unresolvable_master_addr_fails_at_once(env):
    # torch retried it (a warning every few seconds) until the rendezvous timed out.
    env(**{**LAUNCH, "MASTER_ADDR": "no-such-host.invalid"})
    with pytest.raises(LaunchError, match=r"^MASTER_ADDR: cannot resolve 'no-such-host.invalid' \(.+\); give"):
        check_launch_environment()


@pytest.mark.parametrize("value, says", [
    ("garbage", "DS_ACCELERATOR: 'garbage' is not cpu or cuda"),  # DeepSpeed's ValueError at import
    ("cuda", "DS_ACCELERATOR: cuda, but torch sees no CUDA device here"),  # "Torch not compiled with CUDA"
])
def test_a_wrong_accelerator_is_named(env, monkeypatch, value, says):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env(DS_ACCELERATOR=value)
    with pytest.raises(LaunchError, match="^" + says):
        check_launch_environment()


def test_main_says_a_bad_launch_in_one_line_before_the_rendezvous(tmp_path):
    """A rank outside its world: one line and exit 2 at once, not a 10-minute wait in the rendezvous."""
    env = child_env(**{**LAUNCH, "RANK": "5"})
    proc = subprocess.run([sys.executable, "-m", "pretrain.main", "--recipe", "recipes/tiny_cpu.yaml", "--steps", "1",
                           "--set", f"train.output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: RANK: 5 is not below WORLD_SIZE=2 (ranks are 0 .. 1); set them as a "
                                  "launcher does"), proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "recipe.yaml").exists()



@pytest.mark.parametrize("kind, message, says", [
    # torch's messages for a rank that never started, as rank 0 (hosting the store) and as another rank
    # see it, and for a MASTER_PORT another process holds: each was a traceback (the last must not
    # read as a timeout).
    ("DistStoreError", "Timed out after 61 seconds waiting for clients. 1/2 clients joined.",
     "rendezvous at 127.0.0.1:29500: the WORLD_SIZE=2 processes did not all meet within 1 minute(s) (Timed out "
     "after 61 seconds waiting for clients. 1/2 clients joined.); start every rank, all with the same MASTER_ADDR "
     "and MASTER_PORT"),
    ("DistNetworkError", "The client socket has timed out after 60000ms while trying to connect to (127.0.0.1, "
                         "29500).\nException raised from throwTimeoutError at socket.cpp:1030",
     "rendezvous at 127.0.0.1:29500: the WORLD_SIZE=2 processes did not all meet within 1 minute(s) (The client "
     "socket has timed out after 60000ms while trying to connect to (127.0.0.1, 29500).); start every rank, all "
     "with the same MASTER_ADDR and MASTER_PORT"),
    ("DistNetworkError", "The server socket has failed to listen on any local network address. port: 29500, "
                         "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use",
     "MASTER_PORT: 29500 is in use on this machine (The server socket has failed to listen on any local network "
     "address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use); pick a "
     "free port, or launch with torchrun --standalone, which picks one"),
])
def test_a_failed_rendezvous_is_one_line_naming_its_cause(env, monkeypatch, kind, message, says):
    """The rendezvous gives up after init_runtime's timeout_minutes (train.collective_timeout_minutes,
    10 by default): a rank that never starts ends the others with this line, not a traceback."""
    import deepspeed
    import torch

    from pretrain.runtime import distributed

    env(**LAUNCH)

    def init_distributed(**kwargs):
        assert kwargs["timeout"].total_seconds() == 60  # the bound is the timeout init_runtime is given
        raise getattr(torch.distributed, kind)(message)

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "skip_cpu_shm_op", lambda: None)
    with pytest.raises(LaunchError) as err:
        distributed.init_runtime(timeout_minutes=1)
    assert str(err.value) == says


def test_a_temporary_dns_failure_is_left_to_torchs_retries(monkeypatch):
    """EAI_AGAIN (the resolver did not answer in time) is no proof that the name is wrong: refusing
    it with exit 2 would end a batch job that SLURM never requeues for a configuration error."""
    import socket

    from pretrain.runtime import distributed

    def flaky(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "head-node",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.socket, "getaddrinfo", flaky)
    assert distributed.check_launch_environment() == (0, 1)


def test_init_runtime_checks_a_checked_launch_only_when_it_changed(env, monkeypatch):
    """pretrain.main checks the launch before DeepSpeed is imported, and init_runtime again (tests and
    the samplers call it directly): values unchanged since a good check are not looked up twice."""
    import socket

    from pretrain.runtime import distributed

    lookups = []

    def counting(host, *args, **kwargs):
        lookups.append(host)
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(distributed.socket, "getaddrinfo", counting)
    env(**{**LAUNCH, "WORLD_SIZE": "1"}, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".no-such-dir"))
    assert check_launch_environment() == (0, 1)
    distributed._prepare_environment()
    assert lookups == ["127.0.0.1"]
    # Changed since: checked again, and a bad value is still refused.
    env(MASTER_ADDR="no-such-host.invalid")
    with pytest.raises(LaunchError, match="^MASTER_ADDR: cannot resolve 'no-such-host.invalid'"):
        distributed._prepare_environment()
    assert lookups == ["127.0.0.1", "no-such-host.invalid"]
