"""Text and task data: calibration text, held-out text, task datasets and prompt templates."""
