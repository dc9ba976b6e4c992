"""Specs from a git repository: fetch a branch or tag, materialize a revision, through the
`git` executable.

`GitSource` keeps one repository of its own under a state directory (`repo.git`, never the
user's clone) whose work tree is `checkout/`: each revision is checked out into the same
directory, so spec paths, `.ukc/` and sync records stay put across revisions and files a
revision removed are removed.

git runs hardened, because the repository and its URL are data, not configuration:

* a clean environment (PATH, HOME, SSH_AUTH_SOCK, proxy variables, a C locale), so none of
  ukc's credentials, `GIT_*` variables (`GIT_DIR`, `GIT_CONFIG_PARAMETERS`, `GIT_ASKPASS`...)
  or askpass programs of the caller reach it;
* no system or global git configuration, no hooks (`core.hooksPath=/dev/null`), no fsmonitor,
  no credential helper, no submodules;
* no prompt: `GIT_TERMINAL_PROMPT=0`, ssh in batch mode, so a source that wants credentials
  fails at once instead of waiting for a human;
* only the transports a repository is fetched over (`GIT_ALLOW_PROTOCOL`: file, git, http,
  https, ssh; never `ext::`, which runs a command), a URL or ref that could be read as an
  option is refused, and `--` separates them from options;
* credentials written into a URL (`https://user:token@host/...`) are never shown: the URL is
  recorded and printed without them, and git's own messages are scrubbed of them;
* git's messages (which carry what a remote sends) reach the log and the status file with
  their control characters escaped, so a remote cannot drive the user's terminal.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler._util.text import escape_controls
from reconciler.errors import SourceError, UsageError

__all__ = ["GitSource", "Revision", "check_ref", "display_url", "is_url", "source_key"]

#: the environment variables git may see from ours (everything else is left out)
_PASSED = ("PATH", "HOME", "SSH_AUTH_SOCK", "http_proxy", "https_proxy", "no_proxy")
_PASSED_UPPER = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
#: how git is configured for every call, whatever the machine's configuration says
_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "credential.helper=",
    "protocol.ext.allow=never",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "advice.detachedHead=false",
    "gc.auto=0",
)
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
#: what a remote may send in its messages ("remote: ...") that a terminal would obey
#: the longest one git call may take (a fetch of a large repository over a slow link)
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Revision:
    """A commit the source's ref pointed at when fetched."""

    sha: str
    ref: str

    @property
    def short(self) -> str:
        return self.sha[:12]


def is_url(repo: str) -> bool:
    """True for a URL (`https://`, `ssh://`, `file://`, `user@host:path`), False for a path."""
    return "://" in repo or bool(_SCP_LIKE.match(repo))


def display_url(repo: str) -> str:
    """The URL without credentials (user and password), for logs and the status file."""
    if "://" not in repo:
        return repo
    parts = urllib.parse.urlsplit(repo)
    if "@" not in parts.netloc:
        return repo
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def source_key(url: str, ref: str, path: str) -> str:
    """A stable name for a followed source (its default state directory)."""
    canon = "\0".join((display_url(url), ref, path))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _secrets_of(repo: str) -> list[str]:
    """What `display_url` leaves out, in the forms git may print it."""
    if "://" not in repo:
        return []
    netloc = urllib.parse.urlsplit(repo).netloc
    if "@" not in netloc:
        return []
    userinfo = netloc.rsplit("@", 1)[0]
    found = {userinfo, urllib.parse.unquote(userinfo)}
    for piece in userinfo.split(":"):
        found |= {piece, urllib.parse.unquote(piece)}
    return sorted((s for s in found if s), key=len, reverse=True)


def check_ref(ref: str) -> str:
    if not _REF.fullmatch(ref) or ".." in ref or ref.endswith((".lock", "/", ".")) or "//" in ref:
        raise UsageError(f"--ref {ref!r} is not a branch or tag name git accepts")
    return ref


class GitSource:
    """One followed repository: `fetch()` the ref, `checkout()` a revision."""

    def __init__(
        self,
        repo: str,
        ref: str,
        state_dir: Path,
        *,
        environ: Mapping[str, str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        git: str = "git",
    ) -> None:
        if repo.startswith("-") or any(ord(c) < 32 for c in repo):
            raise UsageError(f"repository {display_url(repo)!r} is not a path or URL")
        if not is_url(repo):
            local = Path(repo).resolve()
            if not local.is_dir():
                raise UsageError(f"repository {repo!r}: no such directory")
            repo = str(local)
        self.repo = repo
        self.url = display_url(repo)
        self.ref = check_ref(ref)
        # why absolute: git runs with the state directory as its working directory
        self.state_dir = state_dir.absolute()
        self.git_dir = self.state_dir / "repo.git"
        self.work_tree = self.state_dir / "checkout"
        self.timeout_s = timeout_s
        self._git = git
        self._secrets = _secrets_of(repo)
        self._env = self._environment(environ)

    @staticmethod
    def _environment(environ: Mapping[str, str]) -> dict[str, str]:
        env = {k: environ[k] for k in (*_PASSED, *_PASSED_UPPER) if k in environ}
        env.setdefault("PATH", "/usr/bin:/bin")
        env.update(
            LC_ALL="C",
            GIT_TERMINAL_PROMPT="0",
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL="/dev/null",
            GIT_ALLOW_PROTOCOL="file:git:http:https:ssh",
            GIT_SSH_COMMAND="ssh -o BatchMode=yes",
            GIT_ASKPASS="/bin/false",
            SSH_ASKPASS="/bin/false",
        )
        return env

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self, args: Sequence[str], *, what: str) -> str:
        argv = [self._git]
        for item in _CONFIG:
            argv += ["-c", item]
        argv += ["--git-dir", str(self.git_dir), "--work-tree", str(self.work_tree), *args]
        try:
            proc = subprocess.run(
                argv,
                env=self._env,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout_s,
            )
        except FileNotFoundError:
            raise SourceError(f"{what}: the git executable {self._git!r} was not found") from None
        except subprocess.TimeoutExpired:
            raise SourceError(f"{what}: git did not finish in {self.timeout_s:.0f} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in self._scrub(proc.stderr).splitlines() if ln.strip()]
            why = "; ".join(lines[-3:])[:500] or f"git exited {proc.returncode}"
            why = escape_controls(why)
            raise SourceError(f"{what}: {why}")
        return proc.stdout

    def _ensure_repo(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.work_tree.mkdir(exist_ok=True)
        if not (self.git_dir / "HEAD").exists():
            self._run(["init", "--quiet"], what="git init")

    def fetch(self) -> Revision:
        """Fetch the ref from the repository; the commit it points at."""
        self._ensure_repo()
        where = f"fetching {self.ref!r} from {self.url}"
        self._run(
            [
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-recurse-submodules",
                "--force",
                "--depth=1",
                "--",
                self.repo,
                f"{self.ref}:refs/ukc/source",
            ],
            what=where,
        )
        sha = self._run(["rev-parse", "--verify", "refs/ukc/source^{commit}"], what=where).strip()
        if not _SHA.fullmatch(sha):
            raise SourceError(f"{where}: git named no commit ({sha[:80]!r})")
        return Revision(sha, self.ref)

    def checkout(self, revision: Revision) -> Path:
        """Make `checkout/` the revision's tree (untracked files such as `.ukc/` stay)."""
        self._run(
            ["checkout", "--quiet", "--force", "--detach", revision.sha],
            what=f"checking out {revision.short}",
        )
        return self.work_tree
