"""The click-to-segment page (tools/page/: index.html, page.js) and what it carries: transformers.js and the
onnxruntime-web wasm files, copied from an npm-installed `@huggingface/transformers` so that the page fetches nothing
from a CDN. `export_onnx.py --page` writes it beside an ONNX folder's graphs; `push.py --space` into a static Space
that loads the pinned model repo. See docs/page.md."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .cli import ToolError

PAGE_DIR = Path(__file__).resolve().parent / "page"
PAGE_FILES = ("index.html", "page.js")
# Where the files come from by default: tests/js's `npm ci` (the repository's pinned transformers.js).
DEFAULT_NODE_MODULES = Path(__file__).resolve().parent.parent / "tests" / "js" / "node_modules"
TRANSFORMERS_JS = Path("@huggingface/transformers/dist/transformers.min.js")  # self-contained (no bare imports)
ORT_WASM = ("ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
INSTALL_HINT = ("npm install --ignore-scripts @huggingface/transformers in a folder and pass its node_modules as "
                "--transformers-js, or run `npm ci --ignore-scripts` in tests/js")


@dataclass(frozen=True)
class PageAssets:
    """The browser runtime files the page carries: {name in vendor/: source path}."""

    files: dict


def find_assets(node_modules: Path | None = None) -> PageAssets:
    """transformers.min.js and onnxruntime-web's asyncify wasm files under `node_modules` (default: tests/js's);
    a one-line `ToolError` saying how to install them when any is missing. Cheap: call it before anything slow."""
    root = Path(node_modules) if node_modules is not None else DEFAULT_NODE_MODULES
    script = root / TRANSFORMERS_JS
    # npm puts onnxruntime-web at the top level, or inside transformers.js' own node_modules when versions clash
    ort_dirs = [root / "onnxruntime-web" / "dist",
                root / "@huggingface" / "transformers" / "node_modules" / "onnxruntime-web" / "dist"]
    ort_dir = next((folder for folder in ort_dirs if all((folder / name).is_file() for name in ORT_WASM)), None)
    if not script.is_file() or ort_dir is None:
        missing = script if not script.is_file() else ort_dirs[0] / ORT_WASM[0]
        raise ToolError(f"the page needs transformers.js and onnxruntime-web, but {missing} is missing: "
                        f"{INSTALL_HINT}")
    return PageAssets({script.name: script, **{name: ort_dir / name for name in ORT_WASM}})


def page_config(model: str = ".", revision: str | None = None, remote_host: str | None = None) -> dict:
    """page-config.json: `model` "." is the page's own folder; otherwise a Hub repo id, pinned to `revision` (a commit
    sha) on the Hub at `remote_host`."""
    if model == ".":
        return {"model": "."}
    if not revision or not remote_host:
        raise ValueError("a Hub model needs its revision and the Hub's address")
    return {"model": model, "revision": revision, "remote_host": remote_host.rstrip("/") + "/"}


def write_page(folder: Path, assets: PageAssets, config: dict) -> list[str]:
    """Write the page into `folder` (index.html, page.js, page-config.json, vendor/...); the paths written, relative
    to `folder`. Refuses to overwrite a file there."""
    targets = {name: PAGE_DIR / name for name in PAGE_FILES}
    targets.update({f"vendor/{name}": path for name, path in assets.files.items()})
    existing = [name for name in [*targets, "page-config.json"] if (folder / name).exists()]
    if existing:
        raise ToolError(f"{folder}: already holds {', '.join(existing)}; the page would overwrite it")
    (folder / "vendor").mkdir(exist_ok=True)
    for name, source in targets.items():
        shutil.copyfile(source, folder / name)
    (folder / "page-config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sorted([*targets, "page-config.json"])


def space_card(space_title: str, model_repo: str, revision: str) -> str:
    """The Space's README.md: `sdk: static` (the Hub serves index.html) and `models:` linking it to the model page."""
    return "\n".join([
        "---", f"title: {space_title}", "sdk: static", "app_file: index.html", f"models: [{model_repo}]", "---", "",
        f"# {space_title}", "",
        f"Click-to-segment in the browser with `{model_repo}` at revision `{revision}` "
        "(transformers.js and onnxruntime-web, carried in `vendor/`; the model's `onnx/` graphs are fetched from its "
        "repository at that revision). Left click: a point on the object; right or shift+click: a point off it; "
        "drag: a box. Made with sam-split's `push.py --space`.", "",
    ])
