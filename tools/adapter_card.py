"""The model card of a LoRA adapter made by finetune.py: `ModelCardData` front matter (the base as a Hub id, never a
path of this machine; the base's license; Hub datasets; validation Dice/IoU as `eval_results`), which step the adapter
is from and whether it beat the base model, how to load it pinned, and the hyper-parameters."""

from pathlib import Path

from .cli import Location, ToolError, locate


def base_license(base_name: str, base_revision: str | None) -> str | None:
    """The `license` of the base model's card (a Hub repo or a local folder), or None."""
    from huggingface_hub import ModelCard, hf_hub_download

    card = Path(base_name) / "README.md"
    try:
        if not card.is_file():
            card = hf_hub_download(base_name, "README.md", revision=base_revision)
        return ModelCard.load(card).data.license
    except Exception:  # no card, or one without metadata: the adapter card names no license
        return None


def hub_dataset(spec: str | None) -> str | None:
    """`spec` when it names a Hub dataset (not a local path), by the tools' one resolver."""
    try:
        return spec if spec and locate(spec, flag="data").is_hub else None
    except ToolError:
        return None


def data_description(spec: str, revision: str | None, split: str, source) -> str:
    """How the card names a dataset: a Hub dataset by its id, revision and split; a local one by its folder's name
    (never a path of this machine); both with what it holds (format, images), from `source.describe()`."""
    held = source.describe().rsplit(" (", 1)[-1].removesuffix(")")
    if hub_dataset(spec):
        return f"`{spec}` (Hub dataset, revision `{revision or 'main'}`, split `{split}`; {held})"
    path = Path(spec).absolute()
    return f"`{path.parent.name}/{path.name}` (a local dataset; {held})"


def model_card(base: Location, repo_name: str, license: str | None, datasets: list, val_name: str | None,
               results: dict | None, hyperparameters: dict, notes: list, data: dict | None = None) -> str:
    """The adapter's README: `ModelCardData` front matter (base model as a Hub id, the base's license, datasets,
    validation Dice/IoU as `eval_results`), `notes` (which step the adapter is from), how to load it pinned, the
    hyper-parameters, and the training and validation `data` ({"train": description, "val": ...}, see
    `data_description`). A local base or dataset is named by its folder's name, never by a path of this machine."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = None
    if results:
        eval_results = [EvalResult(task_type="image-segmentation", dataset_type=hub_dataset(val_name) or "custom",
                                   dataset_name=_dataset_name(val_name), metric_type=metric,
                                   metric_name=f"mean {metric} per object (full resolution)",
                                   metric_value=round(results[metric], 4)) for metric in ("dice", "iou")]
    card_data = ModelCardData(
        library_name="peft", pipeline_tag="mask-generation", license=license,
        base_model=base.name if base.is_hub else None, datasets=[d for d in datasets if d] or None,
        tags=["sam", "lora", "image-segmentation", "sam-split"], model_name=repo_name, eval_results=eval_results,
    )
    base_name = base.name if base.is_hub else f"local folder {Path(base.name).name}"
    revision = f', revision="{base.revision}"' if base.is_hub else ""
    lines = ["# SAM LoRA adapter", "",
             f"LoRA on `{base_name}`" + (f" at `{base.revision}`" if base.is_hub else "") + ".", "", *notes,
             "```python", "from peft import AutoPeftModel, PeftModel", "from transformers import AutoModel", "",
             f'model = AutoPeftModel.from_pretrained("{repo_name}", revision="ADAPTER_SHA", trust_remote_code=True)',
             "# or, explicitly:",
             f'base = AutoModel.from_pretrained("{base.name if base.is_hub else "BASE"}", trust_remote_code=True'
             f'{revision})',
             f'model = PeftModel.from_pretrained(base, "{repo_name}", revision="ADAPTER_SHA")', "```", ""]
    if results:
        lines += ["## Validation (Dice / IoU per object, original resolution)", "", "| class | Dice | IoU | objects |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {c['dice']:.4f} | {c['iou']:.4f} | {c['objects']} |"
                  for name, c in results["classes"].items()]
        lines += [f"| **all** | {results['dice']:.4f} | {results['iou']:.4f} | {results['objects']} |", ""]
    if data:
        lines += ["## Data", "", *[f"- {what}: {data[key]}" for key, what in (("train", "training"),
                                                                               ("val", "validation")) if data.get(key)],
                  ""]
    lines += ["## Training hyper-parameters", "", "| name | value |", "| --- | --- |"]
    # a `|` in a value (a --target-modules regular expression) would end its table cell
    cells = {name: str(value).replace("|", r"\|") for name, value in hyperparameters.items()}
    lines += [f"| {name} | {value} |" for name, value in cells.items()] + [""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _dataset_name(spec: str) -> str:
    """A Hub dataset's id; a local dataset's folder and file name (`data/val`, `annotations/instances_val.json`)."""
    if hub_dataset(spec):
        return spec
    path = Path(spec).absolute()
    return f"{path.parent.name}/{path.name}"


def adapter_notes(record: dict) -> list:
    """Card lines saying which step the adapter is from, whether it beat the base, and whether the run finished."""
    step, steps = record.get("adapter_step"), record.get("steps")
    notes = []
    if not record.get("finished"):
        notes.append(f"**From an unfinished run** (stopped before step {record.get('max_steps')}; published with "
                     "--allow-unfinished).")
    if record.get("metric_for_best") and step is not None:
        notes.append(f"The adapter is the one of step {step}" + (f" of {steps}" if steps else "")
                     + f": the best validation {record['metric_for_best']}.")
        if step == 0:
            notes.append("**No validation beat the base model**: this adapter is the untrained one (step 0), "
                         "equal to the base model" + (" with its own mask decoder" if record.get("train_decoder")
                                                      else "") + ".")
    elif step is not None:
        notes.append(f"The adapter is the one of step {step}.")
    return [note + "\n" for note in notes]
