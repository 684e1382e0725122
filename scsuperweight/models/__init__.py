"""Model definitions and checkpoint I/O; nothing here imports the rest of the package except errors."""

from .checkpoint import file_sha256, load_scgpt, rename_official_keys, save_scgpt, to_flash_keys
from .scgpt import ScGPTConfig, ScGPTModel

__all__ = ["ScGPTConfig", "ScGPTModel", "load_scgpt", "save_scgpt", "rename_official_keys", "to_flash_keys",
           "file_sha256"]
