"""The libraries of the command-line tools (push.py, finetune.py, evaluate.py, export_onnx.py): none of this is model
code, and none of it is published with a model repository.

- `cli`: the error type, the runner every CLI runs under, progress lines, the "local path or Hub id" resolver.
- `arguments`: range-checked argparse types and the flags finetune.py and evaluate.py share.
- `files`: the atomic output-folder writer.
- `hub`: the Hub account and one-commit publishing.
- `verify`: reloading a saved model as a user would and comparing its outputs.
- `family`: the SAM family table: stock model types, twins, `random:` sizes, default processor configs.
- `models`: what `--model` / `--adapter` point at, checked before anything slow, and loaded in one place.
- `processing`: per family, the processor, the low-resolution mask grid and target, the decoding options.
- `data`: every dataset format, read as images with prompt targets.
- `segmentation`: the prompted-segmentation task: prompts, losses, scores.
- `training`: finetune.py's training loop: checkpoints and resume, the sampler, the step, validation, reports.
- `adapter`: the fine-tuned adapter as files and on the Hub: saving, pushing, merging into a stock SamModel.
- `adapter_card`: the fine-tuned adapter's model card.
- `visualize`: overlays and training curves.
- `onnx_export`: ONNX graphs for onnxruntime and transformers.js, verified in onnxruntime.
- `compat`: the tools' differences between library releases.
"""
