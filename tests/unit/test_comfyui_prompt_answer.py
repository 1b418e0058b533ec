"""ComfyUI's answer to a prompt names its render even when it is over 64 KiB.

Found in review: each test is the smallest reproduction of one defect.
"""

from __future__ import annotations

import json


from gpumgr.drivers.comfyui import ComfyUIDriver


# -- render tracking -----------------------------------------------------------------------


def test_a_prompt_answer_over_64_kib_still_names_its_render():
    errors = {f"node{i}": {"errors": ["x" * 200], "class_type": "X"} for i in range(400)}
    body = json.dumps({"prompt_id": "abc", "number": 1, "node_errors": errors}).encode()
    head = body[:64 * 1024]  # what the broker hands the driver
    assert ComfyUIDriver().render_id("POST", "/prompt", 200, head) == "abc"
