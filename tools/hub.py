"""Talking to the Hub: who the token belongs to, publishing a folder in one commit, and failures as one line."""

import contextlib
import hashlib
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

from .cli import ToolError
from .compat import hub_failure_types, hub_timeout


def hub_failure(action: str, error: BaseException) -> ToolError:
    """A `ToolError` for a failed Hub request, with the reason in a line (the server's message, or what the network
    did) rather than a traceback."""
    reason = error_reason(error)
    return ToolError(f"{action}: {type(error).__name__}{': ' + reason if reason else ''}")


def error_reason(error: BaseException) -> str:
    """The reason a failed request gives, whole, on one line: the server's own message when it sent one (it may span
    several lines in the client's rendering; none of it is cut), else the error's text."""
    text, server_message = str(error), getattr(error, "server_message", None)
    if server_message and " ".join(server_message.split()) not in " ".join(text.split()):
        text += f" {server_message}"
    return " ".join(text.split())


def hub_user(token: str | None = None) -> str:
    """The user name the Hub at `HF_ENDPOINT` knows `token` (None: `HF_TOKEN` or the saved login) by; a `ToolError`
    saying so when it refuses the token or cannot be reached. Run it before a long job that ends in an upload."""

    api = HfApi(token=token)
    try:
        user = api.whoami()
    except hub_failure_types() as error:
        raise hub_failure(f"the Hub at {api.endpoint} refused the token or could not be reached (set HF_TOKEN, run "
                          "`hf auth login`, or pass --token)", error) from error
    return user.get("name", "?")


@dataclass(frozen=True)
class PublishedCommit:
    repo_id: str
    sha: str
    url: str  # the commit's page, or the pull request's when one was opened
    pull_request: bool
    note: str = ""  # what else the user should know: the answer was lost but the commit landed, or nothing changed
    deleted: tuple[str, ...] = ()  # the files the commit deleted (the branch held them, the folder does not)


# The Hub writes .gitattributes into every new repository (which files go to LFS); a published folder without one
# keeps the Hub's.
HUB_OWN_FILES = (".gitattributes",)
# Every commit of `publish_folder` carries this in its description, followed by a unique id: it finds a commit whose
# answer was lost, and tells the files our pushes wrote from those someone else added.
PUBLISH_MARK = "sam-split-publish-id:"
# How many of our earlier commits are read to tell whose a file is (each is one tree listing).
OWN_COMMITS_READ = 20
PR_REF = "refs/pr/"


def folder_files(folder: Path) -> dict[str, tuple[int, str, str]]:
    """{path in the repo: (size, sha256, git blob sha1)} of every file under `folder`: what the Hub reports of a
    committed file (the sha256 of an LFS file, the git blob id of a regular one) to compare with."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            size, sha256, blob = path.stat().st_size, hashlib.sha256(), hashlib.sha1()
            blob.update(f"blob {size}\0".encode())
            with open(path, "rb") as file:
                while chunk := file.read(1 << 20):
                    sha256.update(chunk)
                    blob.update(chunk)
            files[path.relative_to(folder).as_posix()] = (size, sha256.hexdigest(), blob.hexdigest())
    return files


def tree_differences(api: HfApi, repo_id: str, sha: str, local: dict[str, tuple[int, str, str]],
                     repo_type: str = "model") -> list[str]:
    """How the repository's tree at commit `sha` differs from `local` (see `folder_files`), in words; [] when it holds
    exactly those files with those contents (besides the Hub's own .gitattributes)."""
    remote = {item.path: item for item in api.list_repo_tree(repo_id, revision=sha, recursive=True, repo_type=repo_type)
              if isinstance(item, RepoFile)}
    problems = [f"{path} is not in the folder" for path in sorted(set(remote) - set(local))
                if path not in HUB_OWN_FILES]
    problems += [f"{path} is missing" for path in sorted(set(local) - set(remote))]
    for path in sorted(set(local) & set(remote)):
        size, sha256, blob = local[path]
        item = remote[path]
        same = (item.lfs.sha256 == sha256 and item.lfs.size == size) if item.lfs else item.blob_id == blob
        if not same:
            problems.append(f"{path} differs")
    return problems


def _file_ids(api: HfApi, repo_id: str, sha: str, repo_type: str = "model") -> dict[str, str]:
    """{path: content id (the LFS sha256, else the git blob id)} of every file of the tree at commit `sha`."""
    return {item.path: item.lfs.sha256 if item.lfs else item.blob_id
            for item in api.list_repo_tree(repo_id, revision=sha, recursive=True, repo_type=repo_type)
            if isinstance(item, RepoFile)}


def foreign_files(api: HfApi, repo_id: str, head: str, paths: list[str], repo_type: str = "model") -> list[str]:
    """Those of `paths` (files of the branch at `head`) that no commit of `publish_folder` wrote as they are now: a
    file someone added or changed since our last push. Our commits are found in the branch's history by
    PUBLISH_MARK; the newest OWN_COMMITS_READ of them are read."""
    now = _file_ids(api, repo_id, head, repo_type)
    left = set(paths)
    read = 0
    for commit in api.list_repo_commits(repo_id, revision=head, repo_type=repo_type):
        if not left or read >= OWN_COMMITS_READ:
            break
        if PUBLISH_MARK not in f"{commit.title}\n{commit.message}":
            continue
        read += 1
        ours = _file_ids(api, repo_id, commit.commit_id, repo_type)
        left = {path for path in left if ours.get(path) != now.get(path)}
    return sorted(left)


def push_target(api: HfApi, repo_id: str, branch: str, repo_type: str = "model") -> str:
    """What `branch` is: "pr" (a pull request `refs/pr/N`, which must exist), "branch" (created from main if
    missing); a tag is refused (`ToolError`): a push does not move a tag, nor make a branch of the same name."""
    if branch.startswith(PR_REF):
        return "pr"
    refs = api.list_repo_refs(repo_id, repo_type=repo_type)
    if branch in {tag.name for tag in refs.tags} and branch not in {ref.name for ref in refs.branches}:
        raise ToolError(f"--revision {branch} is a tag of {repo_id}, not a branch: a push goes to a branch (created "
                        "from main if missing) or to a pull request (refs/pr/N); nothing was committed")
    if branch != "main" and branch not in {ref.name for ref in refs.branches}:
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type=repo_type)
    return "branch"


def publish_folder(folder: Path, repo_id: str, *, commit_message: str, revision: str | None = None,
                   create_pr: bool = False, private: bool = False, token: str | None = None,
                   replace_all: bool = False, repo_type: str = "model",
                   space_sdk: str | None = None) -> PublishedCommit:
    """Make the model repository `repo_id` at branch `revision` (default main) hold exactly `folder`, in one commit.

    The commit adds every file of the folder and deletes every file the folder does not hold (the Hub's own
    .gitattributes apart), naming each in its description and in the result (`deleted`), on top of the branch head it
    read (`parent_commit`: a commit in between is refused, not mixed in). A file to delete that no earlier commit of
    ours wrote as it is (one a user added or changed between two pushes: `foreign_files`) is refused (`ToolError`,
    nothing committed) unless `replace_all`; an empty folder is always refused. Afterwards the committed tree is
    compared with the folder, file by file (sizes and hashes), so the returned sha loads exactly what was in `folder`.
    Creates the repository (`private`) if missing, and the branch from main if missing; `revision` "refs/pr/N" updates
    that pull request (and nothing else); a tag is refused; `create_pr` opens a pull request against main instead. A
    branch that already holds exactly the folder gets no new commit (its head is returned, with a note).

    When the Hub's answer to the commit is lost (an error after applying it, a dropped connection, a timeout), the
    repository is looked at for the commit, by a unique marker in its description: found, it is returned with a note;
    not found, `ToolError` says nothing was committed; unknown, `ToolError` says how to check. Every other Hub or
    network failure is a `ToolError` with the server's reason. (Call `compat.set_hub_timeout` first, or an unanswered
    request waits forever.) `repo_type` "space" publishes a Space (created with `space_sdk`).
    """
    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr opens a pull request against the default branch; pass no revision")
    api, branch = HfApi(token=token), revision or "main"
    typed = {"repo_type": repo_type}
    local = folder_files(folder)
    if not local:
        raise ToolError(f"{folder} holds no file: publishing it would delete every file of {repo_id}@{branch}; "
                        "nothing was committed")
    with hub_errors(f"upload to {repo_id} at {api.endpoint} failed (nothing was committed)"):
        api.create_repo(repo_id, private=private, exist_ok=True, space_sdk=space_sdk, **typed)
        kind = push_target(api, repo_id, branch, repo_type)
        head = api.repo_info(repo_id, revision=branch, **typed).sha
        stale = tree_differences(api, repo_id, head, local, repo_type)
        missing = " is not in the folder"
        remote_only = [line.removesuffix(missing) for line in stale if line.endswith(missing)]
        foreign = (foreign_files(api, repo_id, head, remote_only, repo_type) if remote_only and not replace_all
                   else [])
    if foreign:
        raise ToolError(f"{repo_id}@{branch} holds {len(foreign)} files that no push of sam-split wrote (added or "
                        f"changed since): {', '.join(foreign)}. The push would delete them: add them to the folder, "
                        "or pass --replace-all to delete them; nothing was committed")
    if not stale and not create_pr:
        return PublishedCommit(repo_id, head, f"{repo_page(api, repo_id, repo_type)}/commit/{head}", False,
                               note=f"{repo_id}@{branch} already holds exactly this folder: nothing to commit")
    marker = f"{PUBLISH_MARK} {uuid.uuid4().hex}"
    description = marker + (f"\n\nDeletes {len(remote_only)} files the published folder does not hold: "
                            f"{', '.join(remote_only)}" if remote_only else "")
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in local]
    operations += [CommitOperationDelete(path_in_repo=path) for path in remote_only]
    try:
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, commit_description=description,
                                   revision=None if create_pr else branch, create_pr=create_pr, parent_commit=head,
                                   **typed)
        url = commit.pr_url or commit.commit_url
        if kind == "pr":
            url = f"{repo_page(api, repo_id, repo_type)}/discussions/{branch.removeprefix(PR_REF)}"
        published = PublishedCommit(repo_id, commit.oid, url, bool(commit.pr_url) or kind == "pr",
                                    deleted=tuple(remote_only))
    except hub_failure_types() as error:
        published = landed_commit(api, repo_id, branch, head, marker, create_pr, error, repo_type)
        published = PublishedCommit(**{**published.__dict__, "deleted": tuple(remote_only)})
    check_published(api, published, local, repo_type)
    return published


# The lost-answer lookup gets this many --timeouts in all (each request retried by huggingface_hub would take up to six
# and its waits between tries), so that a Hub that stopped answering ends the push soon, with the marker to look for.
LOOKUP_TIMEOUTS = 3


def within(seconds: float | None, call):
    """`call()`, or a `TimeoutError` (an OSError: a Hub failure) when it has not returned after `seconds` (None: no
    limit). It runs in a daemon thread, which is left behind on a timeout: the process does not wait for it."""
    if seconds is None:
        return call()
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True, name="hub-lookup")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no complete answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def repo_page(api: HfApi, repo_id: str, repo_type: str = "model") -> str:
    """The repository's address on the Hub (a Space's and a dataset's have a prefix)."""
    return f"{api.endpoint}/{ {'model': '', 'dataset': 'datasets/', 'space': 'spaces/'}[repo_type]}{repo_id}"


def landed_commit(api: HfApi, repo_id: str, branch: str, head: str, marker: str, create_pr: bool,
                  error: BaseException, repo_type: str = "model") -> PublishedCommit:
    """After a failed commit request: the commit if it landed all the same (found by `marker`), else a `ToolError`
    saying that nothing was committed, or that it cannot be told. The lookup takes at most LOOKUP_TIMEOUTS times the
    Hub timeout (`compat.set_hub_timeout`) in all."""
    answer = f"{type(error).__name__}: {error_reason(error)}"

    def search() -> PublishedCommit | None:
        if create_pr:
            refs = api.list_repo_refs(repo_id, include_pull_requests=True, repo_type=repo_type).pull_requests or []
            candidates = [ref.ref for ref in refs]
        else:
            candidates = [branch]
        for ref in candidates:
            for commit in api.list_repo_commits(repo_id, revision=ref, repo_type=repo_type):
                if commit.commit_id == head:
                    break
                if marker in f"{commit.title}\n{commit.message}":
                    number = ref.rpartition("/")[2]
                    page = repo_page(api, repo_id, repo_type)
                    url = f"{page}/discussions/{number}" if create_pr else f"{page}/commit/{commit.commit_id}"
                    return PublishedCommit(repo_id, commit.commit_id, url, create_pr, note=(
                        f"the Hub's answer to the commit was lost ({answer}), but the commit landed: "
                        f"{commit.commit_id}"))
        return None

    timeout = hub_timeout()
    try:
        found = within(None if timeout is None else LOOKUP_TIMEOUTS * timeout, search)
    except hub_failure_types() as lookup_error:
        raise ToolError(f"upload to {repo_id} at {api.endpoint}: the answer to the commit was lost ({answer}) and "
                        f"the repository could not be checked ({type(lookup_error).__name__}: "
                        f"{error_reason(lookup_error)}). Whether it landed is unknown: look in its history for a "
                        f"commit whose description says '{marker}' before publishing again") from error
    if found is not None:
        return found
    failure = f"upload to {repo_id} at {api.endpoint} failed: {answer}. Nothing was committed (checked: {branch} "
    failure += "has no pull request from it)" if create_pr else f"is still at {head})"
    if "xet" in str(error).lower():  # huggingface_hub uploads through Xet storage unless told otherwise
        failure += ". A Hub without Xet storage needs HF_HUB_DISABLE_XET=1 in the environment"
    raise ToolError(failure) from error


def check_published(api: HfApi, published: PublishedCommit, local: dict[str, tuple[int, str, str]],
                    repo_type: str = "model") -> None:
    """A `ToolError` unless the tree of the published commit holds exactly the `local` files."""
    with hub_errors(f"{published.repo_id}: committed {published.sha}, but reading its file list back failed"):
        problems = tree_differences(api, published.repo_id, published.sha, local, repo_type)
    if problems:
        raise ToolError(f"{published.repo_id}: commit {published.sha} does not hold exactly the verified folder: "
                        f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}; do not use that sha")


@contextlib.contextmanager
def hub_errors(action: str):
    """Hub and network failures inside the block become `hub_failure(action, ...)`."""
    try:
        yield
    except hub_failure_types() as error:
        raise hub_failure(action, error) from error
