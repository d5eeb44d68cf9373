"""The click-to-segment page (export_onnx.py --page, push.py --space) in a real headless browser: Debian's chromium
driven by PyPI playwright, everything served from 127.0.0.1. Tiny SAM and SAM 2 twins with a LoRA adapter merged are
exported with --page; the page, clicked with the mouse and scripted through window.segment, must give the merged
PyTorch model's highest-IoU mask on the same image and prompt (pixels equal but for ties at the threshold). One browser
launch serves every check. CI (CI=true) fails instead of skipping when chromium or playwright is missing."""

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from hub_server import HubServer
from PIL import Image
from sam_testing import add_lora, hub_env, random_stock, random_stock_sam, randomize_, tiny_sam2_config
from test_onnx import STD

from sam_split import Sam2SplitModel, SamSplitModel
from sam_split.tools import page
from sam_split.tools.cli import ToolError
from sam_split.tools.processing import model_processor

ROOT = Path(__file__).resolve().parent.parent
TIE = 1e-4  # |mask logit| below which the browser and PyTorch may binarize a pixel differently (graphs agree to 1e-4)
DOCS_SCREENSHOT = ROOT / "docs" / "page-screenshot.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TOKEN = "page-test-token"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """push.py --onnx --space on a tiny stock SAM, to the test Hub: (hub, model repo sha, the twin it converted)."""
    require_browser()
    tmp = tmp_path_factory.mktemp("space")
    stock = randomize_(random_stock_sam(seed=2), std=STD)
    stock.save_pretrained(tmp / "stock")
    with HubServer(tmp / "hub", token=TOKEN) as hub:
        result = subprocess.run(
            [sys.executable, str(ROOT / "push.py"), "--source", str(tmp / "stock"), "--repo-id", "tester/sam-tiny",
             "--space", "tester/sam-tiny-demo"],
            env=hub_env(hub.url, tmp / "home", token=TOKEN), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        sha = re.search(r"Committed ([0-9a-f]{40})", result.stdout).group(1)
        yield hub, sha, SamSplitModel.from_sam(stock).eval(), result.stdout


def require_browser():
    """playwright's sync API and the system chromium; their absence skips, or fails under CI=true."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = ("PyPI playwright" if sync_playwright is None else
               "chromium (apt-get install -y chromium)" if shutil.which("chromium") is None else None)
    if missing is None:
        try:
            page.find_assets()
        except ToolError as error:
            missing = str(error)
    if missing:
        message = f"the browser test needs {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def export_with_page(tmp: Path, base, name: str):
    """export_onnx.py --page on `base` (a split twin) with a non-zero LoRA adapter; the merged model."""
    from sam_split import export_onnx

    base.save_pretrained(tmp / f"{name}-base")
    tuned = add_lora(type(base).from_pretrained(tmp / f"{name}-base"), rank=4, seed=1)
    tuned.save_pretrained(tmp / f"{name}-adapter")
    assert export_onnx.main(["--model", str(tmp / f"{name}-base"), "--adapter", str(tmp / f"{name}-adapter"),
                             "--output-dir", str(tmp / "site" / name), "--page"]) == 0
    return tuned.merge_and_unload().eval()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder served on 127.0.0.1: sam/ and sam2/ (exported with --page) and image.png at the models' input size (64),
    and the merged models."""
    require_browser()
    tmp = tmp_path_factory.mktemp("page")
    models = {
        "sam": export_with_page(tmp, SamSplitModel.from_sam(randomize_(random_stock_sam(), std=STD)), "sam"),
        "sam2": export_with_page(tmp, Sam2SplitModel.from_stock(
            randomize_(random_stock(__import__("transformers").Sam2Model, tiny_sam2_config()), std=STD)), "sam2"),
    }
    # a bright disc on a noisy dark background: something to segment
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    pixels = rng.integers(0, 60, (64, 64, 3))
    pixels[(yy - 28) ** 2 + (xx - 22) ** 2 < 14**2] += 170
    Image.fromarray(pixels.astype(np.uint8)).save(tmp / "site" / "image.png")
    return tmp / "site", models


class StaticServer:
    """`folder` over HTTP on 127.0.0.1 (Python's types: .mjs text/javascript, .wasm application/wasm)."""

    def __init__(self, folder: Path):
        handler = functools.partial(QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def reference(model, image: Image.Image, points, labels, box):
    """The merged PyTorch model on `image` and the prompt (image pixels): its highest-IoU mask's logits at the image's
    size, through the family's processor (`tools.processing.model_processor`), and that IoU score."""
    processor = model_processor(model.config)
    inputs = processor(images=image, return_tensors="pt")
    (height, width), (new_height, new_width) = inputs["original_sizes"][0].tolist(), (
        inputs["reshaped_input_sizes"][0].tolist() if "reshaped_input_sizes" in inputs else
        [model.config.prompt_encoder_config.image_size] * 2)
    scale = torch.tensor([new_width / width, new_height / height])
    prompts = {}
    if points:
        prompts["input_points"] = (torch.tensor(points, dtype=torch.float32) * scale)[None, None]
        prompts["input_labels"] = torch.tensor(labels)[None, None]
    if box:
        prompts["input_boxes"] = (torch.tensor(box, dtype=torch.float32).reshape(2, 2) * scale).reshape(1, 1, 4)
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], **prompts)
    extra = {"reshaped_input_sizes": inputs["reshaped_input_sizes"]} if "reshaped_input_sizes" in inputs else {}
    logits = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False, **extra)[0]
    best = int(outputs.iou_scores[0, 0].argmax())
    return logits[0, best].numpy(), float(outputs.iou_scores[0, 0, best])


def near_misses(points, labels, box):
    """What a slip in the page's handling of the prompt would have sent instead: each point 1 px off in x or in y,
    each label flipped, the box 1 px wider, the box dropped."""
    for i in range(len(points)):
        for shift in ((1.0, 0.0), (0.0, 1.0)):
            moved = [list(point) for point in points]
            moved[i] = [moved[i][0] + shift[0], moved[i][1] + shift[1]]
            yield moved, labels, box
        yield points, [1 - label if j == i else label for j, label in enumerate(labels)], box
    if box:
        yield points, labels, [*box[:2], box[2] + 1.0, box[3]]
        if points:
            yield points, labels, None


def compare(result: dict, model, image, points, labels, box) -> dict:
    """The page's mask against PyTorch's: equal but where PyTorch's logit is within TIE of the threshold 0. A tiny
    random model's binary masks hardly depend on the prompt, so the IoU score carries the check of the prompt: the
    page's must be 4x closer to PyTorch's than the score of any near miss of the prompt (`near_misses`; their scores
    move by a few fp32 ulps on SAM 2, hence 4x, not 10x)."""
    logits, score = reference(model, image, points, labels, box)
    mask = np.array(result["mask"], dtype=np.uint8).reshape(result["height"], result["width"])
    assert mask.shape == logits.shape
    differ = mask != (logits > 0)
    assert np.all(np.abs(logits[differ]) <= TIE), f"{differ.sum()} pixels differ, logits {logits[differ][:5]}"
    score_difference = abs(result["score"] - score)
    nearest_miss = min(abs(reference(model, image, *miss)[1] - score) for miss in near_misses(points, labels, box))
    assert score_difference * 4 < nearest_miss, (score_difference, nearest_miss)
    return {"differing_pixels": int(differ.sum()), "object_pixels": int(mask.sum()),
            "score_difference": score_difference, "nearest_miss": nearest_miss, "mask": mask}


SEGMENT = """async (prompt) => {
    const result = await window.segment(prompt);
    return {...result, mask: Array.from(result.mask)};
}"""


def open_page(browser, url: str, requests: list):
    tab = browser.new_page(viewport={"width": 900, "height": 800})
    tab.on("request", lambda request: requests.append(request.url))
    errors = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(url)
    tab.wait_for_function("window.ready !== undefined")
    tab.evaluate("() => window.ready")  # the model is loaded (rejects, and so raises, if it is not)
    assert not errors, errors
    return tab


def click_image(tab, x: float, y: float, button: str = "left"):
    """A real mouse click on the canvas at image pixel coordinates (x, y); waits for the page's segmentation."""
    box = tab.locator("#canvas").bounding_box()
    width, height = tab.evaluate("() => [canvas.width, canvas.height]")
    tab.mouse.click(box["x"] + x * box["width"] / width, box["y"] + y * box["height"] / height, button=button)
    tab.wait_for_function("window.pending !== undefined")
    tab.evaluate("() => window.pending")
    return tab.evaluate("() => ({...window.lastResult, mask: Array.from(window.lastResult.mask)})")


def check_member(tab, model, image, image_url: str, screenshot: Path | None = None) -> list[dict]:
    """Mouse clicks (a positive, then a right-click negative) and scripted prompts (point, box, points+box) on the
    page, each against PyTorch; the figures of each."""
    tab.evaluate("(url) => window.loadImage(url)", image_url)
    figures = []
    first = click_image(tab, 22.5, 28.5)
    assert first["points"] == [[22.5, 28.5]] and first["labels"] == [1]
    figures.append(compare(first, model, image, first["points"], first["labels"], None))
    if screenshot is not None:
        tab.screenshot(path=str(screenshot))
        # the download button saves the mask shown as a PNG at the image's size, white = object
        with tab.expect_download() as download:
            tab.click("#download")
        saved = np.array(Image.open(download.value.path()).convert("L"))
        assert download.value.suggested_filename == "mask.png"
        assert np.array_equal(saved, figures[0]["mask"] * 255)
    second = click_image(tab, 50.5, 50.5, button="right")
    assert second["points"] == [[22.5, 28.5], [50.5, 50.5]] and second["labels"] == [1, 0]
    figures.append(compare(second, model, image, second["points"], second["labels"], None))
    for prompt in ({"points": [[40.0, 12.0]], "labels": [1], "box": None},
                   {"points": [], "labels": [], "box": [8.0, 10.0, 40.0, 46.0]},
                   {"points": [[22.0, 28.0], [5.0, 60.0]], "labels": [1, 0], "box": [8.0, 10.0, 40.0, 46.0]}):
        result = tab.evaluate(SEGMENT, prompt)
        figures.append(compare(result, model, image, prompt["points"], prompt["labels"], prompt["box"]))
    return figures


@pytest.mark.slow
def test_page_segments_like_pytorch_in_headless_chromium(site, space, tmp_path):
    """SAM and SAM 2 folders written by --page, and a Space published by push.py --space, in one chromium: clicks
    and scripted prompts segment as the merged PyTorch model does; every request goes to 127.0.0.1."""
    sync_playwright = require_browser()
    folder, models = site
    image = Image.open(folder / "image.png").convert("RGB")
    server = StaticServer(folder)
    requests = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                                 args=CHROMIUM_ARGS)
            for name, model in models.items():
                tab = open_page(browser, f"{server.url}/{name}/index.html", requests)
                figures = check_member(tab, model, image, f"{server.url}/image.png",
                                       screenshot=tmp_path / "screenshot.png" if name == "sam2" else None)
                print(name, [{key: value for key, value in figure.items() if key != "mask"} for figure in figures])
                tab.close()
            # the Space, served by the test Hub as any repository's files, loads the model repo at the pinned sha
            hub, sha, model, _ = space
            tab = open_page(browser, f"{hub.url}/spaces/tester/sam-tiny-demo/resolve/main/index.html", requests)
            image_url = "data:image/png;base64," + base64.b64encode((folder / "image.png").read_bytes()).decode()
            figures = check_member(tab, model, image, image_url)
            print("space", [{key: value for key, value in figure.items() if key != "mask"} for figure in figures])
            assert tab.locator("#model").text_content() == f"Model: tester/sam-tiny at revision {sha}."
            tab.close()
            browser.close()
    finally:
        server.close()
    if os.environ.get("SAM_SPLIT_WRITE_SCREENSHOT") == "1":  # refresh docs/page-screenshot.png
        shutil.copyfile(tmp_path / "screenshot.png", DOCS_SCREENSHOT)
    # data: (the Space test's image) and blob: URLs of a 127.0.0.1 page (onnxruntime-web's) stay in the browser
    elsewhere = [url for url in requests if not url.startswith("data:")
                 and urlsplit(url.removeprefix("blob:")).hostname != "127.0.0.1"]
    assert requests and not elsewhere, elsewhere
    assert any(url.endswith("/sam2/onnx/prompt_encoder_mask_decoder.onnx") for url in requests)
    assert any(url.endswith(f"/tester/sam-tiny/resolve/{sha}/onnx/vision_encoder.onnx") for url in requests)
    assert any(url.endswith("/vendor/ort-wasm-simd-threaded.asyncify.wasm") for url in requests)


def test_page_files_are_written_beside_the_graphs(site):
    folder, _ = site
    files = {str(path.relative_to(folder / "sam")) for path in (folder / "sam").rglob("*") if path.is_file()}
    assert {"index.html", "page.js", "page-config.json", "vendor/transformers.min.js",
            "vendor/ort-wasm-simd-threaded.asyncify.mjs", "vendor/ort-wasm-simd-threaded.asyncify.wasm",
            "onnx/vision_encoder.onnx", "config.json"} <= files
    assert (folder / "sam" / "page-config.json").read_text().strip() == '{\n  "model": "."\n}'
    # the page imports only what it carries, and names no other host
    script = (folder / "sam" / "page.js").read_text()
    assert re.findall(r"^import .* from '([^']+)';$", script, re.MULTILINE) == ["./vendor/transformers.min.js"]
    assert "http" not in (folder / "sam" / "index.html").read_text()


def test_missing_transformers_js_is_one_line_before_anything_slow(tmp_path):
    SamSplitModel.from_sam(random_stock_sam()).save_pretrained(tmp_path / "base")
    code = (f"import sys; from sam_split import export_onnx; sys.exit(export_onnx.main(['--model', "
            f"{str(tmp_path / 'base')!r}, '--output-dir', {str(tmp_path / 'out')!r}, '--page', '--transformers-js', "
            f"{str(tmp_path / 'nowhere')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    missing = tmp_path / "nowhere" / "@huggingface/transformers/dist/transformers.min.js"
    assert result.stderr.strip().splitlines() == [
        f"error: the page needs transformers.js and onnxruntime-web, but {missing} is missing: {page.INSTALL_HINT}"]
    assert "Loading" not in result.stdout and not (tmp_path / "out").exists()


def test_space_is_one_static_commit_naming_the_pinned_model(space):
    """push.py --space: the Space holds the page and a README whose front matter makes it a static Space linked to the
    model repo; page-config.json pins the model commit that push.py just made; one commit."""
    hub, sha, _, stdout = space
    repo = "tester/sam-tiny-demo"
    assert hub.git(repo, "rev-list", "--count", "main", repo_type="space") == "2"  # the Hub's initial commit + ours
    files = set(hub.git(repo, "ls-tree", "-r", "--name-only", "main", repo_type="space").split())
    assert files == {".gitattributes", "README.md", "index.html", "page.js", "page-config.json",
                     "vendor/transformers.min.js", "vendor/ort-wasm-simd-threaded.asyncify.mjs",
                     "vendor/ort-wasm-simd-threaded.asyncify.wasm"}
    readme = hub.git(repo, "show", "main:README.md", repo_type="space")
    assert readme.startswith(
        "---\ntitle: sam-tiny-demo\nsdk: static\napp_file: index.html\nmodels: [tester/sam-tiny]\n---")
    config = json.loads(hub.git(repo, "show", "main:page-config.json", repo_type="space"))
    assert config == {"model": "tester/sam-tiny", "revision": sha, "remote_host": hub.url + "/"}
    assert "Space: committed" in stdout and f"it loads tester/sam-tiny at {sha}" in stdout


@pytest.mark.parametrize("args, message", [
    (["--repo-id", "a/b", "--space", "a/b..c"], "--space 'a/b..c'"),
    (["--space", "a/demo", "--no-push", "--output-dir", "out"], "drop --no-push and --create-pr"),
    (["--repo-id", "a/b", "--space", "a/demo", "--create-pr"], "drop --no-push and --create-pr"),
    (["--repo-id", "a/b", "--transformers-js", "node_modules"], "--transformers-js needs --space"),
])
def test_space_arguments_are_checked_at_parse_time(args, message, capsys):
    from sam_split import push

    with pytest.raises(SystemExit):
        push.parse_args(["--source", "random:vit-base", *args])
    assert message in capsys.readouterr().err


def test_space_implies_onnx():
    from sam_split import push

    assert push.parse_args(["--source", "random:vit-base", "--repo-id", "a/b", "--space", "a/demo"]).onnx
