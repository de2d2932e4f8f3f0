"""The typed records that flow one way through the job: ExampleRef → DecodedExample → rows.

``ExampleRef`` says where an example's bytes live (or carries them, for TFRecords); ``decode``
turns it into a ``DecodedExample`` with model-ready arrays; the explainer turns a batch of those
into attribution rows (plain dicts matching ``schemas.ATTRIBUTION_SCHEMA``). Failures at any stage
become error rows (``schemas.ERROR_SCHEMA``).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np


@dataclass
class ExampleRef:
    """One input example before its image is read."""

    example_id: str
    source: str  # path/URI of the image, or "file:index" of a TFRecord record
    image_path: Optional[str] = None  # read through Beam FileSystems when set
    image_bytes: Optional[bytes] = None  # already in hand (TFRecords)
    mask_path: Optional[str] = None
    mask_bytes: Optional[bytes] = None
    raw_label: Any = None  # as read: int, str, or None when the dataset is unlabeled
    slices: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodedExample:
    """One example ready for the model: ``image`` is float32 [H, W, C] after preprocessing."""

    example_id: str
    source: str
    image: np.ndarray
    label: Optional[int]
    mask: Optional[np.ndarray] = None  # bool [H, W] at model input resolution
    slices: Dict[str, Any] = field(default_factory=dict)


def error_row(example_id: str, source: str, stage: str, error_type: str, message: str) -> dict:
    """A row of DIR/errors/ (see DESIGN.md, errors columns)."""
    return {
        "example_id": example_id,
        "source": source,
        "stage": stage,
        "error_type": error_type,
        "message": message,
    }
