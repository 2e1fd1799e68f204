"""SSH transport against real sshd lab hosts: quoting, host keys, retries, ProxyJump, agent."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import uuid

import pytest
import yaml

from controller import agent_bundle, paths, ssh
from controller.errors import CubeError, HostUnreachable
from controller.hosts import resolve_host
from controller.target import Target
from controller.transport import ConnectionLost, connect
from tests.conftest import require

pytestmark = pytest.mark.integration


def attempts(caplog) -> int:
    return sum("attempt" in r.getMessage() and r.getMessage().startswith("connecting")
               for r in caplog.records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_passes_hostile_args_verbatim(lab_home, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [f"$(touch {marker})", f"`touch {marker}`", "a b  c", "it's", 'say "hi"', "",
               "*", "; rm -rf /nope", "\\n", "tab\there", "ünï"]
    with connect("lab1") as conn:
        result = conn.run(["printf", r"%s\0", *hostile])
    assert result.stdout.split("\0")[:-1] == hostile
    assert not marker.exists()


def test_run_exit_codes_input_and_sh(lab_home):
    data = os.urandom(3 * 1024 * 1024)
    with connect("lab1") as conn:
        assert conn.run(["sh", "-c", "echo oops >&2; exit 7"], check=False).code == 7
        with pytest.raises(CubeError) as err:
            conn.run(["sh", "-c", "echo the-reason >&2; exit 5"])
        assert "exited with code 5" in str(err.value) and "the-reason" in str(err.value)
        echoed = conn.run(["sha256sum"], input=data).stdout.split()[0]
        assert echoed == hashlib.sha256(data).hexdigest()
        r = conn.sh("x=$((6*7)); echo $x; echo err >&2; exit 3")
        assert (r.code, r.stdout, r.stderr) == (3, "42\n", "err\n")
        assert conn.is_alive(probe_timeout=5)


def test_timeouts(lab_home):
    with connect("lab1") as conn:
        with pytest.raises(CubeError, match="did not finish within 0.5 s"):
            conn.run(["sleep", "30"], timeout=0.5)
        r = conn.sh("sleep 30", timeout=0.5)  # executor protocol: code 124, no exception
        assert r.code == 124 and "timed out after 0.5 s" in r.stderr
        assert "timed out" in r.output  # provision's ExecResult
        assert conn.run(["echo", "still usable"]).stdout == "still usable\n"


def test_sh_and_run_time_out_the_same_way(lab_home):
    with connect("lab1") as conn:
        ran = conn.run(["sh", "-c", "echo partial; sleep 30"], timeout=1, check=False)
        shelled = conn.sh("echo partial; sleep 30", timeout=1)
        for r in (ran, shelled):
            assert (r.code, r.stdout, r.timed_out) == (124, "partial\n", True)
            assert "timed out after 1 s" in r.stderr
        assert not conn.run(["sh", "-c", "exit 124"], check=False).timed_out


def test_a_host_is_a_target_named_for_messages(lab_home):
    with connect("lab1") as conn:
        assert isinstance(conn, Target) and conn.name == "host 'lab1'"
        conn.put(b"put via sftp\n", f"{conn.root}/put-test.txt", mode=0o600)
        assert conn.run(["cat", f"{conn.root}/put-test.txt"]).stdout == "put via sftp\n"
        assert conn.run(["stat", "-c", "%a", f"{conn.root}/put-test.txt"]).stdout == "600\n"
        stream = conn.open_stream(["sh", "-c", "cat > \"$0\"; echo done >&2",
                                   f"{conn.root}/stream-test.txt"])
        stream.write(b"streamed")
        stream.close_stdin()
        assert stream.wait() == 0 and stream.stderr_text() == "done\n"
        stream.close()
        assert conn.run(["cat", f"{conn.root}/stream-test.txt"]).stdout == "streamed"


def test_unknown_host_key_is_refused_with_fix(lab, cube_home):
    shutil.copy(lab.inventory, cube_home / "hosts.yaml")  # inventory but no known_hosts
    with pytest.raises(CubeError) as err:
        connect("lab1")
    assert not isinstance(err.value, HostUnreachable)
    msg = str(err.value)
    assert "lab1" in msg and "not known" in msg and "--accept-new-host-key" in msg
    assert not paths.known_hosts_file().exists()


def test_accept_new_stores_key_and_next_connect_needs_no_flag(lab, cube_home):
    shutil.copy(lab.inventory, cube_home / "hosts.yaml")
    with connect("lab2", accept_new_host_key=True) as conn:
        assert conn.run(["true"]).code == 0
    stored = paths.known_hosts_file().read_text().split()
    host = lab.host("lab2")
    pub = (host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    expected_name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    assert stored == [expected_name, *pub]
    with connect("lab2") as conn:
        assert conn.run(["echo", "ok"]).stdout == "ok\n"


def test_changed_host_key_is_always_an_error(lab, cube_home):
    shutil.copy(lab.inventory, cube_home / "hosts.yaml")
    lab1, lab2 = lab.host("lab1"), lab.host("lab2")
    wrong = (lab2.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    name = lab1.address if lab1.port == 22 else f"[{lab1.address}]:{lab1.port}"
    paths.known_hosts_file().write_text(f"{name} {wrong[0]} {wrong[1]}\n")
    for accept in (False, True):
        with pytest.raises(CubeError) as err:
            connect("lab1", accept_new_host_key=accept)
        assert "CHANGED" in str(err.value) and "lab1" in str(err.value)
    assert paths.known_hosts_file().read_text().count("\n") == 1  # nothing was added


def test_cube_known_hosts_wins_and_bad_lines_are_skipped(lab_home, tmp_path, monkeypatch):
    """A stale ~/.ssh/known_hosts line for the same address (an old lab) does not block cube's
    own, current entry; an unparsable line is skipped like OpenSSH does."""
    lab1, lab2 = lab_home.host("lab1"), lab_home.host("lab2")
    name = lab1.address if lab1.port == 22 else f"[{lab1.address}]:{lab1.port}"
    stale = (lab2.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "known_hosts").write_text(f"{name} {stale[0]} {stale[1]}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    kh = paths.known_hosts_file()
    kh.write_text("garbage ssh-ed25519 !!notbase64!!\n" + kh.read_text())
    with connect("lab1") as conn:
        assert conn.run(["true"]).code == 0


@pytest.mark.parametrize("kind", ["unknown key", "garbage key file"])
def test_auth_failure_is_not_retried(lab_home, tmp_path, caplog, kind):
    key = tmp_path / "stranger"
    if kind == "unknown key":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    else:
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    spec = resolve_host("lab1")
    spec.identity_files = [str(key)]
    with caplog.at_level(logging.DEBUG, logger="cube.transport"):
        with pytest.raises(CubeError) as err:
            connect(spec, retries=5)
    assert not isinstance(err.value, HostUnreachable)
    assert "Authentication" in str(err.value) and str(key) in err.value.hint
    assert attempts(caplog) == 1


def test_missing_identity_file_is_named(lab_home, tmp_path):
    spec = resolve_host("lab1")
    spec.identity_files = [str(tmp_path / "nope")]
    with pytest.raises(CubeError, match="identity file .*nope.* does not exist"):
        connect(spec)


def test_closed_port_is_unreachable_after_retries(lab_home, caplog):
    spec = resolve_host("lab1")
    spec.hostname, spec.port = "127.0.0.1", free_port()
    with caplog.at_level(logging.DEBUG, logger="cube.transport"):
        with pytest.raises(HostUnreachable) as err:
            connect(spec, connect_timeout=2, retries=3)
    assert err.value.exit_code == 3 and "lab1" in str(err.value)
    assert attempts(caplog) == 3


def test_unresolvable_name_fails_at_once(lab_home, caplog):
    spec = resolve_host("lab1")
    spec.hostname = "no-such-host.invalid"
    with caplog.at_level(logging.DEBUG, logger="cube.transport"):
        with pytest.raises(HostUnreachable) as err:
            connect(spec, connect_timeout=5, retries=5)
    assert "resolve" in str(err.value) and err.value.exit_code == 3
    assert attempts(caplog) == 1  # a bad name does not get better by retrying


def test_cut_link_is_unreachable(lab_home):
    require(lab_home.netns, "cutting a link needs the lab in network namespaces (root)")
    lab_home.cut_link("lab2")
    try:
        with pytest.raises(HostUnreachable) as err:
            connect("lab2", connect_timeout=2)
        assert err.value.exit_code == 3 and "timed out" in str(err.value)  # silent drop
    finally:
        lab_home.restore_link("lab2")
    with connect("lab2") as conn:  # and back once the link is restored
        assert conn.run(["true"]).code == 0


def test_cut_link_under_a_running_command_is_detected(lab_home, monkeypatch):
    """Keepalives + TCP_USER_TIMEOUT turn a silent link cut into ConnectionLost (not a hang)."""
    require(lab_home.netns, "cutting a link needs the lab in network namespaces (root)")
    monkeypatch.setattr(ssh, "KEEPALIVE_S", 1)
    monkeypatch.setattr(ssh, "TCP_USER_TIMEOUT_MS", 2000)
    with connect("lab2") as conn:
        timer = threading.Timer(0.5, lab_home.cut_link, ["lab2"])
        timer.start()
        try:
            with pytest.raises(ConnectionLost):
                conn.run(["sleep", "120"])
            assert not conn.is_alive()
        finally:
            timer.join()
            lab_home.restore_link("lab2")
        conn.reconnect()
        assert conn.run(["echo", "back"]).stdout == "back\n"


def test_dropped_session_raises_connection_lost_then_reconnects(lab_home):
    with connect("lab2") as conn:
        assert conn.run(["true"]).code == 0
        assert lab_home.kill_ssh_sessions("lab2") >= 1
        with pytest.raises(ConnectionLost):
            conn.run(["sleep", "5"])
        assert not conn.is_alive()
        conn.reconnect()
        assert conn.run(["echo", "back"]).stdout == "back\n"


def test_proxy_jump_through_lab1(lab_home):
    spec = resolve_host("lab2")
    spec.proxy_jump = "lab1"
    with connect(spec) as conn:
        client_ip = conn.run(["sh", "-c", 'echo "$SSH_CONNECTION"']).stdout.split()[0]
        assert conn.ssh.jump is not None and conn.ssh.jump.spec.name == "lab1"
    if lab_home.netns:  # lab2 saw the connection come from lab1's own address
        assert client_ip == lab_home.host("lab1").address


def test_proxy_jump_names_resolve_in_the_same_inventory(lab, tmp_path):
    """With --inventory FILE, the jump host's name is looked up in FILE too (not ~/.cube)."""
    inv = yaml.safe_load(lab.inventory.read_text())
    inv["hosts"] = {"jump": inv["hosts"]["lab1"], "target": {**inv["hosts"]["lab2"],
                                                          "proxy_jump": "jump"}}
    inv.pop("groups", None)  # the lab's groups name lab1 and lab2, which this file renames
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    shutil.copy(lab.known_hosts, paths.known_hosts_file())
    with connect(resolve_host("target", inventory=path)) as conn:
        assert conn.ssh.jump.spec.name == "jump" and conn.run(["true"]).code == 0


def test_ssh_config_host_with_proxy_jump(lab_home, tmp_path, monkeypatch):
    """Names only ~/.ssh/config knows: HostName, User, Port, IdentityFile and ProxyJump."""
    h1, h2 = resolve_host("lab1"), resolve_host("lab2")
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(f"""
Host bastion-x
    HostName {h1.hostname}
    Port {h1.port}
    User {h1.user}
    IdentityFile {h1.identity_files[0]}
Host gpu-x
    HostName {h2.hostname}
    Port {h2.port}
    User {h2.user}
    IdentityFile {h2.identity_files[0]}
    ProxyJump bastion-x
""")
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = resolve_host("gpu-x")
    assert (spec.hostname, spec.proxy_jump) == (h2.hostname, "bastion-x")
    with connect(spec) as conn:
        assert conn.ssh.jump.spec.hostname == h1.hostname
        assert conn.run(["echo", "via bastion"]).stdout == "via bastion\n"


def test_root_tilde_is_expanded_remotely(lab_home):
    spec = resolve_host("lab1")
    spec.root = "~/cube-root"
    with connect(spec) as conn:
        home = conn.run(["sh", "-c", 'printf %s "$HOME"']).stdout
        assert conn.root == f"{home}/cube-root"


def test_agent_uploaded_once_by_hash(lab_home, tmp_path, monkeypatch):
    frozen = agent_bundle.build()  # the real agent, frozen while the test runs
    monkeypatch.setattr(agent_bundle, "bundle", lambda: frozen)
    spec = resolve_host("lab1")
    spec.root = f"{spec.root}/t-{uuid.uuid4().hex[:8]}"
    digest = hashlib.sha256(frozen.data).hexdigest()
    with connect(spec) as conn:
        path = conn.ensure_agent()
        assert conn.agent_uploaded
        assert path == f"{spec.root}/agent/{digest[:16]}.pyz"
        assert conn.run(["sha256sum", path]).stdout.split()[0] == digest
        assert conn.run(["python3", path, "--help"]).code == 0
        inode = conn.run(["stat", "-c", "%i", path]).stdout
    with connect(spec) as conn:
        assert conn.ensure_agent() == path and not conn.agent_uploaded
        assert conn.run(["stat", "-c", "%i", path]).stdout == inode
        # The archive and the folder its first start unpacked it to; no temp file left behind.
        assert conn.run(["ls", "-a", os.path.dirname(path)]).stdout.split() == \
            [".", "..", f"{digest[:16]}.pyz", f"{digest[:16]}.pyz.d"]


def test_the_zipapp_runs_on_the_host_in_an_isolated_interpreter(lab_home):
    """python3 -I -S: no site-packages, no PYTHON* variables, no script folder on sys.path."""
    spec = resolve_host("lab1")
    spec.root = f"{spec.root}/t-{uuid.uuid4().hex[:8]}"
    with connect(spec) as conn:
        path = conn.ensure_agent()
        assert path == f"{conn.root}/agent/{agent_bundle.bundle().digest}.pyz"
        proc = conn.run(["python3", "-I", "-S", path, "--root", conn.root, "probe"])
    answer = json.loads(proc.stdout)
    assert answer["ok"] is True and set(answer) == {"ok", "result"}
    probe = answer["result"]
    assert probe["root"] == conn.root and probe["agent_version"] >= 2
    assert probe["python"] and probe["running_jobs"] == []


def test_agent_errors_become_cube_errors(lab_home, tmp_path, monkeypatch):
    fake = tmp_path / "agent"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import json, sys\n"
        "def main():\n"
        "    root = sys.argv[2]\n"
        "    print(json.dumps({'ready': True, 'root': root, 'path': __file__}), flush=True)\n"
        "    for line in sys.stdin:\n"
        "        req = json.loads(line)\n"
        "        if req['verb'] == 'ok':\n"
        "            out = {'ok': True, 'result': {'args': req['args'], 'input': req['input']}}\n"
        "        elif req['verb'] == 'bad': print('not json', flush=True); continue\n"
        "        else: out = {'ok': False, 'error': 'boom happened', 'hint': 'do x'}\n"
        "        print(json.dumps(out), flush=True)\n")
    fake_bundle = agent_bundle.build(fake)
    monkeypatch.setattr(agent_bundle, "bundle", lambda: fake_bundle)
    spec = resolve_host("lab1")
    spec.root = f"{spec.root}/t-{uuid.uuid4().hex[:8]}"
    with connect(spec) as conn:
        assert conn.agent("ok", "a b", input=b"{}") == {"args": ["a b"], "input": "{}"}
        assert conn.root == spec.root
        with pytest.raises(CubeError) as err:
            conn.agent("fail")
        assert "boom happened" in str(err.value) and err.value.hint == "do x"
        with pytest.raises(CubeError, match="no JSON"):
            conn.agent("bad")
