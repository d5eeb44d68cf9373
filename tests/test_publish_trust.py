"""`tools.hub.publish_folder` against the test Hub: every file the commit deletes is named (output and commit
description), a file no push of ours wrote is not deleted without `replace_all`, an empty folder never wipes a branch,
`refs/pr/N` updates that pull request only and a tag is refused as a push target."""

import json
import textwrap

import pytest
from hub_server import HubServer
from sam_testing import hub_env, run_python

TOKEN = "hf_publish_trust_token"
pytestmark = pytest.mark.slow  # each step is a fresh client process (~8 s)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        yield server


def client(hub, tmp_path, script: str, **args) -> dict:
    """Run `script` in a child process with `api` (HfApi) and `publish(folder, repo, **kwargs)` at hand; it sets
    `out`, printed as JSON. A ToolError of `publish` comes back as {"error": message}."""
    code = textwrap.dedent("""\
        import json
        from pathlib import Path
        from huggingface_hub import HfApi
        from sam_split.tools.cli import ToolError
        from sam_split.tools.hub import publish_folder
        api = HfApi()
        def publish(folder, repo, **kwargs):
            try:
                commit = publish_folder(Path(folder), repo, commit_message="publish", **kwargs)
            except ToolError as error:
                return {"error": str(error)}
            return {"sha": commit.sha, "deleted": list(commit.deleted), "pr": commit.pull_request, "url": commit.url}
        """) + f"args = {args!r}\nout = None\n" + textwrap.dedent(script) + "\nprint(json.dumps(out))\n"
    stdout = run_python(code, env=hub_env(hub.url, tmp_path / "home", token=TOKEN), replace_env=True)
    return json.loads(stdout.strip().splitlines()[-1])


def folder(path, **files):
    """A folder holding `files` ({name: text}; "eval/results.json" may be given as eval_results=...)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        name = {"notes": "notes.md", "eval_results": "eval/results.json"}.get(name, name)
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return str(path)


def files_at(hub, repo, ref):
    return sorted(hub.git(repo, "ls-tree", "-r", "--name-only", ref).split())


def test_deleted_files_are_named_and_a_users_file_is_not_deleted_without_replace_all(hub, tmp_path):
    repo = "tester/deletes"
    first = client(hub, tmp_path, "out = publish(args['f'], args['repo'])", repo=repo,
                   f=folder(tmp_path / "one", a="1", b="2"))
    assert "error" not in first and first["deleted"] == []
    # A user adds notes.md and eval/results.json between two pushes.
    client(hub, tmp_path, """\
        api.upload_file(repo_id=args['repo'], path_or_fileobj=b"mine", path_in_repo="notes.md")
        api.upload_file(repo_id=args['repo'], path_or_fileobj=b"{}", path_in_repo="eval/results.json")
        """, repo=repo)
    head = hub.git(repo, "rev-parse", "main").strip()
    refused = client(hub, tmp_path, "out = publish(args['f'], args['repo'])", repo=repo,
                     f=folder(tmp_path / "two", a="1 changed", b="2"))
    assert "eval/results.json, notes.md" in refused["error"] and "--replace-all" in refused["error"]
    assert hub.git(repo, "rev-parse", "main").strip() == head  # nothing committed
    # Our own file b goes (named) while the user's stay when the folder holds them... or with replace_all.
    ours = client(hub, tmp_path, "out = publish(args['f'], args['repo'])", repo=repo,
                  f=folder(tmp_path / "three", a="1 changed", notes="mine", eval_results="{}"))
    assert ours.get("deleted") == ["b"], ours
    assert "Deletes 1 files the published folder does not hold: b" in hub.git(repo, "log", "-1", "--format=%B", "main")
    assert files_at(hub, repo, "main") == [".gitattributes", "a", "eval/results.json", "notes.md"]
    replaced = client(hub, tmp_path, "out = publish(args['f'], args['repo'], replace_all=True)", repo=repo,
                      f=folder(tmp_path / "four", a="only a"))
    assert replaced["deleted"] == ["eval/results.json", "notes.md"]
    assert "eval/results.json, notes.md" in hub.git(repo, "log", "-1", "--format=%B", "main")
    assert files_at(hub, repo, "main") == [".gitattributes", "a"]


def test_an_empty_folder_never_wipes_a_branch(hub, tmp_path):
    repo = "tester/empty"
    client(hub, tmp_path, "out = publish(args['f'], args['repo'])", repo=repo, f=folder(tmp_path / "one", a="1"))
    head = hub.git(repo, "rev-parse", "main").strip()
    for replace_all in (False, True):
        refused = client(hub, tmp_path, "out = publish(args['f'], args['repo'], replace_all=args['r'])", repo=repo,
                         f=folder(tmp_path / "empty"), r=replace_all)
        assert "holds no file" in refused["error"]
    assert hub.git(repo, "rev-parse", "main").strip() == head


def test_a_pull_request_revision_updates_that_pull_request_only_and_a_tag_is_refused(hub, tmp_path):
    repo = "tester/revisions"
    client(hub, tmp_path, "out = publish(args['f'], args['repo'])", repo=repo, f=folder(tmp_path / "one", a="1"))
    client(hub, tmp_path, """\
        api.create_pull_request(args['repo'], title="a pull request")
        api.create_tag(args['repo'], tag="v1")
        """, repo=repo)
    refs_before = hub.git(repo, "for-each-ref", "--format=%(refname)").split()
    updated = client(hub, tmp_path, "out = publish(args['f'], args['repo'], revision='refs/pr/1')", repo=repo,
                     f=folder(tmp_path / "two", a="2"))
    assert updated["pr"] and updated["url"].endswith("/discussions/1")
    assert hub.git(repo, "rev-parse", "refs/pr/1").strip() == updated["sha"]
    assert files_at(hub, repo, "main") == [".gitattributes", "a"] and hub.git(repo, "show", "main:a") == "1"
    refused = client(hub, tmp_path, "out = publish(args['f'], args['repo'], revision='v1')", repo=repo,
                     f=folder(tmp_path / "three", a="3"))
    assert "--revision v1 is a tag of tester/revisions, not a branch" in refused["error"]
    assert hub.git(repo, "for-each-ref", "--format=%(refname)").split() == refs_before  # no stray branch
