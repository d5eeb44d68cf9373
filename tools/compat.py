"""The tools' differences between the supported library releases, in one place: transformers 4.57 / 5.x (processors)
and huggingface_hub 0.x / 1.x / 2.x (its HTTP client). Nothing else in the tools branches on a version. The model
files keep theirs in the root `compat.py`.
"""

import importlib.util

import transformers
from huggingface_hub import utils
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import _http

from ..processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitProcessor

# ------------------------------------------------------------------------------------------------------ processors


def sam_image_processor_class():
    """transformers 5's `SamImageProcessor` needs torchvision and its `SamImageProcessorPil` does not; 4.57 has only
    the numpy/PIL `SamImageProcessor`."""
    return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def sam2_image_processor(image_size: int, mask_grid: int):
    """A `Sam2Processor` resizing images to `image_size` squared and segmentation maps to `mask_grid` squared.

    transformers' `Sam2ImageProcessor` (5.x) / `Sam2ImageProcessorFast` (4.57) is torchvision-only; where torchvision
    is missing, the processor a SAM 2 twin's repository ships (`processing_sam2_split.Sam2SplitProcessor`, what
    `AutoProcessor` loads from it with `trust_remote_code=True`) stands in: the same steps with PIL."""
    if importlib.util.find_spec("torchvision") is not None:
        image_processor_class = getattr(transformers, "Sam2ImageProcessor", None) or transformers.Sam2ImageProcessorFast
        image_processor = image_processor_class(size={"height": image_size, "width": image_size},
                                                mask_size={"height": mask_grid, "width": mask_grid})
        return transformers.Sam2Processor(image_processor=image_processor)
    return Sam2SplitProcessor(image_processor=Sam2SplitImageProcessor(image_size, mask_grid))


def sam_preprocessor_config(image_size: int) -> dict:
    """SAM's standard preprocessing as a `preprocessor_config.json` that `AutoProcessor` loads on transformers 4.57 and
    5.x alike, in the form of the released checkpoints. Saving `processing.model_processor(config)` would not do: on
    5.x it names `SamImageProcessorPil`, which 4.57 does not know; the name `SamImageProcessor` loads on both (5.x
    picks the class that its installed packages support)."""
    return {
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor",
        "pad_size": {"height": image_size, "width": image_size}, "size": {"longest_edge": image_size},
        "resample": 2, "rescale_factor": 1 / 255,
    }


def sam_hq_preprocessor_config(image_size: int) -> dict:
    """SAM-HQ's standard preprocessing (SAM's image processor under `SamHQProcessor`), loadable by `AutoProcessor` on
    transformers 4.57 and 5.x as `sam_preprocessor_config` is."""
    return {**sam_preprocessor_config(image_size), "processor_class": "SamHQProcessor"}


def sam2_preprocessor_config(image_size: int) -> dict:
    """SAM 2's standard preprocessing in the form of the released facebook/sam2.1-hiera-* checkpoints: images resized
    (not padded) to `image_size` squared, masks to a quarter of that. Its image processor needs torchvision on both
    4.57 (`Sam2ImageProcessorFast`, the only one there) and 5.x, as for the stock checkpoints; push.py adds the
    `auto_map` of the repository's own processor, which does not."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "Sam2ImageProcessorFast", "processor_class": "Sam2Processor",
        "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": image_size // 4, "width": image_size // 4},
        "resample": 2, "rescale_factor": 1 / 255,
    }


def with_shipped_processor(contents: dict, auto_map: dict) -> dict:
    """A processor config (`preprocessor_config.json`, or 5.x's `processor_config.json`, which nests the image
    processor's) that names the repository's own processor classes in `auto_map`, for `AutoProcessor` /
    `AutoImageProcessor` with `trust_remote_code=True`, and keeps the stock classes for loading without it.

    A legacy `...Fast` image processor name (the released SAM 2.1 configs' `Sam2ImageProcessorFast`) becomes its
    5.x name: 5.x warns that the `Fast` suffix is deprecated; 4.57, which has only the Fast class, raises for it
    without torchvision before it reads `auto_map`, and finds no class by the 5.x name, so goes on to `auto_map`.
    (4.57's stock `Sam2Processor` loads its image processor by its own class attribute, not by this name.)"""
    contents = {**contents, "auto_map": {**contents.get("auto_map", {}), **auto_map}}
    if str(contents.get("image_processor_type", "")).endswith("Fast"):
        contents["image_processor_type"] = contents["image_processor_type"].removesuffix("Fast")
    if isinstance(contents.get("image_processor"), dict):  # 5.x's processor_config.json
        contents["image_processor"] = with_shipped_processor(
            contents["image_processor"], {"AutoImageProcessor": auto_map["AutoImageProcessor"]})
    return contents


# ---------------------------------------------------------------------------------------------- huggingface_hub


def _hub_http_library():
    """The HTTP client library huggingface_hub runs on: `requests` (0.x), `httpx` (1.x) or `httpx2` (2.x)."""
    for name in ("httpx2", "httpx", "requests"):
        if hasattr(_http, name):
            return getattr(_http, name)
    raise ImportError(f"huggingface_hub's HTTP client library is none of httpx2, httpx, requests ({_http.__file__})")


def hub_failure_types() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub raises when the Hub or the network fails: HTTP errors (`HfHubHTTPError`), refused
    or dropped connections and timeouts (0.x: `requests.RequestException`, an `OSError`; 1.x/2.x: `httpx.HTTPError` /
    `httpx2.HTTPError`, not an `OSError`), the Xet uploader's (a builtin `ConnectionError`, an `OSError`, or a
    `RuntimeError`) and invalid names (`HFValidationError`, a `ValueError`)."""
    library = _hub_http_library()
    transport_error = getattr(library, "RequestException", None) or library.HTTPError
    return (HfHubHTTPError, HFValidationError, transport_error, OSError, RuntimeError)


_hub_timeout: list[float] = []  # the seconds `set_hub_timeout` set, for `hub_timeout`


def hub_timeout() -> float | None:
    """The seconds of the last `set_hub_timeout`, or None."""
    return _hub_timeout[-1] if _hub_timeout else None


def set_hub_timeout(seconds: float) -> None:
    """Make every huggingface_hub request that sets no timeout of its own (uploads, commits, `whoami`, ...) give up
    after `seconds` without an answer (connecting, sending or waiting for data); by default they wait forever.

    1.x/2.x: a request that passes `timeout=None` itself (every paginated listing does: `list_repo_commits`,
    `list_repo_tree`) would wait forever on the client's default too, so a request hook puts `seconds` in its place."""
    _hub_timeout[:] = [seconds]
    if hasattr(utils, "set_client_factory"):  # 1.x / 2.x: one shared httpx client, made by a factory
        from huggingface_hub.utils._http import default_client_factory

        library = _hub_http_library()
        bounded = library.Timeout(seconds).as_dict()

        def no_unbounded_wait(request):
            timeouts = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {name: bounded[name] if timeouts.get(name) is None else value
                                             for name, value in {**bounded, **timeouts}.items()}

        def client_with_timeout():
            client = default_client_factory()
            client.timeout = seconds
            client.event_hooks = {**client.event_hooks,
                                  "request": [*client.event_hooks.get("request", []), no_unbounded_wait]}
            return client

        utils.set_client_factory(client_with_timeout)
    else:  # 0.x: a requests Session per thread, made by a "backend factory"; requests has no client-wide timeout
        from huggingface_hub import configure_http_backend
        from huggingface_hub.utils._http import _default_backend_factory

        def session_with_timeout():
            session = _default_backend_factory()
            request = session.request

            def request_with_timeout(method, url, **kwargs):
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = seconds
                return request(method, url, **kwargs)

            session.request = request_with_timeout
            return session

        configure_http_backend(session_with_timeout)
