"""`cube ui` without a browser: ZIP checks, git sources, the token guard and CSRF, output paths
that try to leave the workspace, and the Submit form's checks, through FastAPI's TestClient."""

from __future__ import annotations

import io
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from controller.errors import CubeError
from controller.jobs import Job, Ledger, new_job_id
from controller.ui import auth, gitsource, outputs, zipcheck
from controller.ui.zipcheck import ZipRejected
from tests.conftest import REPO

HELLO = REPO / "cubes" / "hello"
TOKEN = "unit-token-0123456789abcdef"


def zip_bytes(entries: dict[str, bytes], links: dict[str, str] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
    buf.seek(0)
    return buf


def client(token: str | None = None, cubes_dir: Path | None = None,
           base_url: str = "http://127.0.0.1:8080"):
    from fastapi.testclient import TestClient

    from controller.ui.app import create_app
    from controller.ui.context import UiSettings

    return TestClient(create_app(UiSettings(token=token, cubes_dir=cubes_dir)),
                      base_url=base_url, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


# ------------------------------------------------------------------------------ ZIP checks

@pytest.mark.parametrize("name", ["../x.py", "a/../../x.py", "/etc/passwd", "C:/x", "a\\b.py"])
def test_zip_paths_that_leave_the_folder_are_refused(name):
    with pytest.raises(ZipRejected, match="leaves the folder") as err:
        zipcheck.check_zip(zip_bytes({"mlcube.yaml": b"x", name: b"x"}))
    assert err.value.status == 400


def test_zip_links_are_refused():
    with pytest.raises(ZipRejected, match="symbolic link"):
        zipcheck.check_zip(zip_bytes({"mlcube.yaml": b"x"}, links={"evil": "/etc/passwd"}))


def test_zip_bombs_are_refused_by_size_and_by_count():
    with pytest.raises(ZipRejected, match="ZIP bomb") as err:
        zipcheck.check_zip(zip_bytes({"mlcube.yaml": b"x", "big": bytes(2048)}), max_total=1024)
    assert err.value.status == 413
    with pytest.raises(ZipRejected, match="entries"):
        zipcheck.check_zip(zip_bytes({f"f{i}": b"" for i in range(12)}), max_entries=10)


def test_a_zip_entry_larger_than_it_declared_stops_extraction(tmp_path):
    data = zip_bytes({"mlcube.yaml": b"x", "data.bin": bytes(4096)})
    plan = zipcheck.check_zip(data)
    next(i for i in plan.files if i.filename == "data.bin").file_size = 100  # a lying header
    with pytest.raises(ZipRejected, match="declared size|corrupt"):
        zipcheck.extract(data, plan, tmp_path / "cube")
    assert not (tmp_path / "cube").exists()


def test_a_zip_needs_mlcube_yaml_at_its_top_or_in_its_one_folder(tmp_path):
    with pytest.raises(ZipRejected, match="no mlcube.yaml") as err:
        zipcheck.check_zip(zip_bytes({"readme.txt": b"x"}))
    assert err.value.status == 422
    data = zip_bytes({"hello/mlcube.yaml": b"name: hello\n", "hello/run.py": b"print(1)\n"})
    plan = zipcheck.check_zip(data)
    assert plan.prefix == "hello/"
    dest = zipcheck.extract(data, plan, tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["mlcube.yaml", "run.py"]


def test_not_a_zip_is_a_clear_refusal():
    with pytest.raises(ZipRejected, match="not a readable ZIP"):
        zipcheck.check_zip(io.BytesIO(b"not a zip at all"))


# ----------------------------------------------------------------------------- git sources

@pytest.mark.parametrize("url", ["http://example.org/r.git", "git@github.com:a/b.git",
                                 "ext::sh -c touch% /tmp/pwned", "/srv/repo", "-uhelp"])
def test_only_https_ssh_and_file_urls_are_accepted(url, tmp_path):
    with pytest.raises(CubeError, match="not accepted"):
        gitsource.clone(url, tmp_path / "clone")
    assert not (tmp_path / "clone").exists()


def test_a_file_url_is_cloned_and_its_cube_staged(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-r", str(HELLO), str(repo)], check=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    for argv in (["init", "-q"], ["add", "."], ["commit", "-qm", "hello"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env)
    from controller.ui import sources

    staged, cube = sources.from_git(f"file://{repo}")
    assert (cube / "mlcube.yaml").is_file() and sources.staged_cube(staged) == cube
    with pytest.raises(CubeError, match="git clone of .* failed"):
        sources.from_git(f"file://{tmp_path}/missing")


def test_a_clone_that_hangs_is_stopped_by_its_timeout(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nsleep 30\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(CubeError, match="did not finish within 0.5 s"):
        gitsource.clone("https://example.org/r.git", tmp_path / "c", timeout=0.5)


# ------------------------------------------------------------------------- token and CSRF

def test_binding_off_loopback_generates_a_token_printed_once():
    said: list[str] = []
    assert auth.bind_token("127.0.0.1", None, said.append, "u") is None
    token = auth.bind_token("10.203.1.1", None, said.append, "http://10.203.1.1:8080")
    assert token and len(said) == 1 and said[0].endswith(f"/?token={token}")
    assert auth.bind_token("0.0.0.0", TOKEN, said.append, "u") == TOKEN
    with pytest.raises(CubeError, match="too short"):
        auth.bind_token("0.0.0.0", "short", said.append, "u")
    assert auth.is_loopback("::1") and not auth.is_loopback("0.0.0.0")
    assert not auth.is_loopback("myhost.example.org")


def test_the_token_moves_into_an_httponly_cookie_and_is_checked_on_every_request():
    c = client(token=TOKEN, base_url="http://10.203.1.1:8080")
    assert c.get("/jobs").status_code == 401
    assert c.get("/static/ui.css").status_code == 401
    c.cookies.set("cube_token", "wrong")
    assert c.get("/jobs").status_code == 401
    c.cookies.clear()
    first = c.get(f"/jobs?host=lab1&token={TOKEN}")
    assert first.status_code == 303 and first.headers["location"] == "/jobs?host=lab1"
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/jobs").status_code == 200  # the client kept the cookie
    bearer = client(token=TOKEN).get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200


def test_a_loopback_server_refuses_foreign_host_headers():
    assert client(base_url="http://attacker.example:8080").get("/jobs").status_code == 403
    assert client(base_url="http://localhost:8080").get("/jobs").status_code == 200


def test_form_posts_without_the_csrf_token_are_refused(tmp_path):
    c = client()
    job = _job(tmp_path)
    for url in ("/submit", f"/jobs/{job.id}/cancel", f"/jobs/{job.id}/rerun"):
        assert c.post(url, data={"csrf": "forged"}).status_code == 403
    assert c.post(f"/jobs/{job.id}/try").status_code == 403


# ----------------------------------------------------------------------------- outputs

def _job(tmp_path: Path) -> Job:
    ws = tmp_path / "ws"
    (ws / "out").mkdir(parents=True)
    (ws / "out" / "a.txt").write_text("a\n")
    (ws / "secret.txt").write_text("not an output\n")
    (ws / "out" / "escape").symlink_to("/etc")
    job = Job(id=new_job_id("t"), cube="t", host="lab1", tasks=["x"], state="succeeded",
              workspace=str(ws), outputs=["out/"], outputs_pulled=True)
    with Ledger() as ledger:
        ledger.save(job)
    return job


def test_outputs_never_leave_the_jobs_workspace(tmp_path):
    job = _job(tmp_path)
    assert outputs.resolve(job, "out/a.txt").read_text() == "a\n"
    for rel in ("secret.txt", "out/../secret.txt", "../ws/out/a.txt", "out/escape/passwd",
                "/etc/passwd"):
        with pytest.raises(outputs.OutsideWorkspace):
            outputs.resolve(job, rel)
    assert [e.name for e in outputs.listing(job, "out")] == ["a.txt"]
    c = client()
    assert c.get(f"/jobs/{job.id}/files/out/a.txt").text == "a\n"
    c.cookies.clear()
    assert c.get(f"/jobs/{job.id}/files/out/escape/passwd").status_code == 404
    assert c.get(f"/jobs/{job.id}/files/out/%2E%2E/secret.txt").status_code == 404
    names = zipfile.ZipFile(io.BytesIO(c.get(f"/jobs/{job.id}/zip/out").content)).namelist()
    assert names == ["out/a.txt"]


# -------------------------------------------------------------------------- submit form

def test_the_submit_form_puts_each_cli_error_beside_its_field(tmp_path):
    c = client(cubes_dir=REPO / "cubes")
    csrf = csrf_of(c.get("/submit").text)
    resp = c.post("/submit", data={"csrf": csrf, "source": "folder", "cube": "hello",
                                   "tasks": "greet", "host": "lab1", "runtime": "nonsense",
                                   "params": "names"})
    assert resp.status_code == 422
    errors = dict(re.findall(r'id="error-(\w+)">([^<]*)<', resp.text))
    assert "nonsense" in errors["runtime"]
    assert "names" in errors["params"]
    resp = c.post("/submit", data={"csrf": csrf, "source": "folder", "cube": "../../etc",
                                   "tasks": "greet", "host": "lab1"})
    assert "No cube" in resp.text and resp.status_code == 422


def test_a_hostile_zip_upload_is_a_4xx_page_never_a_500(cube_home):
    c = client()
    csrf = csrf_of(c.get("/submit").text)
    evil = zip_bytes({"mlcube.yaml": b"x", "../evil": b"x"})
    resp = c.post("/submit", data={"csrf": csrf, "source": "zip", "tasks": "t", "host": "h"},
                  files={"zip": ("evil.zip", evil.getvalue(), "application/zip")})
    assert resp.status_code == 400 and "leaves the folder" in resp.text
    assert not (cube_home / "ui" / "sources").exists() or not any(
        (cube_home / "ui" / "sources").rglob("evil"))


def test_cube_serve_refuses_a_non_loopback_bind_without_its_token(tmp_path):
    from controller.serve import serve

    with pytest.raises(CubeError, match="without a token"):
        serve(tmp_path, host="0.0.0.0")


def test_jobs_with_a_sweep_id_are_grouped_and_the_rest_listed():
    from controller.ui.pages.jobs import _group_sweeps

    jobs = [Job(id=f"j{i}", cube="c", host="h", tasks=["t"]) for i in range(3)]
    jobs[0].sweep = jobs[2].sweep = "lr-sweep"
    singles, sweeps = _group_sweeps(jobs)
    assert [j.id for j in singles] == ["j1"]
    assert {k: [j.id for j in v] for k, v in sweeps.items()} == {"lr-sweep": ["j0", "j2"]}
