"""What the command-line tools (push.py, finetune.py) share: writing an output folder atomically, publishing a folder
to the Hub in one commit, reloading a saved model as a user would and comparing its outputs with a reference, and
turning failures and signals into one clear message.

Not part of the model code (nothing here is copied to the Hub). Top-level imports are the standard library and torch
only: this file also runs as a script, in the fresh process that reloads a model (`reload_and_run`), where the package
must not be imported (the reload has to prove that the repository's own code loads).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


class ToolError(Exception):
    """A failure the user can act on: printed as one `error: ...` line, exit status 1, no traceback."""


def step(message: str) -> None:
    """Print a progress line with the time, at once (long steps announce themselves before they start)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the stack like any exception, so `finally` blocks and context managers (temporary folders,
    # child processes) clean up; the default SIGTERM action would end the process on the spot.
    raise SystemExit(128 + signum)


def run_tool(main: Callable[[], object]) -> int:
    """Run a tool's `main()` and return its exit status: 0, or 1 with one `error: ...` line on stderr for a `ToolError`,
    130 on Ctrl-C and 143 on SIGTERM (after cleaning up), never a traceback for those."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        main()
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except SystemExit as exit_request:
        if exit_request.code == 128 + signal.SIGTERM:
            print("error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# ------------------------------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_output_dir(target: Path | None, *, existing: str = "refuse", last: str | None = None,
                      prefix: str = ".sam-split-build-") -> Iterator[Path]:
    """Yield an empty folder to write into; when the `with` block succeeds, its content becomes `target` at once.

    The folder is made beside `target` (same file system, so the move is a rename) and removed on every other way
    out: an exception, Ctrl-C, SIGTERM under `run_tool`. With `target=None` it is a scratch folder in the system's
    temporary directory, always removed. `existing` says what to do when `target` already holds something:
      - "refuse": raise `ToolError` (before anything is written); an empty folder counts as absent;
      - "replace": swap the whole folder for the new one;
      - "update": move the new files into it one by one, replacing files of the same names and keeping the others
        (e.g. checkpoints beside an adapter); `last` names the file removed first and moved in last, so that a reader
        never finds it beside a mix of old and new files (e.g. `adapter_config.json`).
    """
    if existing not in ("refuse", "replace", "update"):
        raise ValueError(f"existing={existing!r}: expected 'refuse', 'replace' or 'update'")
    if target is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield Path(scratch)
        return
    target = Path(target).absolute()
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if target.exists() and not target.is_dir():
        raise ToolError(f"{target} exists and is not a folder")
    if occupied and existing == "refuse":
        raise ToolError(f"{target} exists and is not empty; choose a new folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    except OSError as error:
        raise ToolError(f"cannot write beside {target}: {error.strerror or error}") from error
    try:
        yield build
        _move_into_place(build, target, existing, last)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _move_into_place(build: Path, target: Path, existing: str, last: str | None) -> None:
    if existing == "update" and target.is_dir():
        names = sorted(path.name for path in build.iterdir())
        if last in names:
            (target / last).unlink(missing_ok=True)
            names.remove(last)
            names.append(last)
        for name in names:
            if (target / name).is_dir() and not (target / name).is_symlink():
                shutil.rmtree(target / name)
            os.replace(build / name, target / name)
        return
    old = None
    if target.exists():
        if any(target.iterdir()):  # "replace": keep the old folder until the new one is in place
            old = target.with_name(f"{build.name}-old")
            os.replace(target, old)
        else:
            target.rmdir()
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ the Hub


def hub_failure(action: str, error: BaseException) -> ToolError:
    """A `ToolError` for a failed Hub request, with the reason in a line (the server's message, or what the network
    did) rather than a traceback."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ToolError(f"{action}: {type(error).__name__}{': ' + reason if reason else ''}")


def hub_user(token: str | None = None) -> str:
    """The user name the Hub at `HF_ENDPOINT` knows `token` (None: `HF_TOKEN` or the saved login) by; a `ToolError`
    saying so when it refuses the token or cannot be reached. Run it before a long job that ends in an upload."""
    from huggingface_hub import HfApi

    from .compat import hub_failure_types

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


def publish_folder(folder: Path, repo_id: str, *, commit_message: str, revision: str | None = None,
                   create_pr: bool = False, private: bool = False, token: str | None = None,
                   allow_patterns: list[str] | None = None) -> PublishedCommit:
    """Upload `folder` (only `allow_patterns` files, if given) to the model repository `repo_id` in one commit.

    Creates the repository (`private`) if missing, and the branch `revision` (from the default branch) if missing;
    `create_pr` opens a pull request against the default branch instead. Any Hub or network failure is a `ToolError`
    with the reason; the commit is atomic, so then nothing was committed. (Call `compat.set_hub_timeout` first, or an
    unanswered request waits forever.)
    """
    from huggingface_hub import HfApi

    from .compat import hub_failure_types

    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr opens a pull request against the default branch; pass no revision")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=None if create_pr else revision,
                                   create_pr=create_pr, commit_message=commit_message, allow_patterns=allow_patterns)
    except hub_failure_types() as error:
        failure = hub_failure(f"upload to {repo_id} at {api.endpoint} failed (nothing was committed)", error)
        if "xet" in str(error).lower():  # huggingface_hub uploads through Xet storage unless told otherwise
            failure = ToolError(f"{failure}. A Hub without Xet storage needs HF_HUB_DISABLE_XET=1 in the environment")
        raise failure from error
    return PublishedCommit(repo_id=repo_id, sha=commit.oid, url=commit.pr_url or commit.commit_url,
                           pull_request=bool(commit.pr_url))


# --------------------------------------------------------------------------------------- reload and compare outputs

# Names of the outputs compared, in the order they are computed and reported.
OUTPUT_NAMES = ("image embeddings", "masks", "IoU scores")


def verification_inputs(config) -> dict:
    """A fixed image with a point and a box prompt, at the model's real input size (`config`: a SAM config)."""
    size = config.vision_config.image_size
    return {
        "pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
        "input_points": torch.tensor([[[[0.3 * size, 0.6 * size]]]]),
        "input_labels": torch.tensor([[[1]]]),
        "input_boxes": torch.tensor([[[0.1 * size, 0.2 * size, 0.8 * size, 0.9 * size]]]),
    }


def sam_outputs(model, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{image embeddings, masks, IoU scores} of a SAM model (stock or split) on `inputs` (pixel values plus prompts),
    in fp32 and without gradients. The vision encoder is called directly: `get_image_embeddings` would not do for a
    model under training, and the masks then come from those very embeddings."""
    prompts = {name: value for name, value in inputs.items() if name != "pixel_values"}
    with torch.no_grad():
        embeddings = model.vision_encoder(inputs["pixel_values"].to(model.dtype))[0]
        outputs = model(image_embeddings=embeddings, **prompts)
    return dict(zip(OUTPUT_NAMES, (embeddings.float(), outputs.pred_masks.float(), outputs.iou_scores.float())))


def max_differences(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{output name: max abs difference}, for every output in `expected`; a shape mismatch is an infinite difference."""
    return {
        name: (actual[name] - expected[name]).abs().max().item() if actual[name].shape == expected[name].shape
        else float("inf")
        for name in expected
    }


@dataclass(frozen=True)
class Reloaded:
    outputs: dict  # {output name: tensor}, see `sam_outputs`
    model_class: str  # the class the Auto class built, e.g. "SamSplitModel"
    code_file: str  # the file that class came from (remote code: its copy in HF_HOME's modules cache)


def reload_and_run(models: Mapping[str, tuple[str, str | None]], inputs: Mapping[str, torch.Tensor], *,
                   env: Mapping[str, str] | None = None, auto_classes: tuple[str, ...] = ("AutoModel",),
                   progress: Callable[[str], None] | None = None) -> dict[str, Reloaded]:
    """Load each `{name: (folder or Hub id, revision)}` as a user would, with `<auto class>.from_pretrained(...,
    trust_remote_code=True)` in one fresh Python process, run it on `inputs` and return `{"name/AutoClass": Reloaded}`.

    `env`: the child's whole environment (default: this one with a private, empty HF_HOME and HF_HUB_OFFLINE=1, so the
    code comes from the folder itself and no cache can stand in for it). The child's progress lines go to `progress`
    as they come. A child that fails is a `ToolError` with the end of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="sam-split-reload-") as scratch:
        scratch = Path(scratch)
        torch.save(dict(inputs), scratch / "inputs.pt")
        if env is None:
            env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}
        request = {"models": dict(models), "auto_classes": list(auto_classes), "inputs": str(scratch / "inputs.pt"),
                   "results": str(scratch / "results.pt")}
        # stderr goes to a file: a child that writes much of it cannot then block on a full pipe
        with open(scratch / "stderr.txt", "w+") as stderr_file:
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(request)],
                                     env=dict(env), stdout=subprocess.PIPE, stderr=stderr_file, text=True)
            try:
                for line in child.stdout:
                    if progress is not None:
                        progress(line.rstrip())
                child.wait()
            finally:
                if child.poll() is None:  # interrupted (Ctrl-C, SIGTERM under `run_tool`): no orphan keeps running
                    child.kill()
                    child.wait()
            stderr_file.seek(0)
            stderr = stderr_file.read()
        if child.returncode != 0:
            raise ToolError(f"reloading {', '.join(f'{path}@{rev}' if rev else path for path, rev in models.values())}"
                            f" with {' and '.join(auto_classes)} failed:\n{stderr[-3000:]}")
        results = torch.load(scratch / "results.pt")
    return {key: Reloaded(**value) for key, value in results.items()}


def _reload_child(request: dict) -> None:
    import transformers

    inputs = torch.load(request["inputs"])
    results = {}
    for name, (path, revision) in request["models"].items():
        for auto_class in request["auto_classes"]:
            started = time.monotonic()
            model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True, revision=revision)
            model = model.float().eval()
            print(f"reloaded {name} with {auto_class} ({type(model).__name__}) in {time.monotonic() - started:.1f} s; "
                  f"running it on {tuple(inputs['pixel_values'].shape)} pixel values", flush=True)
            started = time.monotonic()
            outputs = sam_outputs(model, inputs)
            print(f"ran {name} in {time.monotonic() - started:.1f} s", flush=True)
            results[f"{name}/{auto_class}"] = {"outputs": outputs, "model_class": type(model).__name__,
                                               "code_file": sys.modules[type(model).__module__].__file__}
    torch.save(results, request["results"])


if __name__ == "__main__":
    # Run as a script, Python put this file's folder (the repository root) first on sys.path: drop it, so that none of
    # the repository's files (compat.py, evaluate.py, ...) can stand in for a library of the same name.
    sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
    _reload_child(json.loads(sys.argv[1]))
