"""A per-object function whose module takes SHAPEFLOW_TEST_IMPORT_S seconds to import, as a worker
process on a loaded machine takes long to start (spawned workers import the function's module)."""

from __future__ import annotations

import os
import time

time.sleep(float(os.environ.get("SHAPEFLOW_TEST_IMPORT_S", "0")))


def quick(task, out_dir):
    return {"path": ""}
