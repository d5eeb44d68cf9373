#!/usr/bin/env python3
"""Export a SamSplitModel, Sam2SplitModel or Sam3TrackerModel (a LoRA adapter merged in) to ONNX for onnxruntime
and transformers.js.

    python export_onnx.py --model ORG/sam-vit-base-split --revision BASE_SHA \\
        --adapter ORG/my-adapter --adapter-revision ADAPTER_SHA --output-dir sam-onnx [--dtype fp16] [--quantize]

The output folder holds `onnx/vision_encoder.onnx` and `onnx/prompt_encoder_mask_decoder.onnx` in transformers.js'
layout for the model (SAM: pixel_values -> image_embeddings, image_positional_embeddings; those, input_points,
input_labels, input_boxes -> iou_scores, pred_masks. SAM 2: pixel_values -> image_embeddings.0/.1/.2; those,
input_labels, input_points, input_boxes -> iou_scores, pred_masks, object_score_logits; see tools/onnx_export.py),
`_fp16` / `_quantized` variants on request, `config.json`,
`preprocessor_config.json` and a model card naming the base and adapter revisions. Before the folder appears,
onnxruntime runs every graph on point and box prompts at batch 1 and 2 and must match the merged PyTorch model
(fp32: --atol, default 1e-4); otherwise nothing is written. Needs the `onnx` extra: pip install -e ".[onnx]".

--page also writes a click-to-segment page into the folder (index.html, page.js, page-config.json, vendor/ with
transformers.min.js and onnxruntime-web's wasm, taken from --transformers-js, an npm node_modules folder holding
@huggingface/transformers; default tests/js/node_modules). Serve the folder (python -m http.server) and open it; see
docs/page.md.
"""

import argparse
import math
import sys
import time
from pathlib import Path

from sam_split.tools.cli import ToolError, run_tool, step
from sam_split.tools.files import atomic_output_dir

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SamSplitModel, Sam2SplitModel or a stock Sam3TrackerModel: a "
                                                       "local folder, a Hub id or random:<size>")
    parser.add_argument("--revision", help="branch, tag or commit of a Hub --model")
    parser.add_argument("--adapter", help="PEFT LoRA adapter (folder or Hub id), merged into the model before export")
    parser.add_argument("--adapter-revision", help="branch, tag or commit of a Hub --adapter")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="merge an adapter trained on another family member (e.g. SAM's into the SAM-HQ twin)")
    parser.add_argument("--output-dir", required=True, type=Path, help="new folder to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="fp16 also writes onnx/*_fp16.onnx (fp16 weights, fp32 inputs and outputs)")
    parser.add_argument("--quantize", action="store_true",
                        help="also write onnx/*_quantized.onnx (onnxruntime dynamic int8 quantization)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed abs difference of the fp32 graphs' outputs from PyTorch's (default 1e-4)")
    parser.add_argument("--page", action="store_true",
                        help="also write the click-to-segment page (index.html ...) into the folder; see docs/page.md")
    parser.add_argument("--transformers-js", type=Path, metavar="NODE_MODULES",
                        help="node_modules folder with @huggingface/transformers (and onnxruntime-web) for --page "
                             "(default: tests/js/node_modules)")
    args = parser.parse_args(argv)
    if args.transformers_js and not args.page:
        parser.error("--transformers-js needs --page")
    if args.adapter_revision and not args.adapter:
        parser.error("--adapter-revision needs --adapter")
    if not (math.isfinite(args.atol) and args.atol > 0):  # inf or nan would turn the verification off
        parser.error(f"--atol must be a finite positive number, got {args.atol}")
    return args


def load_merged(model, adapter, allow_other_base: bool = False):
    """The split twin at `model` (a `Location`; the class its config names) with the adapter at `adapter` merged in
    (PEFT merge_and_unload; applied in full or refused: `models.load_adapter`), fp32, eval mode."""
    from sam_split.tools.models import load_adapter, load_model

    try:
        base = load_model(model)
    except (OSError, ValueError) as error:
        raise ToolError(f"--model {model}: cannot load it as a split-q/k/v model: {str(error).splitlines()[0]}"
                        ) from error
    if adapter is None:
        return base.float().eval()
    try:
        import peft  # noqa: F401 - only to say how to install it
    except ImportError:
        raise ToolError('--adapter needs peft: pip install -e ".[lora]"') from None
    return load_adapter(base, adapter, allow_other_base=allow_other_base).merge_and_unload().float().eval()


def preprocessor_config(model, config) -> dict:
    """The model's own preprocessor_config.json where it has one, else its family's standard one."""
    import json

    from sam_split.tools.family import member_for_config

    default = member_for_config(config).processor_config(config)
    if model.kind == "random":
        return default
    if model.kind == "local":
        path = Path(model.name) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else default
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(model.name, "preprocessor_config.json", revision=model.revision)
        return json.loads(Path(path).read_text())
    except EntryNotFoundError:
        return default


def model_card(model, adapter, differences: dict, files: list[str], prompts_note: str) -> str:
    def described(location):
        if location.kind == "random":
            return f"`{location.name}` (random weights)"
        return (f"`{location.name}` (revision `{location.revision or 'main, unpinned'}`)"
                if location.is_hub else f"the local folder `{Path(location.name).name}`")

    lines = [
        "---", "library_name: transformers.js", "pipeline_tag: mask-generation",
        "tags: [sam, segment-anything, onnx]", "---", "",
        f"# {Path(model.name).name}, exported to ONNX", "",
        f"Base model: {described(model)}.",
        f"Adapter: {described(adapter)}, merged into the base (PEFT `merge_and_unload`) before export." if adapter
        else "Adapter: none.", "",
        "Exported with sam-split's `export_onnx.py` and verified in onnxruntime against the PyTorch model (point, box "
        "and point+box prompts, batch 1 and 2); largest abs differences:", "",
    ]
    lines += [f"- {variant}: " + ", ".join(f"{name} {value:.1e}" for name, value in diffs.items())
              for variant, diffs in differences.items()]
    lines += ["", "Files:", ""] + [f"- `{name}`" for name in files]
    lines += ["", f"{prompts_note} See sam-split's README, section Deploy.", ""]
    return "\n".join(lines)


def export(args) -> None:
    from sam_split.tools import onnx_export, page

    onnx_export.require_onnx()  # before anything slow
    assets = page.find_assets(args.transformers_js) if args.page else None
    from sam_split.tools.models import resolve_adapter, resolve_model

    # The resolver says what each argument holds: an adapter given as --model is refused, not exported as a merge
    # that its card would call "Adapter: none".
    model_location = resolve_model(args.model, args.revision, flag="--model", revision_flag="--revision")
    adapter_location = resolve_adapter(args.adapter, args.adapter_revision)[0] if args.adapter else None
    variants = ("fp32",) + (("fp16",) if args.dtype == "fp16" else ()) + (("quantized",) if args.quantize else ())
    started = time.monotonic()
    with atomic_output_dir(args.output_dir) as folder:
        step(f"Loading {model_location}" + (f" and merging the adapter {adapter_location}" if adapter_location else ""))
        model = load_merged(model_location, adapter_location, args.allow_other_base)
        differences = onnx_export.export_model(model, folder, variants, atol=args.atol)
        files = sorted(str(path.relative_to(folder)) for path in (folder / "onnx").iterdir())
        preprocessor = preprocessor_config(model_location, model.config)
        card = model_card(model_location, adapter_location, differences, files,
                          onnx_export.export_spec(model.config).prompts_note)
        onnx_export.write_metadata(folder, model, preprocessor, card)
        if assets is not None:
            files += page.write_page(folder, assets, page.page_config())
    step(f"Wrote {args.output_dir} in {time.monotonic() - started:.0f} s: " + ", ".join(files))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
