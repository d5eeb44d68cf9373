"""ONNX export of a SAM model (an adapter merged first) in the layout transformers.js and optimum users know, verified
in onnxruntime before anything is called done.

A model folder gets `onnx/<graph>.onnx` per graph of its `ExportSpec`, plus `<graph>_fp16.onnx` and
`<graph>_quantized.onnx` on request (the names transformers.js looks up for `dtype: "fp16"` and `"q8"`). SAM's spec
(`SAM_SPEC`) has two graphs:
- `vision_encoder`: `pixel_values` -> `image_embeddings`, `image_positional_embeddings`;
- `prompt_encoder_mask_decoder`: `image_embeddings`, `image_positional_embeddings`, `input_points`, `input_labels`,
  `input_boxes` -> `iou_scores`, `pred_masks` (three masks per prompt, as SamModel's default `multimask_output`).
Every input must be fed (transformers.js and onnxruntime refuse a declared input left out), so "no box" is
`input_boxes` of -1s (batch_size, point_batch_size, 4) and "no points" empty `input_points` (batch_size,
point_batch_size, 0, 2) and `input_labels` (batch_size, point_batch_size, 0): the graph then computes exactly what
SamModel computes without them (`sam_graph_prompts`).

SAM 2's spec (`SAM2_SPEC`) follows transformers.js' SAM 2 model: `vision_encoder` gives `image_embeddings.0/.1/.2`,
and `prompt_encoder_mask_decoder` takes them with `input_labels`, `input_points`, `input_boxes` in the shapes
transformers.js fills in (`Sam2PromptMaskDecoderGraph`) and adds `object_score_logits`. A member of the family adds
its own `ExportSpec` to `EXPORT_SPECS` under its `model_type`: its graph wrappers, names, dynamic dimensions,
verification cases and the config.json type transformers.js reads. The SAM 3 tracker's (`SAM3_TRACKER_SPEC`) is SAM
2's under its own model_type. SAM-HQ has none (transformers.js has no SAM-HQ).

onnx, onnxscript and onnxruntime are the `onnx` extra, imported here only when an export runs (`require_onnx`).
"""

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .cli import ToolError, step

INSTALL_HINT = 'pip install -e ".[onnx]" (or: pip install onnx onnxscript onnxruntime)'
# One protobuf file holds at most 2 GB: larger graphs keep their weights in `<file>.onnx_data` (transformers.js' name).
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # 2 GiB less a margin for the graph itself
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "quantized": 1.0}  # max abs difference of outputs (see README "Deploy")
VARIANT_SUFFIX = {"fp32": "", "fp16": "_fp16", "quantized": "_quantized"}


def require_onnx() -> None:
    """Import the `onnx` extra's packages, or raise one `ToolError` line saying how to install them."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ToolError(f"exporting to ONNX needs the package {name}: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------------ SAM's two graphs


class SamVisionEncoderGraph(nn.Module):
    """pixel_values -> image_embeddings, image_positional_embeddings (the latter repeated per image, as SamModel
    feeds its decoder)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        image_embeddings = self.model.vision_encoder(pixel_values)[0]
        positional = self.model.get_image_wide_positional_embeddings().repeat(pixel_values.shape[0], 1, 1, 1)
        return image_embeddings, positional


class SamPromptMaskDecoderGraph(nn.Module):
    """image_embeddings, image_positional_embeddings, input_points, input_labels, input_boxes -> iou_scores,
    pred_masks, as SamModel computes them from those prompts.

    One graph serves every prompt, as transformers.js feeds every input a graph declares: points alone (boxes all
    negative, SAM's "no box": the points plus SAM's padding point), a box alone (zero points: the two corner tokens)
    and both (points, then the corners). The decoder runs on both token sets and the outputs are selected, no control
    flow: the decoder is a small part of SAM's cost."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, image_positional_embeddings, input_points, input_labels, input_boxes):
        prompt_encoder = self.model.prompt_encoder
        batch_size, point_batch_size = input_points.shape[:2]
        points = prompt_encoder._embed_points(input_points, input_labels, pad=False)  # (batch, point batch, N, hidden)
        corners = prompt_encoder._embed_boxes(input_boxes)  # (batch, point batch, 2, hidden)
        # SAM's padding point (label -1, added where there is no box) embeds as exactly `not_a_point_embed`
        padding = prompt_encoder.not_a_point_embed.weight.to(points.dtype).expand(batch_size, point_batch_size, 1, -1)
        # Every (image, prompt) pair is decoded as an image of its own with one prompt, as SamMaskDecoder computes
        # each pair independently: its graph, traced with a point batch of 2 or more, fails in onnxruntime on a batch
        # of several images with several prompts each (a MatMul that cannot broadcast).
        pairs = batch_size * point_batch_size

        def per_pair(tensor):
            return tensor[:, None].expand(-1, point_batch_size, *tensor.shape[1:]).flatten(0, 1)

        image_embeddings = per_pair(image_embeddings)
        image_positional_embeddings = per_pair(image_positional_embeddings)
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            pairs, -1, *prompt_encoder.image_embedding_size
        )
        outputs = [
            self.model.mask_decoder(
                image_embeddings=image_embeddings, image_positional_embeddings=image_positional_embeddings,
                sparse_prompt_embeddings=torch.cat([points, extra], dim=2).flatten(0, 1)[:, None],
                dense_prompt_embeddings=dense, multimask_output=True,
            )[:2]
            for extra in (corners, padding)
        ]
        has_boxes = (input_boxes >= 0).any()
        (masks_boxes, iou_boxes), (masks_points, iou_points) = outputs
        iou_scores = torch.where(has_boxes, iou_boxes, iou_points)
        pred_masks = torch.where(has_boxes, masks_boxes, masks_points)
        return (iou_scores.reshape(batch_size, point_batch_size, *iou_scores.shape[2:]),
                pred_masks.reshape(batch_size, point_batch_size, *pred_masks.shape[2:]))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file: the module that computes it from the model, its input and output names, its dynamic dimensions
    ({input name: {axis: dimension name}}) and example inputs for tracing (sizes >= 2 on every dynamic axis, so that
    none is taken for a constant)."""

    name: str
    module: Callable[[nn.Module], nn.Module]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict
    example_inputs: Callable[[object], tuple]
    optimize: bool = True  # run onnxscript's graph optimizer (onnxruntime optimizes again when it loads a graph)


# The verification cases of every export: (images, prompt kind), see `sam_prompts`.
VERIFICATION_CASES = ((1, "points"), (1, "box"), (2, "points+box"), (2, "points"))


@dataclass(frozen=True)
class ExportSpec:
    """A model family's export: its graphs, in the order they run (graphs after the first take the outputs of earlier
    ones where they share names); `reference(model, pixel_values, prompts)`, the outputs the graphs must give, by
    name; `graph_prompts(prompts, batch_size)`, the model's prompts as the decoder graph takes them."""

    graphs: tuple[GraphSpec, ...]
    reference: Callable[[nn.Module, torch.Tensor, dict], dict]
    graph_prompts: Callable[[dict, int], dict]
    model_type: str  # config.json's, as transformers.js picks the model class by it
    architecture: str
    prompts_note: str  # how to feed the decoder, for the model card


def _encoder_example(config) -> tuple:
    """Two RGB images at the model's input size (every member has it in its prompt encoder's config)."""
    size = config.prompt_encoder_config.image_size
    return (torch.randn(2, 3, size, size),)


def _sam_decoder_example(config) -> tuple:
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    # batch 2, point batch 3, 4 points: distinct sizes, so that the tracer cannot take one dimension for another
    embeddings = torch.randn(2, vision.output_channels, grid, grid)
    points = torch.rand(2, 3, 4, 2) * vision.image_size
    boxes = torch.tensor([[10.0, 10.0, 40.0, 50.0]]).repeat(2, 3, 1)
    return embeddings, torch.randn_like(embeddings), points, torch.ones(2, 3, 4, dtype=torch.int64), boxes


def sam_prompts(config, batch_size: int, kind: str) -> dict:
    """Fixed prompts for `batch_size` images: "points" (two points, one positive, one negative), "box" or both
    ("points+box", two prompts per image), as SamModel takes them (absent ones left out)."""
    size = config.prompt_encoder_config.image_size  # every member has it there
    point_batch = 2 if kind == "points+box" else 1
    generator = torch.Generator().manual_seed(batch_size)
    prompts = {}
    if "points" in kind:
        prompts["input_points"] = torch.rand(batch_size, point_batch, 2, 2, generator=generator) * size
        prompts["input_labels"] = torch.tensor([1, 0]).repeat(batch_size, point_batch, 1)
    if "box" in kind:
        corners = torch.sort(torch.rand(batch_size, point_batch, 2, 2, generator=generator) * size, dim=2).values
        prompts["input_boxes"] = corners.reshape(batch_size, point_batch, 4)
    return prompts


def sam_graph_prompts(prompts: dict, batch_size: int) -> dict:
    """SamModel's prompts as the decoder graph takes them: every input present (no points: zero of them; no box:
    -1s), labels int64."""
    point_batch = (prompts.get("input_points", prompts.get("input_boxes"))).shape[1]
    return {
        "input_points": prompts.get("input_points", torch.zeros(batch_size, point_batch, 0, 2)),
        "input_labels": prompts.get("input_labels", torch.zeros(batch_size, point_batch, 0)).long(),
        "input_boxes": prompts.get("input_boxes", -torch.ones(batch_size, point_batch, 4)),
    }


def sam_reference(model, pixel_values, prompts: dict) -> dict:
    """What the graphs must output: SamModel's image embeddings, and its masks and IoU scores for `prompts`."""
    with torch.no_grad():
        embeddings = model.vision_encoder(pixel_values)[0]
        outputs = model(image_embeddings=embeddings, **prompts)
    return {"image_embeddings": embeddings, "iou_scores": outputs.iou_scores, "pred_masks": outputs.pred_masks}


SAM_SPEC = ExportSpec(
    graphs=(
        GraphSpec("vision_encoder", SamVisionEncoderGraph, ("pixel_values",),
                  ("image_embeddings", "image_positional_embeddings"), {"pixel_values": {0: "batch_size"}},
                  _encoder_example),
        GraphSpec("prompt_encoder_mask_decoder", SamPromptMaskDecoderGraph,
                  ("image_embeddings", "image_positional_embeddings", "input_points", "input_labels", "input_boxes"),
                  ("iou_scores", "pred_masks"),
                  {"image_embeddings": {0: "batch_size"}, "image_positional_embeddings": {0: "batch_size"},
                   "input_points": {0: "batch_size", 1: "point_batch_size", 2: "num_points"},
                   "input_labels": {0: "batch_size", 1: "point_batch_size", 2: "num_points"},
                   "input_boxes": {0: "batch_size", 1: "point_batch_size"}},
                  # onnxscript's optimizer ran for over 7 minutes on this graph at a tiny size (torch 2.13,
                  # onnxscript 0.7.2) and onnxruntime applies its own optimizations anyway
                  _sam_decoder_example, optimize=False),
    ),
    reference=sam_reference,
    graph_prompts=sam_graph_prompts,
    model_type="sam",
    architecture="SamModel",
    prompts_note="Every decoder input must be given: no box is `input_boxes` of -1s, no points are zero points "
                 "(`input_points` of shape (batch, point_batch, 0, 2)).",
)
# ---------------------------------------------------------------------------------------------- SAM 2's two graphs


class Sam2VisionEncoderGraph(nn.Module):
    """pixel_values -> image_embeddings.0, .1, .2: Sam2Model's three feature levels as its mask decoder reads them
    (`get_image_embeddings`: the two high-resolution levels projected, the last with the no-memory embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return tuple(self.model.get_image_embeddings(pixel_values))


class Sam2PromptMaskDecoderGraph(nn.Module):
    """image_embeddings.0/.1/.2, input_labels, input_points, input_boxes -> iou_scores, pred_masks,
    object_score_logits, as Sam2Model computes them from those prompts.

    transformers.js (`Sam2Model.forward`) feeds every input, filling what the app left out: points alone come with
    `input_boxes` of shape (batch, 0, 4); a box alone with `input_points` (batch, 1, 0, 2) and `input_labels` (batch,
    boxes, 0); both with as many boxes as point batches. So the prompt batch is the labels' second dimension (points
    broadcast against them, as in `_embed_points`), and the box corners are gathered per prompt from the boxes plus
    one stand-in row, which the prompts take when there is no box (its decode is then discarded). As for SAM, the
    decoder runs with the box tokens and without them and the outputs are selected, with no control flow: points
    alone are the points and Sam2's padding point, a box alone its two corners and its padding point, both the points
    then the corners and the padding point. `input_labels` comes first so that the prompt batch is read from it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeddings_0, embeddings_1, embeddings_2, input_labels, input_points, input_boxes):
        prompt_encoder = self.model.prompt_encoder
        batch_size, prompt_batch = input_labels.shape[:2]
        points = prompt_encoder._embed_points(input_points, input_labels, pad=False)  # (batch, prompts, N, hidden)
        padding = prompt_encoder.not_a_point_embed.weight.to(points.dtype).expand(batch_size, prompt_batch, 1, -1)
        stand_in = input_boxes.new_zeros(batch_size, 1, 4)  # the box of prompts without one
        corners = prompt_encoder._embed_boxes(torch.cat([input_boxes, stand_in], dim=1))[:, :, :2]
        box_count = torch.ones_like(input_boxes[0, :, 0], dtype=torch.int64).sum()  # 0 when there is no box
        rows = torch.minimum(torch.arange(prompt_batch, device=input_labels.device), box_count)
        corners = corners[:, rows]  # (batch, prompts, 2, hidden): the prompt's box, or the stand-in
        pairs = batch_size * prompt_batch

        def per_pair(tensor):  # each (image, prompt) pair decoded as an image of its own, as for SAM
            return tensor[:, None].expand(-1, prompt_batch, *tensor.shape[1:]).flatten(0, 1)

        positional = self.model.get_image_wide_positional_embeddings().expand(pairs, -1, -1, -1)
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            pairs, -1, *prompt_encoder.image_embedding_size
        )
        high_resolution = [per_pair(embeddings_0), per_pair(embeddings_1)]
        outputs = [
            self.model.mask_decoder(
                image_embeddings=per_pair(embeddings_2), image_positional_embeddings=positional,
                sparse_prompt_embeddings=torch.cat([points, *extra, padding], dim=2).flatten(0, 1)[:, None],
                dense_prompt_embeddings=dense, multimask_output=True, high_resolution_features=high_resolution,
            )
            for extra in ((corners,), ())
        ]
        has_boxes = box_count > 0
        results = []
        for with_boxes, without in zip(*[(masks, iou, object_scores) for masks, iou, _, object_scores in outputs]):
            selected = torch.where(has_boxes, with_boxes, without)
            results.append(selected.reshape(batch_size, prompt_batch, *selected.shape[2:]))
        pred_masks, iou_scores, object_score_logits = results
        return iou_scores, pred_masks, object_score_logits


SAM2_LEVELS = ("image_embeddings.0", "image_embeddings.1", "image_embeddings.2")


def _sam2_embedding_shapes(config) -> list:
    """(channels, height, width) of each of the three feature levels."""
    sizes = config.vision_config.backbone_feature_sizes
    channels = (config.mask_decoder_config.hidden_size // 8, config.mask_decoder_config.hidden_size // 4,
                config.vision_config.fpn_hidden_size)
    return [(channel, *size) for channel, size in zip(channels, sizes)]


def _sam2_decoder_example(config) -> tuple:
    # batch 2, prompt batch 3, 4 points, 3 boxes: sizes >= 2, distinct where they may differ
    embeddings = [torch.randn(2, *shape) for shape in _sam2_embedding_shapes(config)]
    size = config.prompt_encoder_config.image_size
    points = torch.rand(2, 3, 4, 2) * size
    boxes = torch.tensor([[10.0, 10.0, 40.0, 50.0]]).repeat(2, 3, 1)
    return (*embeddings, torch.ones(2, 3, 4, dtype=torch.int64), points, boxes)


def sam2_graph_prompts(prompts: dict, batch_size: int) -> dict:
    """Sam2Model's prompts as transformers.js feeds the decoder graph: no box is (batch, 0, 4) boxes; no points is
    (batch, 1, 0, 2) points with (batch, boxes, 0) labels; labels int64."""
    if "input_points" not in prompts:
        boxes = prompts["input_boxes"]
        return {"input_labels": -torch.ones(batch_size, boxes.shape[1], 0, dtype=torch.int64),
                "input_points": torch.zeros(batch_size, 1, 0, 2), "input_boxes": boxes}
    return {"input_labels": prompts["input_labels"].long(), "input_points": prompts["input_points"],
            "input_boxes": prompts.get("input_boxes", torch.zeros(batch_size, 0, 4))}


def sam2_reference(model, pixel_values, prompts: dict) -> dict:
    """What the graphs must output: Sam2Model's three feature levels, and its masks, IoU and object scores."""
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixel_values)
        outputs = model(image_embeddings=embeddings, **prompts)
    return {**dict(zip(SAM2_LEVELS, embeddings)), "iou_scores": outputs.iou_scores, "pred_masks": outputs.pred_masks,
            "object_score_logits": outputs.object_score_logits}


SAM2_SPEC = ExportSpec(
    graphs=(
        GraphSpec("vision_encoder", Sam2VisionEncoderGraph, ("pixel_values",), SAM2_LEVELS,
                  {"pixel_values": {0: "batch_size"}}, _encoder_example),
        GraphSpec("prompt_encoder_mask_decoder", Sam2PromptMaskDecoderGraph,
                  (*SAM2_LEVELS, "input_labels", "input_points", "input_boxes"),
                  ("iou_scores", "pred_masks", "object_score_logits"),
                  {**{level: {0: "batch_size"} for level in SAM2_LEVELS},
                   "input_labels": {0: "batch_size", 1: "prompt_batch_size", 2: "num_points"},
                   "input_points": {0: "batch_size", 1: "prompt_batch_size", 2: "num_points"},
                   "input_boxes": {0: "batch_size", 1: "num_boxes"}},
                  _sam2_decoder_example, optimize=False),
    ),
    reference=sam2_reference,
    graph_prompts=sam2_graph_prompts,
    model_type="sam2",
    architecture="Sam2Model",
    prompts_note="transformers.js' Sam2Model fills in the decoder inputs a prompt leaves out: no box is `input_boxes` "
                 "of shape (batch, 0, 4), no points are `input_points` (batch, 1, 0, 2) with `input_labels` (batch, "
                 "boxes, 0).",
)


# The SAM 3 tracker is Sam2Model's code on SAM 3's ViT (transformers generates it from SAM 2's modular file):
# the same two graphs, under the model_type transformers.js reads for its `Sam3TrackerModel` (a `Sam2Model` there).
SAM3_TRACKER_SPEC = replace(SAM2_SPEC, model_type="sam3_tracker", architecture="Sam3TrackerModel")

# model_type -> its export; a family member registers its own beside SAM's.
EXPORT_SPECS = {"sam_split": SAM_SPEC, "sam": SAM_SPEC, "sam2_split": SAM2_SPEC, "sam2": SAM2_SPEC,
                "sam3_tracker": SAM3_TRACKER_SPEC}


def export_spec(config) -> ExportSpec:
    try:
        return EXPORT_SPECS[config.model_type]
    except KeyError:
        raise ToolError(f"no ONNX export for model_type {config.model_type!r} yet (have: "
                        f"{', '.join(sorted(EXPORT_SPECS))})") from None


# ---------------------------------------------------------------------------------------------------- exporting


def export_graph(model, graph: GraphSpec, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Trace `graph` of `model` (fp32, eval) with torch.export and write it to `path` (an `.onnx` file); weights go to
    `<path>_data` beside it when they are larger than `external_data_bytes`."""
    import onnx

    module = graph.module(model).eval()
    example = graph.example_inputs(model.config)
    dims = {}  # one torch.export.Dim per dimension name, shared by the inputs that name it
    dynamic_shapes = tuple(  # in the order of the inputs: ONNX names need not be Python names ("image_embeddings.0")
        {axis: dims.setdefault(label, torch.export.Dim(label))
         for axis, label in graph.dynamic_axes.get(name, {}).items()} or None
        for name in graph.input_names
    )
    with torch.no_grad():
        program = torch.onnx.export(
            module, example, input_names=list(graph.input_names), output_names=list(graph.output_names),
            dynamic_shapes=dynamic_shapes, dynamo=True, optimize=graph.optimize, verbose=False,
        )
    save_onnx(program.model_proto, path, external_data_bytes)
    onnx.checker.check_model(str(path))


def save_onnx(proto, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Write an ONNX model; weights larger than `external_data_bytes` in all go to `<file>.onnx_data` beside it."""
    import onnx

    weight_bytes = sum(len(tensor.raw_data) for tensor in proto.graph.initializer)
    if weight_bytes > external_data_bytes:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}_data")  # tensors under 1 KB stay inline (shapes, pads)
    else:
        onnx.save_model(proto, str(path))


def write_fp16(source: Path, target: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (as transformers.js' own fp16 exports)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=True)
    save_onnx(proto, target, external_data_bytes)


def write_quantized(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization (weights int8, activations quantized per call), after onnxruntime's
    own pre-processing (`quant_pre_process`: constant folding and basic graph optimisation, standard ONNX ops). The
    exported graphs hold most weights behind a `Transpose`, which dynamic quantization skips (it quantizes a MatMul
    only when the weight is an initializer): without the folding the decoder quantized 2 of its 126 MatMuls and came
    out larger than fp32 (4.87 vs 4.81 MB for random:sam-tiny), with it every MatMul and a quarter of the weights.
    One file even for vit-huge (2.5 GB fp32); the source may hold external data."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as scratch:
        folded = Path(scratch) / source.name
        quant_pre_process(str(source), str(folded), skip_symbolic_shape=True,
                          save_as_external_data=source.with_name(source.name + "_data").exists())
        quantize_dynamic(str(folded), str(target), weight_type=QuantType.QInt8, use_external_data_format=False)


# -------------------------------------------------------------------------------------------------- verification


def run_graphs(onnx_dir: Path, spec: ExportSpec, feeds: dict, suffix: str = "") -> dict:
    """Run the spec's graphs from `onnx_dir` (files `<graph><suffix>.onnx`) in onnxruntime on CPU, chaining outputs
    into later graphs' inputs of the same name. Returns every output by name, as torch tensors."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    outputs: dict = {}
    for graph in spec.graphs:
        session = onnxruntime.InferenceSession(str(onnx_dir / f"{graph.name}{suffix}.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        inputs = {name: (outputs[name] if name in outputs else feeds[graph.name][name]).numpy()
                  for name in graph.input_names}
        results = session.run(list(graph.output_names), inputs)
        outputs.update({name: torch.from_numpy(result) for name, result in zip(graph.output_names, results)})
    return outputs


def verify(onnx_dir: Path, spec: ExportSpec, model, variant: str = "fp32", atol: float | None = None) -> dict:
    """Run the `variant` graphs on every verification case and compare with `model`'s outputs. Returns {output name:
    max abs difference over the cases}; raises `ToolError` when one exceeds `atol` (default `TOLERANCES[variant]`)."""
    atol = TOLERANCES[variant] if atol is None else atol
    worst: dict[str, float] = {}
    size = model.config.prompt_encoder_config.image_size
    for batch_size, kind in VERIFICATION_CASES:
        description = f"{kind}, batch {batch_size}"
        pixel_values = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(batch_size))
        prompts = sam_prompts(model.config, batch_size, kind)
        expected = spec.reference(model, pixel_values, prompts)
        feeds = {spec.graphs[0].name: {"pixel_values": pixel_values},
                 spec.graphs[1].name: spec.graph_prompts(prompts, batch_size)}
        actual = run_graphs(onnx_dir, spec, feeds, VARIANT_SUFFIX[variant])
        for name, tensor in expected.items():
            difference = (float("inf") if actual[name].shape != tensor.shape
                          else (actual[name].float() - tensor.float()).abs().max().item())
            worst[name] = max(worst.get(name, 0.0), difference)
            if not difference <= atol:
                raise ToolError(f"verification of the {variant} ONNX graphs failed ({description}): {name} differs "
                                f"from PyTorch by {difference:.2e} (shape {tuple(actual[name].shape)} against "
                                f"{tuple(tensor.shape)}), above {atol:g}; nothing was written")
    return worst


# ---------------------------------------------------------------------------------------------------- the folder


def export_model(model, folder: Path, variants: tuple[str, ...] = ("fp32",), atol: float | None = None,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES, reference=None) -> dict:
    """Write `folder/onnx/` for `model` (fp32, eval, adapter merged) with every variant in `variants` ("fp32" always
    first), verify each in onnxruntime against `reference` (default: `model` itself; push.py gives the stock source)
    and return {variant: {output: max abs difference}}."""
    require_onnx()
    spec = export_spec(model.config)
    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    differences = {}
    for graph in spec.graphs:
        started = time.monotonic()
        step(f"Exporting {graph.name}.onnx")
        export_graph(model, graph, onnx_dir / f"{graph.name}.onnx", external_data_bytes)
        step(f"  exported in {time.monotonic() - started:.0f} s ({_size_mb(onnx_dir, graph.name):.1f} MB)")
    for variant in variants:
        for graph in spec.graphs:
            source = onnx_dir / f"{graph.name}.onnx"
            if variant == "fp16":
                write_fp16(source, onnx_dir / f"{graph.name}_fp16.onnx", external_data_bytes)
            elif variant == "quantized":
                write_quantized(source, onnx_dir / f"{graph.name}_quantized.onnx")
        step(f"Verifying the {variant} graphs in onnxruntime against PyTorch (point and box prompts, batch 1 and 2)")
        differences[variant] = verify(onnx_dir, spec, reference if reference is not None else model, variant,
                                      atol if variant == "fp32" else None)
        step("  max abs differences "
             + ", ".join(f"{name} {value:.2e}" for name, value in differences[variant].items()))
    return differences


def _size_mb(onnx_dir: Path, stem: str) -> float:
    return sum(path.stat().st_size for path in onnx_dir.glob(f"{stem}.onnx*")) / 1e6


def write_metadata(folder: Path, model, preprocessor_config: dict, card: str) -> None:
    """config.json (the stock model_type, what transformers.js reads), preprocessor_config.json and README.md."""
    spec = export_spec(model.config)
    config = model.config.to_dict()
    config.pop("auto_map", None)
    config.update(model_type=spec.model_type, architectures=[spec.architecture])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2) + "\n")
    (folder / "README.md").write_text(card)
