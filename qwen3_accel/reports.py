"""What every benchmark writes: the report as JSON, its table as text, and plots through matplotlib (files only)."""

import json
import os
from typing import Any


def write_json_and_table(report: dict[str, Any], table: str, json_path: str, table_path: str) -> None:
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(table_path, "w") as f:
        f.write(table + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend: PNG files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
