"""An adapter is applied in full or refused, never silently dropped (`tools.models.load_adapter`, the one loader that
evaluate.py, export_onnx.py and finetune.py --publish-only use): every weight must land in a module of the model with
its shape, the family member it was trained on must be the model's (unless asked), and it must change the model."""

import json

import pytest
import torch
from sam_testing import (
    ATOL,
    add_lora,
    max_abs_diff,
    random_stock_sam,
    randomize_,
    sample_inputs,
    tiny_sam2_config,
    tiny_sam_config,
)

from sam_split import SamSplitModel
from sam_split.tools.cli import Location, ToolError
from sam_split.tools.models import BASE_MODEL_TYPE_KEY, load_adapter


def twin(family: str, **vision):
    from sam_split import Sam2SplitModel, SamHQSplitModel

    torch.manual_seed(0)
    if family == "sam":
        return SamSplitModel.from_sam(random_stock_sam(tiny_sam_config(**vision))).eval()
    if family == "sam_hq":
        from sam_testing import tiny_sam_hq_config
        from transformers import SamHQModel

        return SamHQSplitModel.from_stock(randomize_(SamHQModel(tiny_sam_hq_config(**vision)))).eval()
    from transformers import Sam2Model

    return Sam2SplitModel.from_stock(randomize_(Sam2Model(tiny_sam2_config()))).eval()


def embeddings(model, inputs):
    """The vision encoder's output (the masks of these random models hardly move with a small LoRA)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        return model.vision_encoder(inputs["pixel_values"])[0]


def make_adapter(base, folder, *, seed=1, record=True, fill=None):
    """A LoRA on q/v of `base` with random (or `fill`) weights saved to `folder`; `record`: its config names the
    base's model_type as finetune.py writes it."""
    adapter = add_lora(base, rank=2, seed=seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:  # large enough to move the embeddings clearly
                parameter.mul_(20) if fill is None else parameter.fill_(fill)
    adapter.save_pretrained(folder)
    if record:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["auto_mapping"] = {"base_model_class": "AutoModel", "parent_library": "transformers",
                                  BASE_MODEL_TYPE_KEY: adapter.get_base_model().config.model_type}
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return Location("local", str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bases = {family: root / family for family in ("sam", "sam_hq", "sam2")}
    for family, folder in bases.items():
        twin(family).save_pretrained(folder)
    SamSplitModel.from_sam(random_stock_sam(tiny_sam_config(hidden_size=48))).save_pretrained(root / "sam_wide")
    sam = SamSplitModel.from_pretrained(bases["sam"]).eval()
    adapters = {"sam": make_adapter(sam, root / "sam-adapter"),
                "unrecorded": make_adapter(SamSplitModel.from_pretrained(bases["sam"]), root / "unrecorded",
                                           record=False),
                "nan": make_adapter(SamSplitModel.from_pretrained(bases["sam"]), root / "nan", fill=float("nan")),
                "zero": make_adapter(SamSplitModel.from_pretrained(bases["sam"]), root / "zero", fill=0.0)}
    return root, bases, adapters


def load_base(folder):
    from sam_split.tools.models import load_model

    return load_model(Location("local", str(folder)))


def test_a_fitting_adapter_is_applied_in_full(folders):
    root, bases, adapters = folders
    base = load_base(bases["sam"])
    inputs = sample_inputs(base.config)
    before = embeddings(base, inputs)
    reference_model = load_base(bases["sam"])
    make_adapter(reference_model, root / "again")  # the same weights, injected in place by PEFT
    reference = embeddings(reference_model, inputs)
    tuned = embeddings(load_adapter(base, adapters["sam"]), inputs)
    assert max_abs_diff(tuned, reference) <= 1e-6 and max_abs_diff(tuned, before) > 10 * ATOL


def test_an_adapter_of_another_member_is_refused_naming_its_base(folders):
    """SAM 2's Hiera has q/v modules too, under other names: PEFT only warned "Found missing adapter keys" and ran
    the base model."""
    root, bases, adapters = folders
    for adapter in (adapters["sam"], adapters["unrecorded"]):  # recorded: by model_type; not: by the weights
        with pytest.raises(ToolError, match=rf"trained on {bases['sam']}.* on the model .*{bases['sam2']}"):
            load_adapter(load_base(bases["sam2"]), adapter, allow_other_base=True)
    with pytest.raises(ToolError, match="land in no module of the model"):
        load_adapter(load_base(bases["sam2"]), adapters["unrecorded"])


def test_an_adapter_of_other_shapes_is_one_line(folders):
    root, bases, adapters = folders
    with pytest.raises(ToolError, match=rf"trained on {bases['sam']}.*does not fit the model .*size mismatch"):
        load_adapter(load_base(root / "sam_wide"), adapters["unrecorded"])


def test_a_sam_adapter_on_the_sam_hq_twin_needs_allow_other_base(folders):
    """The module names match (SAM-HQ's vision encoder is SAM's): only the recorded model_type tells them apart."""
    root, bases, adapters = folders
    with pytest.raises(ToolError, match=r"the SAM twin \(sam_split\)\) on the model .*the SAM-HQ twin.*"
                                        r"--allow-other-base"):
        load_adapter(load_base(bases["sam_hq"]), adapters["sam"])
    base = load_base(bases["sam_hq"])
    inputs = sample_inputs(base.config)
    before = embeddings(base, inputs)
    after = embeddings(load_adapter(base, adapters["sam"], allow_other_base=True), inputs)
    assert max_abs_diff(before, after) > 10 * ATOL
    load_adapter(load_base(bases["sam_hq"]), adapters["unrecorded"])  # no record: the module/shape check alone


@pytest.mark.parametrize("kind, message", [("nan", "not finite"), ("zero", "does not change the model")])
def test_a_nan_or_all_zero_adapter_is_refused(folders, kind, message):
    root, bases, adapters = folders
    with pytest.raises(ToolError, match=message):
        load_adapter(load_base(bases["sam"]), adapters[kind])


def test_finetune_records_the_base_model_type(folders, tmp_path):
    from sam_split.tools.adapter import save_adapter

    root, bases, adapters = folders
    adapter = add_lora(load_base(bases["sam_hq"]), rank=2, seed=3)
    save_adapter(adapter, tmp_path / "out", "card")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["auto_mapping"][BASE_MODEL_TYPE_KEY] == "sam_hq_split"
    with pytest.raises(ToolError, match="trained on another family member"):
        load_adapter(load_base(bases["sam"]), Location("local", str(tmp_path / "out")))


def test_export_onnx_refuses_a_misfit_adapter_and_an_adapter_as_model(folders, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from sam_split import export_onnx

    root, bases, adapters = folders
    rc = export_onnx.main(["--model", str(bases["sam2"]), "--adapter", adapters["unrecorded"].name,
                           "--output-dir", str(tmp_path / "out")])
    assert rc == 1 and "land in no module" in capsys.readouterr().err
    rc = export_onnx.main(["--model", adapters["sam"].name, "--output-dir", str(tmp_path / "out")])
    assert rc == 1 and "is a PEFT adapter, not a model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
