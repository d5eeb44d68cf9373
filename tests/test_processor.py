"""The processor a SAM 2 twin's repository ships (`processing_sam2_split.py`, named by its processor configs'
`auto_map`): `AutoProcessor.from_pretrained(repo, trust_remote_code=True)` loads it without torchvision, from a folder
and from the test Hub, with no deprecation warning; it equals transformers' own SAM 2 processor where torchvision
exists (`-m torchvision`), and the stock processor still loads from the same repository there without remote code."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer
from PIL import Image
from sam_testing import hub_env, run_python

from sam_split import push
from sam_split.processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitProcessor
from sam_split.tools.compat import sam2_image_processor
from sam_split.tools.family import member_for_random, random_stock_model

TOKEN = "secret-token"
SIZES = [(48, 64), (64, 64), (30, 170), (200, 150)]  # enlarged, kept, and shrunk along one or both sides


def processor_inputs(height: int, width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 3 : width // 2] = 1
    return {"images": image, "segmentation_maps": Image.fromarray(mask),
            "input_boxes": [[[2, 3, width // 2, height // 2]]], "input_points": [[[[width // 3, height // 3]]]],
            "input_labels": [[[1]]], "return_tensors": "pt"}


def run_all(processor) -> dict:
    """Every size through `processor`, and mask post-processing of fixed logits."""
    results = {}
    logits = torch.randn(1, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for height, width in SIZES:
        outputs = dict(processor(**processor_inputs(height, width)))
        outputs["masks"] = processor.post_process_masks(logits.clone(), outputs["original_sizes"])[0]
        results[height, width] = outputs
    return results


@pytest.fixture(scope="module")
def sam2_repo(tmp_path_factory) -> Path:
    """The processor files push.py writes into a SAM 2.1 twin's repository (random:sam2.1-tiny: 256x256 images)."""
    folder = tmp_path_factory.mktemp("sam2-repo")
    member, stock = random_stock_model("sam2.1-tiny")
    push.write_processor_files(push.parse_source("random:sam2.1-tiny", None), folder, member, stock.config)
    return folder


# A fresh process in which torchvision cannot be imported, even where it is installed: `find_spec` answers None for a
# module that `sys.modules` maps to None, so transformers takes it as missing.
NO_TORCHVISION = 'import sys\nsys.modules["torchvision"] = None\n'
LOAD = NO_TORCHVISION + textwrap.dedent("""
    import json, numpy as np, torch
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained({name!r}, trust_remote_code=True{revision})
    inputs = processor(images=np.full((48, 64, 3), 200, np.uint8), input_points=[[[[10, 20]]]], input_labels=[[[1]]],
                       return_tensors="pt")
    torch.save(dict(inputs), {saved!r})
    print("LOADED", json.dumps([type(processor).__name__, type(processor).__module__,
                                type(processor.image_processor).__name__]))
    try:
        AutoProcessor.from_pretrained({name!r}{revision})
    except Exception as error:
        print("STOCK FAILS", type(error).__name__)
""")


def check_loaded(output: str, saved: Path) -> None:
    name, module, image_processor = json.loads(output.split("LOADED ", 1)[1].splitlines()[0])
    assert (name, image_processor) == ("Sam2SplitProcessor", "Sam2SplitImageProcessor")
    assert module.startswith("transformers_modules.")  # the repository's copy, not this package
    # transformers' own would need torchvision: the repository's processor is what makes it load
    assert "STOCK FAILS" in output
    expected = Sam2SplitProcessor(image_processor=Sam2SplitImageProcessor(256, 64))(
        images=np.full((48, 64, 3), 200, np.uint8), input_points=[[[[10, 20]]]], input_labels=[[[1]]],
        return_tensors="pt")
    loaded = torch.load(saved)
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_the_repository_names_its_processor_and_ships_its_code(sam2_repo):
    config = json.loads((sam2_repo / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_sam2_split.Sam2SplitProcessor",
                                  "AutoImageProcessor": "processing_sam2_split.Sam2SplitImageProcessor"}
    # the stock names stay (transformers' processor where torchvision exists); the 5.x image processor name, as the
    # legacy `Sam2ImageProcessorFast` is deprecated there and would stop 4.57 before it reads auto_map
    assert (config["processor_class"], config["image_processor_type"]) == ("Sam2Processor", "Sam2ImageProcessor")
    assert config["size"] == {"height": 256, "width": 256} and config["mask_size"] == {"height": 64, "width": 64}
    assert {"processing_sam2_split.py", "compat.py"} <= {path.name for path in sam2_repo.glob("*.py")}
    assert member_for_random("sam-tiny").processor_auto_map is None  # SAM's own processor needs no torchvision


def test_auto_processor_loads_it_from_a_folder_without_torchvision(sam2_repo, tmp_path):
    saved = tmp_path / "inputs.pt"
    output = run_python(LOAD.format(name=str(sam2_repo), revision="", saved=str(saved)),
                        env={"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    check_loaded(output, saved)


def test_loading_it_logs_no_deprecation(sam2_repo, tmp_path):
    """transformers 5.2x warns for a processor class attribute `image_processor_class` and for `...Fast` image
    processor names; neither is used (on 4.57 the attribute is needed and set: `compat.accept_any_image_processor`)."""
    code = NO_TORCHVISION + textwrap.dedent(f"""
        from transformers import AutoProcessor
        AutoProcessor.from_pretrained({str(sam2_repo)!r}, trust_remote_code=True)
    """)
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
                                 "TRANSFORMERS_VERBOSITY": "warning"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecat" not in result.stderr.lower(), result.stderr[-3000:]


@pytest.mark.slow
def test_auto_processor_loads_it_from_a_pushed_repository_without_torchvision(tmp_path):
    """push.py publishes a SAM 2.1 twin to the test Hub (without HF_HUB_DISABLE_XET); a fresh process without
    torchvision loads its processor pinned to the commit."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        env = hub_env(hub.url, tmp_path / "push-home", token=TOKEN)
        del env["HF_HUB_DISABLE_XET"]  # not needed for this Hub (README "Publish with push.py")
        result = subprocess.run([sys.executable, str(root / "push.py"), "--source", "random:sam2.1-tiny", "--repo-id",
                                 "tester/sam2-tiny-split"], env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        sha = result.stdout.split("Committed ", 1)[1].split()[0]
        saved = tmp_path / "inputs.pt"
        output = run_python(LOAD.format(name="tester/sam2-tiny-split", revision=f", revision={sha!r}",
                                        saved=str(saved)),
                            env=hub_env(hub.url, tmp_path / "home", token=TOKEN), replace_env=True)
    check_loaded(output, saved)


@pytest.mark.torchvision
def test_it_equals_transformers_processor():
    """Against transformers' torchvision SAM 2 processor (same sizes): labels, prompts, original sizes and
    post-processed masks equal; pixel values equal where the image is enlarged or kept, within one grey level where
    it is shrunk (antialiased bilinear in torchvision and in PIL, rounded differently)."""
    pytest.importorskip("torchvision")
    stock = sam2_image_processor(256, 64)
    assert not isinstance(stock, Sam2SplitProcessor)
    ours = Sam2SplitProcessor(image_processor=Sam2SplitImageProcessor(256, 64))
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for size, a in run_all(stock).items():
        b = run_all(ours)[size]
        assert sorted(a) == sorted(b)
        for key in ("labels", "original_sizes", "input_boxes", "input_points", "input_labels", "masks"):
            assert torch.equal(a[key], b[key]), (size, key)
        grey = ((a["pixel_values"] - b["pixel_values"]) * std * 255).abs().max().item()
        assert grey <= (1e-3 if size[0] <= 64 and size[1] <= 64 else 1.0 + 1e-3), (size, grey)


@pytest.mark.torchvision
def test_the_stock_processor_still_loads_from_the_repository_where_torchvision_exists(sam2_repo, tmp_path):
    pytest.importorskip("torchvision")
    output = run_python(textwrap.dedent(f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(sam2_repo)!r})
        print("STOCK", type(processor).__name__, type(processor).__module__, type(processor.image_processor).__name__)
    """), env={"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    name, module, image_processor = output.split("STOCK ", 1)[1].split()[:3]
    assert name == "Sam2Processor" and module.startswith("transformers.") and image_processor.startswith(
        "Sam2ImageProcessor")
