"""Which base model and adapter a tool runs on, checked before anything slow, and loaded in one place.

`resolve_model` / `resolve_adapter` turn a command-line argument into a `Location` (a local folder, or a Hub id pinned
to its commit sha) after looking at what it holds: a SamSplitModel's `config.json`, an adapter's
`adapter_config.json`, or neither. Each mistake is one line that says what was expected (an adapter given as the
model, a stock SAM checkpoint that push.py must convert first, a typo, a revision the repository does not have, a Hub
that cannot be reached). `model_config`, `load_model` and `load_adapter` are the only places the tools load these;
a family's processor and mask geometry are `processing`'s."""

import json
from pathlib import Path

import transformers
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .cli import RANDOM_PREFIX, Location, ToolError, local_path, locate
from .compat import hub_failure_types
from .family import MEMBERS, allow_checkpointing_, check_config_body, member_for_random, random_stock_model
from .processing import load_model as load_family_model

# The split-q/k/v twins' model_types, each with the stock model_types push.py converts into it.
MODEL_TYPES = {"sam_split": ("sam",), "sam_hq_split": ("sam_hq",), "sam2_split": ("sam2", "sam2_video")}
STOCK_MODEL_TYPES = {stock: twin for twin, stocks in MODEL_TYPES.items() for stock in stocks}
STOCK_NAMES = {"sam": "SAM", "sam_hq": "SAM-HQ", "sam2": "SAM 2", "sam2_video": "SAM 2 video"}
# Members without a twin, whose stock checkpoints the tools train as they are (the SAM 3 tracker, on transformers 5).
STOCK_TRAINED_TYPES = tuple(stock for member in MEMBERS if member.twin is None for stock in member.stock_types)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _hub_listing(location: Location, flag: str, revision_flag: str) -> tuple[str, set]:
    """(commit sha, file names) of a Hub repository at `location.revision`, or a `ToolError` saying what is wrong."""
    api = HfApi()
    try:
        info = api.model_info(location.name, revision=location.revision)
    except RevisionNotFoundError:
        raise ToolError(f"{revision_flag} {location.revision}: no such branch, tag or commit in {location.name} "
                        f"(the repository exists on the Hub at {api.endpoint})") from None
    except RepositoryNotFoundError:
        raise ToolError(f"{flag} {location.name}: no such folder, and not found on the Hub at {api.endpoint} "
                        "(a private repository needs HF_TOKEN)") from None
    except hub_failure_types() as error:
        raise ToolError(f"{flag} {location.name}: no such folder, and the Hub at {api.endpoint} cannot be reached "
                        f"({_first_line(error)})") from None
    return info.sha, {sibling.rfilename for sibling in info.siblings or []}


def _cached_files(location: Location, flag: str, revision_flag: str) -> set:
    """With HF_HUB_OFFLINE: which of the files we look at are in the download cache for a pinned commit."""
    if len(location.revision or "") != 40:
        raise ToolError(f"{flag} {location.name}: no such folder, and HF_HUB_OFFLINE is set: a Hub id loads from the "
                        f"cache only when {revision_flag} is a commit sha")
    files = {name for name in ("config.json", "adapter_config.json")
             if isinstance(try_to_load_from_cache(location.name, name, revision=location.revision), str)}
    if not files:
        raise ToolError(f"{flag} {location}: no such folder, and HF_HUB_OFFLINE is set while the download cache does "
                        "not hold it")
    return files


def _locate_files(text: str, revision: str | None, flag: str, revision_flag: str) -> tuple[Location, set]:
    """The argument as a `Location` (a Hub id pinned to its sha; a local folder by its absolute path) and the names
    of the files at its top level."""
    location = locate(text, revision, flag=flag)
    if location.is_hub:
        if constants.HF_HUB_OFFLINE:
            return location, _cached_files(location, flag, revision_flag)
        sha, files = _hub_listing(location, flag, revision_flag)
        return Location("hub", location.name, sha), files
    path = local_path(text, flag=flag).resolve()
    if not path.is_dir():
        raise ToolError(f"{flag} {text} is a file; expected a folder or a Hub id")
    return Location("local", str(path)), {child.name for child in path.iterdir()}


def _read_json(location: Location, name: str, flag: str) -> dict:
    try:
        path = hf_hub_download(location.name, name, revision=location.revision) if location.is_hub \
            else Path(location.name) / name
        return json.loads(Path(path).read_text())
    except (ValueError, *hub_failure_types()) as error:
        raise ToolError(f"{flag} {location}: cannot read its {name} ({_first_line(error)})") from None


def resolve_model(text: str, revision: str | None, *, flag: str = "--model",
                  revision_flag: str = "--base-revision") -> Location:
    """`text` (+ `revision`) as the Location of a split-q/k/v twin (SAM, SAM-HQ, SAM 2) or of a member trained as its
    stock model (the SAM 3 tracker), or of `random:<size>` (a randomly initialised one of the family table's sizes):
    refused in one line when it is an adapter, a stock checkpoint with fused qkv (pointing at push.py), another
    model, not a model at all, or not found."""
    if text and text.startswith(RANDOM_PREFIX):
        location = locate(text, revision, flag=flag, random_ok=True)
        try:
            member_for_random(text.removeprefix(RANDOM_PREFIX))
        except ValueError as error:
            raise ToolError(f"{flag} {text}: {error}") from None
        return location
    location, files = _locate_files(text, revision, flag, revision_flag)
    if "config.json" not in files:
        if "adapter_config.json" in files:
            raise ToolError(f"{flag} {text} is a PEFT adapter, not a model: pass its base model as {flag} (its "
                            "adapter_config.json names it) and the adapter as --adapter (evaluate.py), or fine-tune "
                            "its merged model (finetune.py --merge-to-sam, then push.py)")
        raise ToolError(f"{flag} {text} holds no config.json: expected a SamSplitModel folder or Hub id (made by "
                        "push.py or SamSplitModel.save_pretrained)")
    config = _read_json(location, "config.json", flag)
    model_type = config.get("model_type")
    try:
        check_config_body(config)
    except ValueError as error:
        raise ToolError(f"{flag} {text}: {error}") from None
    if model_type is None:
        raise ToolError(f"{flag} {text}: its config.json has no model_type, so it is no transformers model; expected "
                        "a SamSplitModel folder or Hub id (made by push.py or SamSplitModel.save_pretrained)")
    if model_type in STOCK_MODEL_TYPES:
        image_only = " --image-only" if model_type == "sam2_video" else ""  # the tools take the image twin
        raise ToolError(f"{flag} {text} is a stock {STOCK_NAMES[model_type]} checkpoint (fused qkv): convert it first "
                        f"with `python push.py --source {text}{image_only} --output-dir DIR --no-push` and pass DIR")
    if model_type == "sam2_video_split":
        raise ToolError(f"{flag} {text} is the SAM 2 video twin (the tracker): the tools train and score the image "
                        "model; build it from the stock checkpoint with `python push.py --source ... --image-only` (an "
                        "adapter trained on it runs in the tracker: docs/family.md)")
    if model_type not in (*MODEL_TYPES, *STOCK_TRAINED_TYPES):
        raise ToolError(f"{flag} {text} is a {model_type!r} model; expected a split-q/k/v twin (model_type "
                        f"{', '.join(map(repr, MODEL_TYPES))}, made by push.py)"
                        + "".join(f" or a stock {stock!r} checkpoint" for stock in STOCK_TRAINED_TYPES))
    return location


def resolve_adapter(text: str, revision: str | None) -> tuple[Location, dict]:
    """(Location, adapter_config.json) of a PEFT adapter folder or Hub id; a wrong `--adapter-revision` says so."""
    location, files = _locate_files(text, revision, "--adapter", "--adapter-revision")
    if "adapter_config.json" not in files:
        model = " (it holds a model: pass it as --model)" if "config.json" in files else ""
        raise ToolError(f"--adapter {text} holds no adapter_config.json: not a PEFT adapter{model}")
    return location, _read_json(location, "adapter_config.json", "--adapter")


def adapter_base(config: dict) -> tuple[str, str | None]:
    """(base model, revision) recorded in an adapter's config."""
    return config.get("base_model_name_or_path") or "", config.get("revision")


def model_config(location: Location):
    """The model's config alone: enough to set up the data before the weights are loaded."""
    if location.kind == "random":
        size = location.name.removeprefix(RANDOM_PREFIX)
        return member_for_random(size).stock_config(size)
    try:
        return transformers.AutoConfig.from_pretrained(location.name, revision=location.revision,
                                                       trust_remote_code=True)
    except (ValueError, *hub_failure_types()) as error:
        raise ToolError(f"cannot read the config of {location}: {_first_line(error)}") from None


def load_model(location: Location):
    """The base model's weights, as the twin class its config names (strict: a missing or unexpected weight is an
    error): `processing.load_model`. `random:<size>`: the family's random model of that size (`random_stock_model`,
    the same weights every time), as its twin where the member has one."""
    if location.kind == "random":
        member, model = random_stock_model(location.name.removeprefix(RANDOM_PREFIX))
        if member.twin is not None:
            return member.twin.from_stock(model).eval()
        allow_checkpointing_(model)
        return model
    try:
        return load_family_model(location.name, location.revision)
    except hub_failure_types() as error:
        raise ToolError(f"cannot load the model {location}: {_first_line(error)}") from None


# Where finetune.py records the model_type of the base an adapter was trained on: a key of the adapter config's
# `auto_mapping`, a dict PEFT keeps as it is (it reads only its `base_model_class` and `parent_library`).
BASE_MODEL_TYPE_KEY = "sam_split_base_model_type"


def twin_name(model_type: str | None) -> str:
    """'the SAM twin (sam_split)' for a twin's model_type; the model_type itself for anything else."""
    stocks = MODEL_TYPES.get(model_type)
    return f"the {STOCK_NAMES[stocks[0]]} twin ({model_type})" if stocks else repr(model_type)


def adapter_model_type(config: dict) -> str | None:
    """The model_type of the base an adapter was trained on, where its config records it (finetune.py does)."""
    return (config.get("auto_mapping") or {}).get(BASE_MODEL_TYPE_KEY)


def _check_adapter_weights(weights: dict, about: str) -> None:
    """A `ToolError` unless the adapter's weights are finite and change the model: a LoRA whose every B matrix is
    zero (and that saves no other weights) adds nothing."""
    not_finite = [name for name, tensor in weights.items() if tensor.is_floating_point()
                  and not bool(tensor.isfinite().all())]
    if not_finite:
        raise ToolError(f"{about}: its weights are not finite (NaN or infinite in {len(not_finite)} tensors, e.g. "
                        f"{not_finite[0]}); refusing to apply it")
    changing = [name for name in weights if "lora_A" not in name and "lora_embedding_A" not in name]
    if changing and all(("lora_B" in name or "lora_embedding_B" in name) and not bool(weights[name].any())
                        for name in changing):
        raise ToolError(f"{about}: every LoRA B matrix is zero, so the adapter does not change the model (an "
                        "untrained adapter?); refusing to apply it")


def load_adapter(base, location: Location, *, allow_other_base: bool = False):
    """`base` with the adapter at `location` on top (a `PeftModel`, for inference): applied in full or refused.

    Refused (`ToolError`, naming the adapter's recorded base and the model): an adapter whose config records another
    twin than `base`'s (unless `allow_other_base`), weights that are not finite or change nothing, and any weight that
    lands in no module of `base` or has another shape there (PEFT's own missing/unexpected key report of the load;
    PEFT only warns)."""
    from peft import PeftConfig, PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config = _read_json(location, "adapter_config.json", "--adapter")
    model_type = getattr(base.config, "model_type", None)
    trained_on = config.get("base_model_name_or_path") or "a base it does not name"
    recorded = adapter_model_type(config)
    about = (f"the adapter {location} (trained on {trained_on}"
             f"{', ' + twin_name(recorded) if recorded else ''}) on the model {base.name_or_path} "
             f"({twin_name(model_type)})")
    if recorded and recorded != model_type and not allow_other_base:
        raise ToolError(f"{about}: the adapter was trained on another family member; pass --allow-other-base to "
                        "apply it anyway (where its weights fit)")
    hub_kwargs = {"revision": location.revision} if location.revision else {}
    try:
        peft_config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(location.name, **hub_kwargs)] \
            .from_pretrained(location.name, **hub_kwargs)
        weights = load_peft_weights(location.name, device="cpu", **hub_kwargs)
    except (ValueError, KeyError, *hub_failure_types()) as error:
        raise ToolError(f"cannot load the adapter {location}: {_first_line(error)}") from None
    _check_adapter_weights(weights, about)
    peft_config.inference_mode = True
    try:
        model = PeftModel(base, peft_config)
        result = set_peft_model_state_dict(model, weights)
    except (ValueError, KeyError, RuntimeError) as error:  # no target module, or a weight of another shape
        mismatched = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        reason = (f"{len(mismatched)} weights have another shape there, e.g. {mismatched[0]}" if mismatched
                  else _first_line(error))
        raise ToolError(f"{about}: it does not fit the model ({reason})") from None
    # The report lists every weight of the base as missing too: only the adapter's own ones (named "...default...")
    # count. Any unexpected key is a weight of the adapter that landed in no module.
    missing = [key for key in result.missing_keys if ".default." in key or key.endswith(".default")]
    if missing or result.unexpected_keys:
        found = [f"{len(result.unexpected_keys)} of its weights land in no module of the model (e.g. "
                 f"{result.unexpected_keys[0]})"] if result.unexpected_keys else []
        found += [f"{len(missing)} adapter weights of the model are not in it (e.g. {missing[0]})"] if missing else []
        raise ToolError(f"{about}: it does not fit the model: {'; '.join(found)}")
    return model.eval()
