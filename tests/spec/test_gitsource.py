"""The git source `ukc follow` reads: branches and tags, revisions checked out in place, and a
git that runs no hook, asks no one for credentials and never shows a URL's credentials."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import errors
from reconciler.spec.gitsource import GitSource, display_url, source_key
from tests.support.gitrepo import Repo


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


def source(repo: str | Path, tmp_path: Path, ref: str = "main", **environ: str) -> GitSource:
    env = {"PATH": "/usr/bin:/bin", **environ}
    return GitSource(str(repo), ref, tmp_path / "state", environ=env, timeout_s=60)


def test_a_branch_and_a_tag_are_fetched_and_each_revision_replaces_the_last(
    repo: Repo, tmp_path: Path
) -> None:
    first = repo.commit("one", {"specs/a.yaml": "name: a\n", "specs/b.yaml": "name: b\n"})
    repo.git("tag", "v1")
    second = repo.commit("two", {"specs/a.yaml": "name: a2\n"}, remove=("specs/b.yaml",))
    src = source(repo.path, tmp_path)

    rev = src.fetch()
    assert (rev.sha, rev.ref) == (second, "main")
    tree = src.checkout(rev)
    (tree / "specs" / ".ukc").mkdir()
    (tree / "specs" / ".ukc" / "status.json").write_text("{}")
    assert sorted(p.name for p in (tree / "specs").iterdir()) == [".ukc", "a.yaml"]

    old = source(repo.path, tmp_path, ref="v1").fetch()
    assert old.sha == first
    src.checkout(old)
    assert (tree / "specs" / "b.yaml").read_text() == "name: b\n"
    assert (tree / "specs" / "a.yaml").read_text() == "name: a\n"
    assert (tree / "specs" / ".ukc" / "status.json").exists(), "untracked state stays"
    assert not (tree / ".git").exists(), "the repository is kept outside the checkout"


def test_an_unknown_ref_or_a_missing_repository_is_a_one_line_error(
    repo: Repo, tmp_path: Path
) -> None:
    repo.commit("one", {"a.yaml": "name: a\n"})
    with pytest.raises(errors.SourceError, match="couldn't find remote ref nope"):
        source(repo.path, tmp_path, ref="nope").fetch()
    with pytest.raises(errors.UsageError, match="no such directory"):
        source(tmp_path / "elsewhere", tmp_path)


@pytest.mark.parametrize(
    ("repo_arg", "ref"),
    [("--upload-pack=touch /tmp/pwned", "main"), ("https://h/x", "-oops"), ("https://h/x", "a..b")],
)
def test_a_repository_or_ref_that_reads_as_an_option_is_refused(
    tmp_path: Path, repo_arg: str, ref: str
) -> None:
    with pytest.raises(errors.UsageError):
        source(repo_arg, tmp_path, ref=ref)


def test_hooks_from_the_callers_git_configuration_never_run(repo: Repo, tmp_path: Path) -> None:
    repo.commit("one", {"a.yaml": "name: a\n"})
    marker = tmp_path / "hook-ran"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for hook in ("post-checkout", "reference-transaction", "post-index-change"):
        script = hooks / hook
        script.write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        script.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(f"[core]\n\thooksPath = {hooks}\n")
    src = source(
        repo.path,
        tmp_path,
        HOME=str(home),
        GIT_CONFIG_PARAMETERS=f"'core.hookspath'='{hooks}'",
        GIT_CONFIG_GLOBAL=str(home / ".gitconfig"),
    )
    src.checkout(src.fetch())
    assert not marker.exists(), marker.read_text()


class _AuthRequired(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="x"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def auth_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_source_that_wants_credentials_fails_at_once_without_asking_anyone(
    tmp_path: Path, auth_server: int
) -> None:
    marker = tmp_path / "askpass-ran"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho asked >> {marker}\necho guessed\n")
    askpass.chmod(0o755)
    src = source(
        f"http://127.0.0.1:{auth_server}/repo.git",
        tmp_path,
        GIT_ASKPASS=str(askpass),
        SSH_ASKPASS=str(askpass),
    )
    started = time.monotonic()
    with pytest.raises(errors.SourceError):
        src.fetch()
    assert time.monotonic() - started < 30
    assert not marker.exists(), "the caller's askpass program was run"


def test_credentials_in_a_url_are_never_shown(tmp_path: Path, auth_server: int) -> None:
    url = f"http://ukc-user:s3cr3t-t0ken@127.0.0.1:{auth_server}/repo.git"
    src = source(url, tmp_path)
    assert "s3cr3t" not in src.url and src.url == f"http://127.0.0.1:{auth_server}/repo.git"
    with pytest.raises(errors.SourceError) as info:
        src.fetch()
    assert "s3cr3t-t0ken" not in str(info.value) and "ukc-user" not in str(info.value)
    assert display_url("ssh://git@host/x.git") == "ssh://host/x.git"
    assert source_key(url, "main", "") == source_key(src.url, "main", "")


def test_what_a_remote_prints_reaches_the_message_without_terminal_controls(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "git"
    fake.write_text(
        "#!/bin/sh\nprintf 'remote: \\033]0;pwned\\007\\033[2J ok\\nfatal: gone\\n' >&2\nexit 128\n"
    )
    fake.chmod(0o755)
    src = GitSource("https://h/x", "main", tmp_path / "state", environ={}, git=str(fake))
    with pytest.raises(errors.SourceError) as info:
        src.fetch()
    text = str(info.value)
    assert "\x1b" not in text and "\x07" not in text
    assert "remote: \\x1b]0;pwned\\x07\\x1b[2J ok; fatal: gone" in text


def test_a_relative_state_directory_is_taken_from_where_ukc_runs(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = repo.commit("one", {"a.yaml": "name: a\n"})
    monkeypatch.chdir(tmp_path)
    src = GitSource(str(repo.path), "main", Path("rel-state"), environ={"PATH": "/usr/bin:/bin"})
    assert src.fetch().sha == sha
    assert (tmp_path / "rel-state" / "repo.git" / "HEAD").exists()


def test_a_file_url_is_fetched_as_a_url_and_recorded_as_given(repo: Repo, tmp_path: Path) -> None:
    sha = repo.commit("one", {"a.yaml": "name: a\n"})
    src = source(f"file://{repo.path}", tmp_path)
    assert src.url == f"file://{repo.path}" and src.fetch().sha == sha
