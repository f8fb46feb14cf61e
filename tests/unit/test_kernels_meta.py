"""The host's 4-bit layout probe runs on real tensors even when first asked inside a meta-device block: lobi sizes its
candidate layers on the meta device, and in a fresh process (a study's cell) that was the probe's first call."""

import subprocess
import sys


def test_layout_probe_first_called_on_the_meta_device():
    code = (
        "import torch\n"
        "from budgetlm.methods.quant import kernels\n"
        "with torch.device('meta'):\n"
        "    print(kernels.block_n())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) > 0
