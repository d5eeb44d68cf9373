"""Every difference between the supported library releases, in one place: transformers 4.57 / 5.x and
huggingface_hub 0.x / 1.x+. Nothing else in the package branches on a version.

The model code imports this file relatively, so it travels to the Hub with it: only torch and transformers are imported
at top level (the Hub's remote-code loader demands every top-level import be installed; huggingface_hub, a dependency
of transformers, is imported where it is used).
"""

import transformers
from transformers import SamModel

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

if hasattr(SamModel, "activation_checkpointing_enable"):  # transformers 5: the name to use, non-reentrant already

    class CheckpointingMixin:
        """Nothing to add on transformers 5."""

else:  # transformers 4.x

    class CheckpointingMixin:
        """transformers 5's `activation_checkpointing_enable` on 4.x, so every caller uses that one name.

        Non-reentrant by default, as in transformers 5: 4.x's re-entrant checkpointing gives LoRA weights inside a
        checkpointed vision layer no gradient when the layer's input (from the frozen patch embedding) needs none.
        """

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            super().gradient_checkpointing_enable({"use_reentrant": False, **(gradient_checkpointing_kwargs or {})})

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            self.gradient_checkpointing_enable(activation_checkpointing_kwargs)


def sam_image_processor_class():
    """transformers 5's `SamImageProcessor` needs torchvision and its `SamImageProcessorPil` does not; 4.57 has only
    the numpy/PIL `SamImageProcessor`."""
    return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def sam_processor(config) -> transformers.SamProcessor:
    """A `SamProcessor` with SAM's standard preprocessing for `config` (a SAM config): images resized and padded to
    `vision_config.image_size`, segmentation maps to the low-resolution mask grid (4x the image-embedding grid)."""
    size = config.vision_config.image_size
    grid = 4 * (size // config.vision_config.patch_size)
    image_processor = sam_image_processor_class()(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": grid}, mask_pad_size={"height": grid, "width": grid},
    )
    return transformers.SamProcessor(image_processor=image_processor)


# ---------------------------------------------------------------------------------------------------- huggingface_hub
# Used by the tools (push.py, finetune.py), never by the model code: huggingface_hub is imported inside the functions,
# so this file stays importable by the Hub's remote-code loader with torch and transformers alone.


def _hub_http_library():
    """The HTTP client library huggingface_hub runs on: `requests` (0.x), `httpx` (1.x) or `httpx2` (2.x)."""
    from huggingface_hub.utils import _http

    for name in ("httpx2", "httpx", "requests"):
        if hasattr(_http, name):
            return getattr(_http, name)
    raise ImportError(f"huggingface_hub's HTTP client library is none of httpx2, httpx, requests ({_http.__file__})")


def hub_failure_types() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub raises when the Hub or the network fails: HTTP errors (`HfHubHTTPError`), refused
    or dropped connections and timeouts (0.x: `requests.RequestException`, an `OSError`; 1.x/2.x: `httpx.HTTPError` /
    `httpx2.HTTPError`, not an `OSError`), the Xet uploader's (a builtin `ConnectionError`, an `OSError`, or a
    `RuntimeError`) and invalid names (`HFValidationError`, a `ValueError`)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    library = _hub_http_library()
    transport_error = getattr(library, "RequestException", None) or library.HTTPError
    return (HfHubHTTPError, HFValidationError, transport_error, OSError, RuntimeError)


def set_hub_timeout(seconds: float) -> None:
    """Make every huggingface_hub request that sets no timeout of its own (uploads, commits, `whoami`, ...) give up
    after `seconds` without an answer (connecting, sending or waiting for data); by default they wait forever."""
    from huggingface_hub import utils

    if hasattr(utils, "set_client_factory"):  # 1.x / 2.x: one shared httpx client, made by a factory
        from huggingface_hub.utils._http import default_client_factory

        def client_with_timeout():
            client = default_client_factory()
            client.timeout = seconds
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


def sam_preprocessor_config(image_size: int) -> dict:
    """SAM's standard preprocessing as a `preprocessor_config.json` that `AutoProcessor` loads on transformers 4.57 and
    5.x alike, in the form of the released checkpoints. Saving `sam_processor(config)` would not do: on 5.x it names
    `SamImageProcessorPil`, which 4.57 does not know; the name `SamImageProcessor` loads on both (5.x picks the class
    that its installed packages support)."""
    return {
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor",
        "pad_size": {"height": image_size, "width": image_size}, "size": {"longest_edge": image_size},
        "resample": 2, "rescale_factor": 1 / 255,
    }
