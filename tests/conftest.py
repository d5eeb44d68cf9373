"""Test session setup. huggingface_hub reads these variables when it is imported, so they are set before any test
module imports transformers: no test may reach the network, and nothing is written to the user's cache."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sam-split-hf-home-")
os.environ.pop("HF_TOKEN", None)
