"""The model files and folders the pack's combo inputs pick by name: their options, the check of a value, the path.

ComfyUI 0.3.64 checks a V1 list input's value against its options while it validates a prompt, but not a V3
``io.Combo`` input's: its validate_inputs (execution.py) tests ``isinstance(input_type, list)``, and a V3 combo's
type is the string "COMBO" (the options sit in its extra info). A missing file therefore went through validation
and failed only when its node ran. Each node with a file input has a ``validate_inputs`` classmethod that calls
``check`` here, so the prompt is refused before any node runs, listing what exists, as the stock loaders do.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Union

import folder_paths

from ..perflow_core.diffusers_folder import MODEL_INDEX, model_folders

logger = logging.getLogger(__name__)

SHOWN_OPTIONS = 20


class ModelFiles:
    """Files of one ComfyUI model folder kind (``checkpoints``, ``perflow_deltas``, ...)."""

    kind = "a file"
    plural = "files"

    def __init__(self, folder: str):
        self.folder = folder

    @property
    def where(self) -> str:
        return f"models/{self.folder}"

    def files(self) -> List[str]:
        return folder_paths.get_filename_list(self.folder)

    def options(self) -> List[str]:
        """The combo's options: the files, or one entry that says where they go (the frontend draws an empty combo
        as "undefined"); that entry is refused like any missing file."""
        return self.files() or [f"(none yet: put {self.plural} in {self.where})"]

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not one of the files (None when it is), listing them."""
        options = self.files()
        if isinstance(value, str) and value in options:
            return None
        shown = ", ".join(options[:SHOWN_OPTIONS]) + (", ..." if len(options) > SHOWN_OPTIONS else "") if options else f"none: put them in {self.where}"
        return f"{value!r} is not {self.kind} in {self.where}; available: {shown}"

    def check(self, value: Any) -> Union[bool, str]:
        """For validate_inputs: True, or the message. A linked input's value is not known before the run (ComfyUI
        passes None): the node checks it when it runs."""
        return True if value is None else (self.problem(value) or True)

    def path(self, value: Any, input_name: str) -> str:
        """The full path of a listed value; a ValueError naming the input otherwise."""
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{input_name} {problem}")
        return self.full_path(value, input_name)

    def full_path(self, value: str, input_name: str) -> str:
        return folder_paths.get_full_path_or_raise(self.folder, value)


class DiffusersFolders(ModelFiles):
    """Folders under models/diffusers that hold a model_index.json, as the stock DiffusersLoader lists them."""

    kind = f"a folder with a {MODEL_INDEX}"
    plural = "diffusers model folders"

    def __init__(self):
        super().__init__("diffusers")

    def files(self) -> List[str]:
        found = [name for root in folder_paths.get_folder_paths(self.folder) for name in model_folders(root)]
        return sorted(set(found))

    def full_path(self, value: str, input_name: str) -> str:
        for root in folder_paths.get_folder_paths(self.folder):
            path = os.path.join(root, value)
            if os.path.isfile(os.path.join(path, MODEL_INDEX)):
                return path
        raise ValueError(f"{input_name} {value!r} is no longer in {self.where}")


def pack_model_files(folder: str) -> ModelFiles:
    """One of the pack's own model folders: registered with ComfyUI and created under its models directory, so a
    new node's dropdown reads an existing folder and users find where its files go."""
    path = os.path.join(folder_paths.models_dir, folder)
    folder_paths.add_model_folder_path(folder, path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        logger.warning("PeRFlow: could not create %s (%s); create it to add files", path, error)
    return ModelFiles(folder)


CHECKPOINTS = ModelFiles("checkpoints")
DIFFUSERS = DiffusersFolders()
